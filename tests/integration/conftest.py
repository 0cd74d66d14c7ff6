import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration and e2e test of the run (fixed CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="moeray-tests", log_to_driver=False)
    yield ray
