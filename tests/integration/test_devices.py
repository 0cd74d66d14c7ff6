"""Device placement: an expert actor asked onto an NPU lands on the node with the (fake) NPU resource; without
torch_npu it fails with a clear error unless CPU fallback is allowed. A gating actor with gating_device gpu / npu
is granted the node's (fake) GPU / NPU, computes on the CPU under allow_cpu_fallback (this torch has no CUDA) and
reports its device, placement and dtype."""

import asyncio

import pytest
import ray
from support.cluster import local_cluster
from support.teacher import assert_teacher_forced
from support.tiny_models import build, load_hf
from support.waiting import wait_for

from moeray.actors.backend import DeploymentBackend
from moeray.actors.deploy import deploy
from moeray.actors.devices import actor_options, torch_device
from moeray.actors.expert import make_expert_actor
from moeray.actors.frontend_wire import status_to_proto
from moeray.clients.messages import status_from_proto
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
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


def test_gpu_without_cuda_is_a_clear_error_unless_fallback():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device")
    with pytest.raises(ConfigError, match="no CUDA device.*allow_cpu_fallback"):
        torch_device("gpu")
    assert torch_device("gpu", allow_cpu_fallback=True) == "cpu"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as c:
        c.add_node(num_cpus=1, resources={"NPU": 1})
        c.add_node(num_cpus=1, num_gpus=1)
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


def _nodes_with(resource: str) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)]


@pytest.mark.parametrize(("gating_device", "resource"), [("gpu", "GPU"), ("npu", "NPU")])
def test_gating_actor_is_granted_its_accelerator_and_reports_device_and_dtype(cluster, gating_device, resource):
    fam = "qwen3_moe"
    dep = deploy(ServeConfig(model=str(build(fam)), num_expert_groups=2, gating_device=gating_device,
                             allow_cpu_fallback=True, dtype="float32", controller=False, expert_num_cpus=0.25,
                             gating_num_cpus=0.5, kv_cache_blocks=64, namespace=f"moeray-gating-{gating_device}"))
    try:
        assert ray.available_resources().get(resource, 0.0) == 0.0  # the gating actor holds the node's only one
        g = dep.status()["gating"][0]
        assert g["node_id"] in _nodes_with(resource)
        assert g["accelerator_ids"].get(resource) == ["0"]
        assert (g["placement"], g["device"], g["dtype"]) == (gating_device, "cpu", "float32")  # CPU fallback here
        # what `moeray status` prints: the front end's status through the wire
        cluster = status_from_proto(status_to_proto(asyncio.run(DeploymentBackend(dep, 0).status())))
        gating = [a for a in cluster.actors if a.kind == "gating"]
        assert [(a.device, a.details["dtype"]) for a in gating] == [("cpu", "float32")]
        prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
        params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 2
        assert_teacher_forced(load_hf(fam), prompts, params, dep.generate(prompts, params))
    finally:
        dep.shutdown()
    wait_for(lambda: ray.available_resources().get(resource, 0.0) == 1.0, 30, what=f"the {resource} released")
