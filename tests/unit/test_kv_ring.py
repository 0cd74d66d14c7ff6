"""HashRing: balance with virtual nodes, distinct replicas, minimal movement on join and leave."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moeray.kvstore.ring import HashRing

NUM_SHARDS = 8
SHARDS = [f"kv-{i}" for i in range(NUM_SHARDS)]


@pytest.fixture(scope="module")
def keys() -> list[bytes]:
    rng = random.Random(0)
    return [rng.randbytes(16) for _ in range(20_000)]


def test_primaries_are_balanced_with_128_virtual_nodes(keys):
    ring = HashRing(SHARDS, num_virtual_nodes=128)
    load = Counter(ring.primary(k) for k in keys)
    assert set(load) == set(SHARDS)
    assert max(load.values()) / (len(keys) / NUM_SHARDS) <= 1.25


def test_replicas_are_balanced(keys):
    ring = HashRing(SHARDS, replication=2)
    load = Counter(s for k in keys for s in ring.owners(k))
    assert max(load.values()) / (2 * len(keys) / NUM_SHARDS) <= 1.25


def test_owners_are_r_distinct_shards_primary_first(keys):
    ring = HashRing(SHARDS, replication=3)
    for k in keys[:2000]:
        owners = ring.owners(k)
        assert len(owners) == 3 == len(set(owners))
        assert owners[0] == ring.primary(k)


def test_fewer_shards_than_replicas_gives_every_shard():
    ring = HashRing(["a", "b"], replication=3)
    assert sorted(ring.owners(b"k")) == ["a", "b"]


def test_a_joining_shard_takes_about_one_nth_of_keys_and_only_onto_itself(keys):
    ring = HashRing(SHARDS)
    before = {k: ring.owners(k) for k in keys}
    ring.add_shard("kv-new")
    n = len(ring)
    moved = 0
    for k in keys:
        after = ring.owners(k)
        if after[0] != before[k][0]:
            moved += 1
            assert after[0] == "kv-new"
        assert set(after) - set(before[k]) <= {"kv-new"}  # replica sets change only by admitting it
    assert moved / len(keys) <= 1.5 / n


def test_a_leaving_shard_moves_only_its_own_keys(keys):
    ring = HashRing(SHARDS)
    before = {k: ring.primary(k) for k in keys}
    ring.remove_shard("kv-3")
    assert all(ring.primary(k) == p for k, p in before.items() if p != "kv-3")


def test_placement_does_not_depend_on_insertion_order(keys):
    a, b = HashRing(SHARDS), HashRing(reversed(SHARDS))
    assert all(a.owners(k) == b.owners(k) for k in keys[:1000])


def test_membership_errors_are_clear():
    ring = HashRing(["a"])
    with pytest.raises(ValueError, match="already"):
        ring.add_shard("a")
    with pytest.raises(KeyError, match="not on the ring"):
        ring.remove_shard("b")
    ring.remove_shard("a")
    with pytest.raises(ValueError, match="no shards"):
        ring.owners(b"k")
