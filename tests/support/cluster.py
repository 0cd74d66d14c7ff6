"""A multi-node Ray cluster in one machine (ray.cluster_utils.Cluster) with fast node-failure detection."""

from __future__ import annotations

import contextlib

FAST_HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}


@contextlib.contextmanager
def local_cluster(head_cpus: int = 2):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # this module needs its own cluster; the next module restarts the shared one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False,
                                                            "_system_config": FAST_HEALTH})
    ray.init(address=cluster.address, namespace="moeray-cluster-tests", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
