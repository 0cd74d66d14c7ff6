"""The data plane on Ray: expert actors hold their weights in the serving dtype on their device and say so in
status; fp32 stays exact, bf16 passes the tolerance check; an expert whose every replica is dead for good fails
its requests fast (not after the call timeout)."""

import time

import pytest
import ray
import torch
from support.teacher import assert_teacher_forced, hf_logits
from support.tiny_models import build, load_hf

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
from moeray.common.errors import BackendUnavailableError

FAMILY = "qwen3_moe"


def workload(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    return prompts, [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * n


def make(dtype):
    return deploy(ServeConfig(model=str(build(FAMILY)), dtype=dtype, num_expert_groups=2, kv_cache_blocks=128,
                              controller=False, expert_num_cpus=0.25, expert_call_timeout_s=60.0))


@pytest.fixture(scope="module")
def deps(ray_session):
    d = {"float32": make("float32"), "bfloat16": make("bfloat16")}
    yield d
    for dep in d.values():
        dep.shutdown()


def test_status_lists_device_dtype_and_weight_bytes(deps):
    st32, st16 = deps["float32"].status(), deps["bfloat16"].status()
    for st, dtype in ((st32, "float32"), (st16, "bfloat16")):
        assert [e["dtype"] for e in st["experts"]] == [dtype, dtype]
        assert all(e["device"] == "cpu" and e["node_id"] for e in st["experts"])
        assert st["gating"][0]["device"] == "cpu"
    b32 = sorted(e["weight_bytes"] for e in st32["experts"])
    b16 = sorted(e["weight_bytes"] for e in st16["experts"])
    assert all(abs(h / f - 0.5) < 0.02 for h, f in zip(b16, b32, strict=True)), (b16, b32)


def test_fp32_deployment_is_exact(deps):
    prompts, params = workload()
    outs = deps["float32"].generate(prompts, params)
    assert_teacher_forced(load_hf(FAMILY), prompts, params, outs)


def test_bf16_deployment_within_tolerance(deps):
    """>= 90% of teacher-forced positions: the emitted token's reference logit within 5e-2 of the max."""
    prompts, params = workload()
    outs = deps["bfloat16"].generate(prompts, params)
    hf = load_hf(FAMILY)
    gaps = []
    for p, o in zip(prompts, outs, strict=True):
        assert len(o.token_ids) == 16
        ref = hf_logits(hf, p + o.token_ids)
        gaps += [float(ref[len(p) - 1 + i].max() - ref[len(p) - 1 + i][t]) for i, t in enumerate(o.token_ids)]
    agree = sum(g <= 5e-2 for g in gaps) / len(gaps)
    print(f"bf16 agreement: {agree:.3f} of {len(gaps)} positions within 5e-2 (max gap {max(gaps):.3g})")
    assert agree >= 0.9


def test_expert_dead_for_good_fails_its_requests_fast(deps):
    dep = deps["float32"]
    ray.kill(dep.expert_actors[0], no_restart=True)
    prompts, params = workload(n=3)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="no live replica"):
        dep.generate(prompts, params)
    assert time.monotonic() - t0 < 15.0  # the call timeout is 60 s
