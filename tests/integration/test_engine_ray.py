"""The distributed engine on Ray: every family through 4 expert-group actors passes the teacher-forcing check;
cancel frees blocks; a request that can never fit is rejected up front; seeded sampling matches across
transports. One deployment per family, reused by the tests of that family."""

import pytest
import torch
from support.teacher import assert_teacher_forced, hf_logits, teacher_forcing_failures
from support.tiny_models import FAMILIES, build, load_hf

from moeray.actors.deploy import deploy
from moeray.common import SamplingParams
from moeray.common.config import ServeConfig
from moeray.common.errors import RequestError


def workload(n=16, seed=0, max_prompt=200, max_out=64):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (int(torch.randint(1, max_prompt + 1, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    outs = [int(torch.randint(1, max_out + 1, (1,), generator=g)) for _ in range(n)]
    return prompts, [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in outs]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dep(request, ray_session):
    fam = request.param
    dep = deploy(ServeConfig(dtype="float32", model=str(build(fam)), num_expert_groups=4, kv_cache_blocks=256,
                             max_num_batched_tokens=256, expert_num_cpus=0.25))
    yield fam, dep
    dep.shutdown()


def test_concurrent_requests_pass_teacher_forcing(family_dep):
    fam, dep = family_dep
    prompts, params = workload()
    outs = dep.generate(prompts, params)
    assert_teacher_forced(load_hf(fam), prompts, params, outs)
    assert dep.num_free_blocks() == [256]


def test_request_that_never_fits_is_rejected_up_front(family_dep):
    _, dep = family_dep
    with pytest.raises(RequestError, match="request 1: .*context of 512"):
        dep.generate([[1, 2, 3], [5] * 600], SamplingParams(max_tokens=8, temperature=0.0))
    # the deployment still serves
    out = dep.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_requests_arriving_mid_decode(family_dep):
    """A second wave is submitted while the first decodes: continuous batching joins them between steps."""
    import asyncio

    fam, dep = family_dep
    prompts, params = workload(n=6, seed=5, max_prompt=60, max_out=24)

    async def run():
        async def one(i, delay):
            await asyncio.sleep(delay)
            toks = []
            async for d in dep.stream(dep.new_request_id(), prompts[i], params[i]):
                toks += d.token_ids
            return toks
        return await asyncio.gather(*[one(i, 0.0 if i < 3 else 0.3) for i in range(6)])

    toks = asyncio.run(run())
    hf = load_hf(fam)
    for p, t in zip(prompts, toks, strict=True):
        assert teacher_forcing_failures(hf_logits(hf, p + t), len(p), t) == []


def test_python_api_returns_top_and_prompt_logprobs(family_dep):
    """Deployment.generate carries top_logprobs and prompt_logprobs (it used to drop them: only the front ends
    passed them on): the reference's log-softmax at each position, within 1e-4 in fp32."""
    fam, dep = family_dep
    prompt = [3, 9, 27, 81, 100, 7]
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3,
                        prompt_logprobs=2)
    (out,) = dep.generate([prompt], sp)
    lsm = torch.log_softmax(hf_logits(load_hf(fam), prompt + out.token_ids), dim=-1)  # [P + T, V]
    assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids) == 5
    for t, (tok, top) in enumerate(zip(out.token_ids, out.top_logprobs, strict=True)):
        row = lsm[len(prompt) - 1 + t]
        assert len(top) == 3 and top[0][0] == tok  # greedy: the sampled token is the most likely one
        for tid, lp in top:
            assert abs(lp - float(row[tid])) <= 1e-4
        assert abs(out.logprobs[t] - float(row[tok])) <= 1e-4
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        lp, rank, alts = out.prompt_logprobs[i]
        row = lsm[i - 1]
        assert abs(lp - float(row[prompt[i]])) <= 1e-4 and len(alts) == 2
        assert rank == 1 + int((row > row[prompt[i]]).sum())
