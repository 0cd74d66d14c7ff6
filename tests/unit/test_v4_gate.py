"""V4 routing and the indexer's canonical top-k, against naive references."""

import math

import pytest
import torch

from moeray.models.v4.indexer import topk_lowest_index
from moeray.router.gate_v4 import hash_topk, sqrtsoftplus, sqrtsoftplus_topk


def test_topk_breaks_ties_by_lowest_row():
    scores = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0]])
    assert topk_lowest_index(scores, 4).tolist() == [[1, 4, 0, 2]]


def test_topk_does_not_depend_on_invisible_rows():
    # the same visible scores with more masked (future) rows after them choose the same rows
    g = torch.Generator().manual_seed(0)
    visible = torch.relu(torch.randn(5, 9, generator=g)).round(decimals=1)  # many exact ties at 0 and .1 steps
    for extra in (0, 1, 7, 40):
        padded = torch.cat([visible, torch.full((5, extra), float("-inf"))], dim=1)
        assert torch.equal(topk_lowest_index(padded, 4), topk_lowest_index(visible, 4))


def test_topk_orders_strictly_by_score_then_row():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (20, 12), generator=g).float()
    got = topk_lowest_index(scores, 5)
    for row, ids in zip(scores.tolist(), got.tolist(), strict=True):
        naive = sorted(range(len(row)), key=lambda i: (-row[i], i))[:5]
        assert ids == naive


def test_sqrtsoftplus_is_sqrt_of_softplus():
    x = torch.tensor([-30.0, -1.0, 0.0, 2.0, 40.0])
    want = torch.tensor([math.sqrt(math.log1p(math.exp(v))) for v in x.tolist()])
    assert torch.allclose(sqrtsoftplus(x), want, rtol=1e-6, atol=1e-7)


def test_sqrtsoftplus_topk_matches_naive():
    g = torch.Generator().manual_seed(2)
    logits, bias = torch.randn(16, 8, generator=g), torch.rand(8, generator=g) * 0.3
    ids, w = sqrtsoftplus_topk(logits, bias, k=3, scaling=1.5)
    for t in range(16):
        s = [math.sqrt(math.log1p(math.exp(v))) for v in logits[t].tolist()]
        chosen = sorted(range(8), key=lambda e: -(s[e] + bias[e].item()))[:3]
        assert sorted(ids[t].tolist()) == sorted(chosen)
        total = sum(s[e] for e in chosen)
        got = dict(zip(ids[t].tolist(), w[t].tolist(), strict=True))
        for e in chosen:
            assert got[e] == pytest.approx(1.5 * s[e] / total, rel=1e-5)


def test_correction_bias_changes_choice_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids, w = sqrtsoftplus_topk(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), k=2, scaling=1.0)
    assert sorted(ids[0].tolist()) == [0, 3]
    s = sqrtsoftplus(logits)[0]
    got = dict(zip(ids[0].tolist(), w[0].tolist(), strict=True))
    assert got[3] == pytest.approx((s[3] / (s[0] + s[3])).item(), rel=1e-6)


def test_hash_routing_takes_experts_from_the_table():
    g = torch.Generator().manual_seed(3)
    tid2eid = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10)])  # [V=10, K=2]
    tokens = torch.tensor([3, 3, 7, 0])
    logits = torch.randn(4, 6, generator=g)
    ids, w = hash_topk(logits, tid2eid, tokens, scaling=2.0)
    assert torch.equal(ids, tid2eid[tokens])
    s = sqrtsoftplus(logits)
    want = s.gather(1, ids) / s.gather(1, ids).sum(-1, keepdim=True) * 2.0
    assert torch.allclose(w, want, rtol=1e-6)
    assert not torch.equal(w[0], w[1])  # same token, same experts, weights from each row's own scores


def test_hash_routing_needs_one_token_per_row():
    with pytest.raises(ValueError, match="one token id per row"):
        hash_topk(torch.zeros(3, 4), torch.zeros(5, 2, dtype=torch.long), torch.tensor([1, 2]), 1.0)
