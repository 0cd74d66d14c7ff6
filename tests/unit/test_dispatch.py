"""dispatch -> expert compute -> combine equals the dense MoE computation; replica choice; errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.router.dispatch import ActorBatch, combine, gather_inputs, plan_dispatch
from moeray.router.table import NoReplicaError

D = 4  # hidden size of the toy experts


def expert_forward(weights: torch.Tensor, x_rows: torch.Tensor, batch: ActorBatch) -> torch.Tensor:
    """What an expert actor computes: out[m] = sum_p weights[p] * x_rows[pair_rows[p]] @ W[slot_ids[p]]."""
    y = torch.einsum("pd,pde->pe", x_rows[batch.pair_rows], weights[batch.slot_ids])  # [P, D]
    out = torch.zeros_like(x_rows)  # [M, D]
    return out.index_add_(0, batch.pair_rows, batch.weights.unsqueeze(1) * y)


def dense(weights: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * x[t] @ W[ids[t, k]] -> [T, D]."""
    y = torch.einsum("td,tkde->tke", x, weights[ids])  # [T, K, D]
    return (w.unsqueeze(-1) * y).sum(dim=1)


def run(x, expert_w, ids, w, layer_slots, excluded=None):
    batches = plan_dispatch(ids, w, layer_slots, excluded)
    outputs = [expert_forward(expert_w, gather_inputs(x, b), b) for b in batches]
    return batches, combine(x.shape[0], D, batches, outputs, dtype=x.dtype)


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 8))
    num_actors = draw(st.integers(1, 6))
    actor_pool = list(range(10, 10 + num_actors))  # ids need not start at 0
    spare = actor_pool[0]  # never excluded, so every slot keeps a live replica
    excluded = set(draw(st.lists(st.sampled_from(actor_pool[1:]), unique=True))) if num_actors > 1 else set()
    layer_slots = []
    for _ in range(num_experts):
        replicas = draw(st.lists(st.sampled_from(actor_pool), min_size=1, max_size=num_actors, unique=True))
        if all(a in excluded for a in replicas):
            replicas.append(spare)
        layer_slots.append(tuple(replicas))
    num_tokens = draw(st.integers(0, 40))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return num_experts, num_tokens, k, layer_slots, excluded, seed


@settings(max_examples=60, deadline=None, derandomize=True)
@given(routings())
def test_dispatch_compute_combine_equals_dense(case):
    num_experts, num_tokens, k, layer_slots, excluded, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, D, generator=g, dtype=torch.float64)
    expert_w = torch.randn(num_experts, D, D, generator=g, dtype=torch.float64)
    ids = torch.randint(0, num_experts, (num_tokens, k), generator=g)
    w = torch.rand(num_tokens, k, generator=g, dtype=torch.float64)

    batches, out = run(x, expert_w, ids, w, layer_slots, excluded)

    torch.testing.assert_close(out, dense(expert_w, x, ids, w), rtol=1e-12, atol=1e-12)
    # every (token, choice) pair went to exactly one live actor that holds its expert
    sent = []
    for b in batches:
        assert b.actor_id not in excluded
        assert all(b.actor_id in layer_slots[e] for e in b.slot_ids.tolist())
        assert torch.equal(b.token_ids, torch.unique(b.token_ids))  # sorted and distinct
        assert b.pair_rows.unique().numel() == b.num_rows  # no row is sent without use
        tokens = b.token_ids[b.pair_rows].tolist()
        sent += list(zip(tokens, b.slot_ids.tolist(), b.weights.tolist(), strict=True))
    expected = [(t, int(ids[t, j]), float(w[t, j])) for t in range(num_tokens) for j in range(k)]
    assert sorted(sent) == sorted(expected)
    assert [b.actor_id for b in batches] == sorted({b.actor_id for b in batches})


def test_replicas_split_tokens_evenly():
    ids = torch.zeros(100, 1, dtype=torch.long)
    batches = plan_dispatch(ids, torch.ones(100, 1), [(3, 7)])
    assert [(b.actor_id, b.num_rows) for b in batches] == [(3, 50), (7, 50)]
    assert batches[0].token_ids.tolist() == list(range(0, 100, 2))


def test_group_replica_receives_whole_tokens():
    # two actors each hold every expert: a token's choices stay together, so no row is sent twice
    ids = torch.tensor([[0, 1], [2, 1], [1, 0], [2, 0]])
    batches = plan_dispatch(ids, torch.ones(4, 2), [(0, 1)] * 3)
    assert sum(b.num_rows for b in batches) == 4
    assert [b.num_pairs for b in batches] == [4, 4]


def test_excluded_actor_gets_nothing():
    ids = torch.arange(6).remainder(3).reshape(6, 1)
    batches = plan_dispatch(ids, torch.ones(6, 1), [(0, 1), (1, 2), (2, 1)], excluded={1})
    assert {b.actor_id for b in batches} == {0, 2}


def test_expert_without_live_replica_raises_naming_it():
    ids = torch.tensor([[0], [1]])
    with pytest.raises(NoReplicaError, match=r"layer 5, expert 1"):
        plan_dispatch(ids, torch.ones(2, 1), [(0,), (1,)], excluded={1}, layer=5)


def test_unrouted_expert_may_lack_replicas():
    batches = plan_dispatch(torch.tensor([[0]]), torch.ones(1, 1), [(0,), (1,)], excluded={1})
    assert [b.actor_id for b in batches] == [0]


def test_out_of_range_expert_id_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        plan_dispatch(torch.tensor([[2]]), torch.ones(1, 1), [(0,), (1,)])


def test_empty_batch_combines_to_zeros():
    batches = plan_dispatch(torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2), [(0,), (1,)])
    assert batches == []
    assert combine(0, D, batches, []).shape == (0, D)


def test_combine_rejects_wrong_output_shape():
    batches = plan_dispatch(torch.tensor([[0], [0]]), torch.ones(2, 1), [(0,)])
    with pytest.raises(ValueError, match="actor 0 returned shape"):
        combine(2, D, batches, [torch.zeros(1, D)])


@pytest.mark.parametrize("seed", range(6))
def test_host_plan_equals_the_torch_plan(seed):
    """plan_dispatch plans host routing in numpy (_plan_host), device routing in torch (_plan_torch): the same
    batches, bit for bit and dtype for dtype, with replicas, exclusions and weights of any float dtype."""
    from moeray.router.dispatch import _plan_host, _plan_torch

    g = torch.Generator().manual_seed(seed)
    num_experts, k = 8, 2
    tokens = [1, 3, 16, 64, 200, 5][seed]
    slots = [tuple(int(a) for a in torch.randperm(4, generator=g)[: 1 + (e + seed) % 3]) for e in range(num_experts)]
    ids = torch.rand(tokens, num_experts, generator=g).topk(k).indices
    weights = torch.rand(tokens, k, generator=g).to([torch.float32, torch.bfloat16][seed % 2])
    excluded = {seed % 4} if all(len([a for a in r if a != seed % 4]) for r in slots) else set()
    for slot_arg in (tuple(slots), [list(r) for r in slots]):  # cached (hashable) and uncached slots
        host = _plan_host(ids, weights, slot_arg, excluded, 0)
        ref = _plan_torch(ids, weights, slot_arg, excluded, 0)
        assert [b.actor_id for b in host] == [b.actor_id for b in ref]
        for a, b in zip(host, ref, strict=True):
            for name in ("token_ids", "pair_rows", "slot_ids", "weights"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and torch.equal(x, y), name
