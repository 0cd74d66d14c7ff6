"""The expert call over Ray Direct Transport (actors/rdt.py, one-sided NIXL) on CPU actors, forced with
`tensor_transport: nixl` (a test/diagnostic setting: the same code path a GPU deployment takes, CPU memory over
UCX): fp32 layer answers bit-equal to the object-store transport, logits within 1e-4, tokens pass the
teacher-forcing check, a dead expert still fails its rows fast; `auto` keeps CPU deployments on the object store."""

import time

import pytest
import ray
import torch
from support.teacher import assert_teacher_forced
from support.tiny_models import build, load_hf

from moeray.actors.deploy import deploy
from moeray.actors.rdt import RdtTransport, nixl_installed, resolve_tensor_transport
from moeray.actors.transport import RayTransport
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
from moeray.common.errors import BackendUnavailableError, ConfigError

FAMILY = "qwen3_moe"
pytestmark = pytest.mark.skipif(not nixl_installed(), reason="NIXL is not installed (pip install 'moeray[rdt]')")


def make(tensor_transport):
    return deploy(ServeConfig(model=str(build(FAMILY)), dtype="float32", num_expert_groups=2, kv_cache_blocks=128,
                              controller=False, expert_num_cpus=0.25, expert_call_timeout_s=120.0,
                              tensor_transport=tensor_transport, namespace=f"moeray-rdt-{tensor_transport}"))


@pytest.fixture(scope="module")
def deps(ray_session):
    d = {"object_store": make("object_store"), "nixl": make("nixl")}
    yield d
    for dep in d.values():
        dep.shutdown()


def workload(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True)
    return prompts, [sp] * n


def test_auto_keeps_cpu_on_the_socket_and_forced_nixl_is_used(deps):
    assert resolve_tensor_transport("auto", "ray", "cpu", "cpu") == "socket"
    assert resolve_tensor_transport("auto", "ray", "cpu", "gpu") == "socket"  # gating on CPU
    assert resolve_tensor_transport("auto", "ray", "cuda", "npu") == "socket"  # no RDT transport for NPUs
    assert resolve_tensor_transport("object_store", "ray", "cuda", "gpu") == "object_store"
    assert resolve_tensor_transport("auto", "ray", "cuda", "gpu") == "nixl"
    assert resolve_tensor_transport("nixl", "local", "cpu", "cpu") == "object_store"
    assert deps["nixl"].status()["gating"][0]["tensor_transport"] == "nixl"
    assert deps["object_store"].status()["gating"][0]["tensor_transport"] == "object_store"


def test_forced_nixl_without_nixl_names_the_option(monkeypatch):
    import moeray.actors.rdt as rdt

    monkeypatch.setattr(rdt, "nixl_installed", lambda: False)
    with pytest.raises(ConfigError, match="tensor_transport"):
        rdt.resolve_tensor_transport("nixl", "ray", "cpu", "cpu")


def test_layer_answers_identical_to_the_object_store(deps):
    """One MoE layer from this process through both transports against the same expert actors: bit-equal."""
    dep = deps["nixl"]
    cfg, table = dep.model_cfg, dep.table
    layer = list(cfg.moe_layers)[0]
    g = torch.Generator().manual_seed(0)
    for t in (1, 16, 64):
        x = torch.randn(t, cfg.hidden_size, generator=g)
        ids = torch.rand(t, cfg.num_experts, generator=g).topk(cfg.num_experts_per_tok).indices
        w = torch.softmax(torch.rand(ids.shape, generator=g), dim=-1)
        # NIXL on CPU over UCX is slow (hundreds of ms per call on a loaded 2-core box): a generous deadline
        outs = [tr.wait(tr.submit(layer, x, ids, w)) for tr in (
            RayTransport(dict(dep.expert_actors), table, call_timeout_s=120.0),
            RdtTransport(dict(dep.expert_actors), table, call_timeout_s=120.0))]
        assert torch.equal(outs[0], outs[1]), (t, float((outs[0] - outs[1]).abs().max()))
        assert float(outs[1].abs().sum()) > 0


def test_fp32_logits_match_the_object_store_and_teacher_forced(deps):
    """Same tokens; each token's log-probability (log-softmax of the logits) within the protocol's 1e-4. Not
    bit-equal across two deployments: which requests share a step depends on arrival timing, and fp32 GEMMs of
    other batch shapes round differently (the layer test above is bit-equal)."""
    prompts, params = workload()
    ref = deps["object_store"].generate(prompts, params)
    got = deps["nixl"].generate(prompts, params)
    diffs = []
    for r, o in zip(ref, got, strict=True):
        assert o.token_ids == r.token_ids
        assert len(o.logprobs) == len(r.logprobs) == len(o.token_ids)
        diffs += [abs(a - b) for a, b in zip(o.logprobs, r.logprobs, strict=True)]
    print(f"nixl vs object store: max |logprob diff| {max(diffs):.3g} over {len(diffs)} tokens")
    assert max(diffs) <= 1e-4
    assert_teacher_forced(load_hf(FAMILY), prompts, params, got)


def test_expert_dead_for_good_fails_its_requests_fast(deps):
    dep = deps["nixl"]
    ray.kill(dep.expert_actors[0], no_restart=True)
    prompts, params = workload(n=2)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="no live replica"):
        dep.generate(prompts, params)
    assert time.monotonic() - t0 < 30.0  # the call timeout is 120 s
