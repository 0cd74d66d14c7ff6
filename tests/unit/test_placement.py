"""EPLB placement: replica counts, equal slots per actor, distinct actors per expert, balance on skew."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.router.placement import (
    actor_loads,
    default_redundant,
    imbalance,
    pack_replicas,
    rebalance,
    replicate_experts,
)
from moeray.router.table import RoutingTable

NUM_LAYERS, NUM_EXPERTS, NUM_GROUPS = 4, 16, 4


def zipf_load(exponent: float = 1.2) -> torch.Tensor:
    """[L, E] Zipf token counts; the hot experts sit together in one block, a different block per layer."""
    ranked = 1000.0 / torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64) ** exponent  # [E]
    return torch.stack([ranked.roll(4 * layer) for layer in range(NUM_LAYERS)])  # [L, E]


@pytest.mark.parametrize("num_redundant", [4, 8])
def test_rebalance_fixes_skewed_load(num_redundant):
    load = zipf_load()
    before = imbalance(load, RoutingTable.blocks(list(range(NUM_LAYERS)), NUM_EXPERTS, NUM_GROUPS))
    table = rebalance(load, NUM_GROUPS, num_redundant).to_table(version=1)
    assert before >= 2.0
    assert imbalance(load, table) <= 1.3


@pytest.mark.parametrize("num_redundant", [0, 4, 8])
def test_every_expert_has_a_replica_and_actors_hold_equal_slots(num_redundant):
    placement = rebalance(zipf_load(), NUM_GROUPS, num_redundant)
    slots_per_actor = (NUM_EXPERTS + num_redundant) // NUM_GROUPS
    assert bool((placement.logcnt >= 1).all())
    assert placement.logcnt.sum(dim=1).tolist() == [NUM_EXPERTS + num_redundant] * NUM_LAYERS
    table = placement.to_table(version=0)
    for actor in table.actor_ids:
        assert [len(es) for es in table.actor_slots(actor).values()] == [slots_per_actor] * NUM_LAYERS


def test_maps_are_consistent():
    placement = rebalance(zipf_load(), NUM_GROUPS, 8, layer_ids=[1, 3, 5, 7], actor_ids=[20, 21, 22, 23])
    for layer in range(NUM_LAYERS):
        for expert in range(NUM_EXPERTS):
            slots = [s for s in placement.log2phy[layer, expert].tolist() if s >= 0]
            assert len(slots) == placement.logcnt[layer, expert]
            assert all(placement.phy2log[layer, s] == expert for s in slots)
    table = placement.to_table(version=3)
    assert table.layer_ids == (1, 3, 5, 7) and table.actor_ids == (20, 21, 22, 23)


def test_hottest_expert_gets_the_extra_replicas():
    load = torch.tensor([[10.0, 1.0, 1.0, 1.0]])
    assert replicate_experts(load, num_phy=6, max_replicas=3).tolist() == [[3, 1, 1, 1]]
    assert replicate_experts(load, num_phy=6, max_replicas=2).tolist() == [[2, 2, 1, 1]]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 10), st.integers(0, 12), st.integers(0, 2**16))
def test_random_loads_give_valid_tables(num_groups, num_experts, extra, seed):
    num_redundant = min(extra + (-(num_experts + extra)) % num_groups, num_experts * (num_groups - 1))
    if (num_experts + num_redundant) % num_groups:
        return  # no valid slot count for this draw
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 50, (2, num_experts), generator=g).double()
    table = rebalance(load, num_groups, num_redundant).to_table(version=0)  # validates: distinct replicas
    per_actor, _ = actor_loads(load, table)
    torch.testing.assert_close(per_actor.sum(dim=1), load.sum(dim=1))


def test_actor_loads_split_replicated_slots_evenly():
    table = RoutingTable(0, (0,), 2, (((0, 1), (1,)),))
    per_actor, actors = actor_loads(torch.tensor([[4.0, 2.0]]), table)
    assert actors == (0, 1) and per_actor.tolist() == [[2.0, 4.0]]
    assert imbalance(torch.tensor([[4.0, 2.0]]), table) == pytest.approx(4.0 / 3.0)


@pytest.mark.parametrize(("num_experts", "num_groups", "expected"), [(8, 4, 4), (8, 5, 7), (16, 3, 5), (1, 3, 2),
                                                                       (4, 1, 0)])
def test_default_redundant_fits_any_actor_count(num_experts, num_groups, expected):
    # the ops command's default after a scale to an actor count that does not divide the experts (8 on 5 actors
    # used to fail with "must be a multiple of num_groups=5")
    assert default_redundant(num_experts, num_groups) == expected
    load = torch.arange(1.0, num_experts + 1).repeat(2, 1)
    rebalance(load, num_groups, expected).to_table(version=0)


def test_invalid_slot_counts_suggest_a_fix():
    with pytest.raises(ValueError, match="try num_redundant=4"):
        rebalance(zipf_load(), NUM_GROUPS, 3)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance(-zipf_load(), NUM_GROUPS, 4)


def test_packing_never_puts_two_replicas_of_an_expert_on_one_actor():
    # greedy fills actor 1 with light experts 1-3 while actor 0 holds the heavy expert 0; the second
    # replica of expert 4 then only fits on actor 0, which has the first: packing swaps one item out
    load, logcnt = torch.tensor([100.0, 1.0, 1.0, 1.0, 2.0]), torch.tensor([1, 1, 1, 1, 2])
    phy2log = pack_replicas(load, logcnt, num_groups=2).tolist()
    actors = [set(phy2log[:3]), set(phy2log[3:])]
    assert all(4 in a and len(a) == 3 for a in actors)
    assert sorted(phy2log) == [0, 1, 2, 3, 4, 4]
