import os
import sys
from pathlib import Path

import pytest
import torch

# Deterministic, and fair to a 2-core machine.
torch.set_num_threads(int(os.environ.get("MOERAY_TEST_THREADS", "1")))
torch.manual_seed(0)
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test of the run that needs it (fixed CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="moeray-tests", log_to_driver=False)
    yield ray
