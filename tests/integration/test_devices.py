"""Device placement: an expert actor asked onto an NPU lands on the node with the (fake) NPU resource; without
torch_npu it fails with a clear error unless CPU fallback is allowed."""

import pytest
import ray
from support.cluster import local_cluster
from support.tiny_models import build

from moeray.actors.devices import actor_options, torch_device
from moeray.actors.expert import make_expert_actor
from moeray.common.errors import ConfigError


def test_actor_options_per_device():
    assert actor_options("cpu", 0.25) == {"num_cpus": 0.25}
    assert actor_options("gpu", 0.5) == {"num_cpus": 0.5, "num_gpus": 1}
    assert actor_options("npu", 0.5) == {"num_cpus": 0.5, "resources": {"NPU": 1}}
    with pytest.raises(ConfigError, match="device"):
        actor_options("tpu", 1)


def test_missing_torch_npu_is_a_clear_error_unless_fallback():
    with pytest.raises(ConfigError, match=r"torch_npu.*moeray\[ascend\]"):
        torch_device("npu")
    assert torch_device("npu", allow_cpu_fallback=True) == "cpu"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        c.add_node(num_cpus=1, resources={"NPU": 1})
        c.wait_for_nodes()
        yield c


def test_npu_expert_actor_is_placed_on_the_npu_node(cluster):
    path = str(build("mixtral"))
    npu_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("NPU")]
    a = make_expert_actor(path, {0: [0, 1]}, 0, "npu", 0.5, True, 1, 0)
    st = ray.get(a.stats.remote())
    assert st["node_id"] in npu_nodes
    assert st["device"] == "cpu"  # CPU fallback: no torch_npu here
    ray.kill(a)


def test_npu_expert_without_fallback_fails_clearly(cluster):
    a = make_expert_actor(str(build("mixtral")), {0: [0]}, 0, "npu", 0.5, False, 1, 0)
    with pytest.raises(Exception, match="torch_npu"):
        ray.get(a.ping.remote(), timeout=60)
