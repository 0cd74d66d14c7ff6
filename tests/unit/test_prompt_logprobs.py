"""prompt_logprobs in the engine: each prompt token's raw log-probability, its rank and the top-k alternatives,
against the reference model's log_softmax over the prompt (fp32, within 1e-4), through chunked prefill and
micro-batches, for a prompt whose blocks are in the prefix cache (such a request skips prefix reuse), and nothing
extra computed for requests that do not ask."""

import pytest
import torch
from support.tiny_models import build

from moeray.common import SamplingParams
from moeray.common.errors import RequestError
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.transport import LocalTransport
from moeray.models.reference import ReferenceModel
from moeray.router.table import RoutingTable

FAMILY = "qwen3_moe"
K = 3


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return ReferenceModel.from_pretrained(build(FAMILY), num_expert_groups=2)


def engine(ref, **kw) -> Engine:
    table = RoutingTable.round_robin(list(ref.cfg.moe_layers), ref.cfg.num_experts, 2)
    tr = LocalTransport(dict(enumerate(ref.groups)), table)
    return Engine(ref.dense, tr, EngineConfig(block_size=4, num_blocks=128, **kw))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_against_reference(ref, ids: list[int], got) -> None:
    """Slow reference: log_softmax of the whole prompt's logits; position i is predicted by row i - 1."""
    lps = torch.log_softmax(ref.forward(torch.tensor([ids]))[0].float(), dim=-1)
    assert len(got) == len(ids) and got[0] is None
    for i in range(1, len(ids)):
        lp, rank, top = got[i]
        row = lps[i - 1]
        assert abs(lp - float(row[ids[i]])) < 1e-4
        assert rank == int((row >= row[ids[i]]).sum())  # 1 = the most likely token
        want = row.topk(K)
        assert [t for t, _ in top] == want.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(top, want.values.tolist(), strict=True)) < 1e-4


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_prompt_logprobs_match_the_reference_through_chunked_prefill(ref, micro_batches):
    eng = engine(ref, max_num_batched_tokens=7, micro_batches=micro_batches)  # 19 tokens: chunks of <= 7
    prompts = [prompt(19, 1), prompt(5, 2)]
    params = [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=K),
              SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)]
    outs = eng.generate(prompts, params)
    check_against_reference(ref, prompts[0], outs[0].prompt_logprobs)
    assert outs[1].prompt_logprobs is None
    assert eng.stats["prefill_tokens"] == 24


def test_prompt_logprobs_of_a_cached_prefix_are_computed(ref):
    eng = engine(ref)
    ids = prompt(17, 3)
    warm = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0]
    assert warm.prompt_logprobs is None
    before = eng.stats["prefill_tokens"]
    again = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))[0]
    assert eng.stats["prefill_tokens"] - before == 1 and again.num_cached_tokens == 16  # 4 cached blocks reused
    before = eng.stats["prefill_tokens"]
    out = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=K))[0]
    assert eng.stats["prefill_tokens"] - before == len(ids)  # the whole prompt computed, not the cached blocks
    assert out.num_cached_tokens == 0
    check_against_reference(ref, ids, out.prompt_logprobs)
    assert out.token_ids == warm.token_ids == again.token_ids


def test_zero_alternatives_one_token_prompt_and_nothing_extra_without_the_field(ref):
    eng = engine(ref)
    out = eng.generate([prompt(6, 4)], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    assert out.prompt_logprobs[0] is None and all(top == [] for _, _, top in out.prompt_logprobs[1:])
    assert len(out.prompt_logprobs) == 6
    assert eng.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs == [None]
    eng.add_request("plain", prompt(9, 5), SamplingParams(max_tokens=2, temperature=0.0))
    eng.step()
    assert eng.runner.prompt_logits == {}


def test_prompt_logprobs_out_of_range_names_the_field():
    with pytest.raises(RequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_grpc_carries_prompt_logprobs_both_ways():
    from moeray.actors.frontend_core import TextDelta
    from moeray.actors.frontend_wire import request_to_dict, response_to_proto
    from moeray.clients import messages
    from moeray.common.api import ModelSpec, parse_generate_request, to_sampling_params

    spec = {"m": ModelSpec(name="m", max_context=64, vocab_size=256)}
    msg = messages.build_request([1, 2, 3], model="m", prompt_logprobs=2)
    assert to_sampling_params(parse_generate_request(request_to_dict(msg), spec)).prompt_logprobs == 2
    unset = messages.build_request([1, 2, 3], model="m")
    assert to_sampling_params(parse_generate_request(request_to_dict(unset), spec)).prompt_logprobs is None
    entries = [None, (-1.5, 3, [(7, -0.25), (9, -0.5)]), (-0.75, 1, [(3, -0.75), (7, -1.0)])]
    chunk = messages.chunk_from_proto(response_to_proto(TextDelta("r", "a", [5], prompt_logprobs=entries)))
    assert chunk.prompt_logprobs == entries
    assert messages.chunk_from_proto(response_to_proto(TextDelta("r", "a", [5]))).prompt_logprobs is None
