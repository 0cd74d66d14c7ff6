"""The vectorised sampler against a per-row reference of vLLM's semantics, and its draws against the distribution."""

from __future__ import annotations

import math

import pytest
import torch

from moeray.common.errors import RequestError
from moeray.common.sampling import SamplingParams
from moeray.engine.sampler import sample
from moeray.engine.sequence import Sequence

V = 50
EOS = [3]


def seq(params: SamplingParams, prompt=(1, 2, 3), output=(), rid="r") -> Sequence:
    return Sequence(rid, list(prompt), params, output_ids=list(output))


def reference_processed(row: torch.Tensor, s: Sequence) -> torch.Tensor:
    """One row, the slow obvious way (vLLM's order: repetition, frequency, presence, bias, min_tokens)."""
    p, x = s.params, row.clone().double()
    seen = set(s.prompt_ids) | set(s.output_ids)
    for t in seen:
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(s.output_ids):
        x[t] -= p.frequency_penalty * s.output_ids.count(t) + p.presence_penalty
    for t, b in p.logit_bias.items():
        x[t] += b
    if len(s.output_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | set(EOS):
            x[t] = float("-inf")
    return x


def test_greedy_fast_path_is_the_argmax():
    logits = torch.randn(7, V, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [seq(SamplingParams(temperature=0.0)) for _ in range(7)])
    assert out.tokens == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 7 and out.top_logprobs == [None] * 7


def test_mixed_batch_greedy_rows_match_the_per_row_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, V, generator=g) * 3
    outputs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (0, 5, 9, 12, 3, 20)]
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=1.5, max_tokens=32),
        SamplingParams(temperature=0.0, presence_penalty=2.0, max_tokens=32),
        SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=32),
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}, max_tokens=32),
        SamplingParams(temperature=0.0, min_tokens=8, stop_token_ids=[9], max_tokens=32),
        SamplingParams(temperature=0.0, repetition_penalty=0.5, frequency_penalty=-0.5, presence_penalty=0.3,
                       max_tokens=32),
    ]
    seqs = [seq(p, prompt=(1, 2, 40), output=o, rid=f"r{i}") for i, (p, o) in enumerate(zip(params, outputs))]
    out = sample(logits, seqs, eos_token_ids=EOS)
    want = [int(reference_processed(logits[i], s).argmax()) for i, s in enumerate(seqs)]
    assert out.tokens == want
    assert out.tokens[3] == 7


def test_penalties_change_what_greedy_picks():
    logits = torch.zeros(1, V)
    logits[0, 5] = 2.0
    logits[0, 6] = 1.9
    plain = sample(logits, [seq(SamplingParams(temperature=0.0), output=[5, 5])]).tokens
    freq = sample(logits, [seq(SamplingParams(temperature=0.0, frequency_penalty=0.1), output=[5, 5])]).tokens
    rep = sample(logits, [seq(SamplingParams(temperature=0.0, repetition_penalty=1.2), output=[5])]).tokens
    assert plain == [5] and freq == [6] and rep == [6]


def test_min_tokens_holds_back_eos_and_stop_ids():
    logits = torch.zeros(2, V)
    logits[:, 3] = 10.0  # EOS
    logits[:, 9] = 9.0  # a stop id
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    out = sample(logits, [seq(p, output=[1]), seq(p, output=[1, 1], rid="b")], eos_token_ids=EOS)
    assert out.tokens[0] not in (3, 9) and out.tokens[1] == 3


def test_mask_restricts_both_greedy_and_sampled_rows():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    allowed = torch.zeros(4, V, dtype=torch.bool)
    allowed[:, [10, 11, 12]] = True
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=2.0), SamplingParams(temperature=0.7, top_p=0.5)]
    for _ in range(20):
        out = sample(logits, [seq(p, rid=str(i)) for i, p in enumerate(params)], allowed)
        assert set(out.tokens) <= {10, 11, 12}
    assert out.tokens[0] == 10 + int(logits[0, 10:13].argmax())


def test_draws_follow_the_distribution():
    torch.manual_seed(0)
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5] + [-30.0] * (V - 5))
    n = 4000
    out = sample(row.expand(n, V), [seq(SamplingParams(temperature=1.0), rid=str(i)) for i in range(n)])
    freq = torch.bincount(torch.tensor(out.tokens), minlength=V).double() / n
    assert torch.allclose(freq, row.double().softmax(-1), atol=0.03)
    # seeded rows draw through the inverse CDF: the same distribution
    out = sample(row.expand(n, V), [seq(SamplingParams(temperature=1.0, seed=i), rid=str(i)) for i in range(n)])
    freq = torch.bincount(torch.tensor(out.tokens), minlength=V).double() / n
    assert torch.allclose(freq, row.double().softmax(-1), atol=0.03)
    # temperature 0.5 squares the odds
    out = sample(row.expand(n, V), [seq(SamplingParams(temperature=0.5), rid=str(i)) for i in range(n)])
    freq = torch.bincount(torch.tensor(out.tokens), minlength=V).double() / n
    assert torch.allclose(freq, (row.double() / 0.5).softmax(-1), atol=0.03)


@pytest.mark.parametrize("params,allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.75), {0, 1}),  # p = .563 .207 .076 .028 .126: .563 + .207 = .77 reaches .75
    (SamplingParams(top_p=0.8), {0, 1, 4}),
    (SamplingParams(min_p=0.3), {0, 1}),
    (SamplingParams(top_k=1, temperature=5.0), {0}),
    (SamplingParams(top_k=3, top_p=0.75), {0, 1}),  # top-p inside the top-k group
    (SamplingParams(top_k=4, min_p=0.3), {0, 1}),
    (SamplingParams(top_p=0.8, seed=9), {0, 1, 4}),  # seeded rows: the inverse CDF
])
def test_truncation(params, allowed):
    torch.manual_seed(1)
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5] + [-30.0] * (V - 5))
    n = 2000
    seqs = [seq(params, rid=str(i), output=[0] * (i % 300)) for i in range(n)]  # seeded: a different position each
    assert set(sample(row.expand(n, V), seqs).tokens) == allowed


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=g)
    p = SamplingParams(temperature=1.0, seed=42)
    a = sample(logits, [seq(p, rid="a"), seq(SamplingParams(), rid="b"), seq(p, rid="c")]).tokens
    b = sample(logits[[0]], [seq(p, rid="x")]).tokens
    assert a[0] == b[0]
    draws = {tuple(sample(logits, [seq(SamplingParams(seed=s), rid=str(i)) for i in range(3)]).tokens)
             for s in range(20)}
    assert len(draws) > 1  # different seeds, different draws


def test_logprobs_and_sorted_top_alternatives():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=g)
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=1.0, logprobs=True),
              SamplingParams(temperature=0.0)]
    out = sample(logits, [seq(p, rid=str(i)) for i, p in enumerate(params)])
    lp = logits.log_softmax(-1)
    assert math.isclose(out.logprobs[0], float(lp[0, out.tokens[0]]), rel_tol=1e-6)
    assert math.isclose(out.logprobs[1], float(lp[1, out.tokens[1]]), rel_tol=1e-6)
    assert out.logprobs[2] is None and out.top_logprobs[1] is None and out.top_logprobs[2] is None
    top = out.top_logprobs[0]
    assert len(top) == 5 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert [t for t, _ in top] == lp[0].topk(5).indices.tolist()
    assert top[0][0] == out.tokens[0]


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("min_p", 1.5),
    ("top_logprobs", 21), ("min_tokens", 99), ("logit_bias", {-1: 1.0}), ("logit_bias", {5: 200.0}),
    ("temperature", float("nan")), ("structured", {"kind": "yaml", "value": "x"}),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})
