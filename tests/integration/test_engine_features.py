"""Engine features on Ray with one family: micro-batch overlap, preemption under a small KV budget, the local
transport, cancel freeing blocks, seeded sampling equal on both transports."""

import asyncio

import pytest
from support.teacher import assert_teacher_forced
from support.tiny_models import build, load_hf
from test_engine_ray import workload

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig

FAMILY = "deepseek_v3"


@pytest.fixture(scope="module")
def path():
    return str(build(FAMILY))


@pytest.fixture(scope="module")
def ray_dep(ray_session, path):
    dep = deploy(ServeConfig(dtype="float32", model=path, num_expert_groups=4, micro_batches=2, kv_cache_blocks=24,
                             max_num_batched_tokens=128))
    yield dep
    dep.shutdown()


@pytest.fixture(scope="module")
def local_dep(ray_session, path):
    dep = deploy(ServeConfig(dtype="float32", model=path, num_expert_groups=4, transport="local", kv_cache_blocks=256))
    yield dep
    dep.shutdown()


def test_micro_batches_and_preemption_pass_teacher_forcing(ray_dep):
    prompts, params = workload(seed=1)
    outs = ray_dep.generate(prompts, params)
    assert_teacher_forced(load_hf(FAMILY), prompts, params, outs)
    st = ray_dep.status()["gating"][0]
    assert st["preemptions"] > 0  # the 24-block budget forced recomputation
    assert st["free_blocks"] == 24


def test_request_over_kv_budget_rejected_while_others_continue(ray_dep):
    import pytest as _pytest

    from moeray.common.errors import RequestError

    with _pytest.raises(RequestError, match="request 1: .*needs 26 KV blocks .* has 24"):
        ray_dep.generate([[1, 2], [7] * 400], SamplingParams(max_tokens=8, temperature=0.0))

    async def run():
        ok = ray_dep.stream("ok-1", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        toks = [t async for d in ok for t in d.token_ids]
        bad = ray_dep.stream("bad-1", [7] * 400, SamplingParams(max_tokens=8, temperature=0.0))
        with _pytest.raises(Exception, match="KV blocks"):
            async for _ in bad:
                pass
        return toks

    assert len(asyncio.run(run())) == 6


def test_local_transport_passes_teacher_forcing(local_dep):
    prompts, params = workload(seed=2)
    outs = local_dep.generate(prompts, params)
    assert_teacher_forced(load_hf(FAMILY), prompts, params, outs)


def test_seeded_sampling_same_on_both_transports(ray_dep, local_dep):
    prompts = [[3, 4, 5, 6], [9, 8, 7]]
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_k=20, top_p=0.9, seed=s, ignore_eos=True)
              for s in (11, 12)]
    a = ray_dep.generate(prompts, params)
    b = local_dep.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = ray_dep.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in c]


def test_cancel_mid_stream_frees_blocks(local_dep):
    async def run():
        got = 0
        agen = local_dep.stream("cancel-me", list(range(1, 100)), SamplingParams(max_tokens=200, temperature=0.0,
                                                                                  ignore_eos=True))
        async for d in agen:
            got += len(d.token_ids)
            if got >= 3:
                break
        await agen.aclose()  # the stream's finally cancels the request
        return got

    assert asyncio.run(run()) >= 3
    assert local_dep.num_free_blocks() == [256]


def test_logprobs_and_stop_tokens(local_dep):
    out = local_dep.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0.0, logprobs=True,
                                                          ignore_eos=True))[0]
    assert len(out.logprobs) == 8 and all(lp <= 0 for lp in out.logprobs)
    stop = out.token_ids[2]
    out2 = local_dep.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop],
                                                           ignore_eos=True))[0]
    assert out2.finish_reason == "stop" and out2.token_ids[-1] == stop
    assert len(out2.token_ids) == out.token_ids.index(stop) + 1
