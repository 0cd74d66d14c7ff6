"""RoutingTable: constructors, what each actor loads, rerouting, derived versions, persistence."""

import json
import pickle

import msgpack
import pytest

from moeray.router.table import NoReplicaError, RoutingTable

LAYERS = [1, 3]  # decoder layers 0 and 2 are dense


def test_round_robin_spreads_experts_over_groups():
    table = RoutingTable.round_robin(LAYERS, num_experts=6, num_groups=3)
    assert table.layer_slots(3) == ((0,), (1,), (2,), (0,), (1,), (2,))
    assert table.actor_slots(1) == {1: [1, 4], 3: [1, 4]}
    assert (table.num_layers, table.num_experts, table.version) == (2, 6, 0)


def test_blocks_are_contiguous_and_nearly_equal():
    table = RoutingTable.blocks(LAYERS, num_experts=7, num_groups=3)
    sizes = [len(table.actor_slots(a)[1]) for a in table.actor_ids]
    assert table.actor_slots(0)[1] == [0, 1, 2]
    assert sorted(sizes) == [2, 2, 3]


def test_replicas_live_on_distinct_actors():
    table = RoutingTable.blocks(LAYERS, num_experts=4, num_groups=2, replicas=2)
    assert all(len(set(r)) == 2 for r in table.layer_slots(1))
    with pytest.raises(ValueError, match="replicas must be in"):
        RoutingTable.round_robin(LAYERS, 4, 2, replicas=3)


def test_without_reroutes_and_bumps_version():
    table = RoutingTable.round_robin(LAYERS, 4, num_groups=2, replicas=2)
    rerouted = table.without([1])
    assert rerouted.version == table.version + 1
    assert rerouted.actor_ids == (0,)
    assert all(r == (0,) for r in rerouted.layer_slots(3))


def test_without_last_replica_names_the_slot():
    table = RoutingTable.round_robin(LAYERS, 4, num_groups=2)
    with pytest.raises(NoReplicaError, match=r"layer 1, expert 1") as info:
        table.without([1])
    assert (info.value.layer, info.value.expert, info.value.lost) == (1, 1, (1,))


def test_with_actor_copies_a_group():
    table = RoutingTable.blocks(LAYERS, 4, num_groups=2).with_actor(7, like=1)
    assert table.actor_slots(7) == table.actor_slots(1) == {1: [2, 3], 3: [2, 3]}
    assert table.layer_slots(1)[2] == (1, 7)
    with pytest.raises(ValueError, match="already holds"):
        table.with_actor(7, like=0)


def test_with_replicas_replaces_only_named_slots():
    table = RoutingTable.blocks(LAYERS, 4, num_groups=2)
    moved = table.with_replicas({(3, 0): (1, 0)})
    assert moved.layer_slots(3)[0] == (1, 0)
    assert moved.layer_slots(1) == table.layer_slots(1)
    with pytest.raises(ValueError, match="layer 2, expert 0"):
        table.with_replicas({(2, 0): (0,)})


def test_added_and_removed_slots_tell_what_to_load():
    old = RoutingTable.blocks(LAYERS, 4, num_groups=2)
    new = old.with_replicas({(1, 0): (1,), (1, 3): (1, 0)})
    assert new.added_slots(old) == {0: {1: [3]}, 1: {1: [0]}}
    assert new.removed_slots(old) == {0: {1: [0]}}


def test_unknown_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"layer 0 is not a MoE layer.*\[1, 3\]"):
        RoutingTable.blocks(LAYERS, 4, 2).layer_slots(0)


def test_invalid_tables_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        RoutingTable(0, (1,), 2, (((0, 0), (1,)),))
    with pytest.raises(ValueError, match="lists 1 experts"):
        RoutingTable(0, (1,), 2, (((0,),),))
    with pytest.raises(ValueError, match="increasing"):
        RoutingTable(0, (3, 1), 1, (((0,),), ((0,),)))


def test_round_trips_through_json_msgpack_and_pickle():
    table = RoutingTable.blocks(LAYERS, 6, num_groups=3, replicas=2, version=4)
    assert RoutingTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    assert RoutingTable.from_dict(msgpack.unpackb(msgpack.packb(table.to_dict()))) == table
    restored = pickle.loads(pickle.dumps(table))
    assert restored == table and restored.layer_slots(3) == table.layer_slots(3)


def test_from_dict_rejects_unknown_keys():
    data = RoutingTable.blocks(LAYERS, 2, 1).to_dict() | {"extra": 1}
    with pytest.raises(ValueError, match="exactly the keys"):
        RoutingTable.from_dict(data)
