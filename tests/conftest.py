import os
import sys
from pathlib import Path

import pytest
import torch

# Deterministic, and fair to a 2-core machine.
torch.set_num_threads(int(os.environ.get("MOERAY_TEST_THREADS", "1")))
torch.manual_seed(0)
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray shared by the modules that need one (fixed CPUs, no dashboard). Started once and reused;
    a module that needs its own cluster (tests with ray.cluster_utils) shuts it down and the next one restarts it."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="moeray-tests", log_to_driver=False)
    yield ray
