"""ShardStore: LRU order, capacity, pinning, statistics, and the disk tier's handling of bad files."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moeray.kvstore.errors import BlockPinnedError, BlockTooLargeError, StoreFullError
from moeray.kvstore.store import ShardStore


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def value(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


def filled(n: int, capacity: int = 300, **kwargs) -> ShardStore:
    store = ShardStore(capacity, **kwargs)
    for i in range(n):
        store.put(key(i), value(i))
    return store


def test_put_get_contains_delete():
    store = filled(2)
    assert store.get(key(0)) == value(0) and store.contains(key(1))
    assert store.delete(key(0)) is True
    assert store.get(key(0)) is None and not store.contains(key(0))
    assert store.delete(key(0)) is False


def test_keys_lists_memory_then_disk(tmp_path):
    store = filled(4, spill_dir=tmp_path)  # 0 spilled
    assert store.keys() == [key(1), key(2), key(3), key(0)]


def test_least_recently_used_block_is_evicted_first():
    store = filled(3)  # 0, 1, 2 fill 300 bytes
    store.get(key(0))  # now 1 is the least recently used
    store.put(key(3), value(3))
    assert [store.contains(key(i)) for i in range(4)] == [True, False, True, True]


def test_contains_does_not_refresh_recency():
    store = filled(3)
    store.contains(key(0))
    store.put(key(3), value(3))
    assert not store.contains(key(0))


def test_a_block_larger_than_the_shard_is_rejected_and_nothing_changes():
    store = filled(3)
    with pytest.raises(BlockTooLargeError, match="capacity"):
        store.put(key(9), value(9, 301))
    assert len(store) == 3 and store.stats().evictions == 0


def test_pinned_blocks_are_never_evicted():
    store = filled(3)
    store.pin(key(0))
    for i in range(3, 10):
        store.put(key(i), value(i))
    assert store.get(key(0)) == value(0)
    store.unpin(key(0))
    for i in range(10, 13):  # key 0 is most recently used: three more puts push it out
        store.put(key(i), value(i))
    assert not store.contains(key(0))


def test_pins_count():
    store = filled(3)
    store.pin(key(0))
    store.pin(key(0))
    store.unpin(key(0))
    with pytest.raises(BlockPinnedError):
        store.delete(key(0))
    store.unpin(key(0))
    assert store.delete(key(0))


def test_no_room_beside_pinned_blocks_raises_store_full_and_changes_nothing():
    store = filled(3)
    for i in range(3):
        store.pin(key(i))
    with pytest.raises(StoreFullError, match="pinned"):
        store.put(key(3), value(3))
    assert len(store) == 3 and not store.contains(key(3))


def test_pin_and_unpin_of_unknown_blocks_raise_key_error():
    store = filled(1)
    with pytest.raises(KeyError):
        store.pin(key(5))
    with pytest.raises(KeyError):
        store.unpin(key(0))


def test_replacing_a_value_updates_bytes():
    store = filled(1)
    store.put(key(0), value(0, 50))
    assert store.get(key(0)) == value(0, 50) and store.stats().bytes == 50


def test_statistics_count_hits_misses_and_evictions():
    store = filled(4)  # 0 evicted
    store.get(key(1))
    store.get(key(0))
    s = store.stats()
    assert (s.hits, s.misses, s.evictions, s.spills, s.num_blocks, s.bytes) == (1, 1, 1, 0, 3, 300)


def test_evicted_blocks_spill_to_disk_and_come_back(tmp_path):
    store = filled(5, spill_dir=tmp_path)  # 0 and 1 spilled
    assert store.stats().spills == 2 and store.contains(key(0))
    assert store.get(key(0)) == value(0)
    s = store.stats()
    assert (s.disk_hits, s.num_blocks, s.bytes) == (1, 3, 300)
    assert not (tmp_path / (key(0).hex() + ".kvb")).exists()  # promoted: the file is gone


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete"])
def test_a_bad_spill_file_is_a_miss_and_is_removed(tmp_path, damage):
    store = filled(4, spill_dir=tmp_path)  # 0 spilled
    path = tmp_path / (key(0).hex() + ".kvb")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    assert store.get(key(0)) is None
    assert store.stats().misses == 1 and store.stats().corrupt == (damage != "delete")
    assert not path.exists() and not store.contains(key(0))


def test_a_spill_file_holding_another_key_is_a_miss(tmp_path):
    store = filled(5, spill_dir=tmp_path)  # 0 and 1 spilled
    (tmp_path / (key(1).hex() + ".kvb")).replace(tmp_path / (key(0).hex() + ".kvb"))
    assert store.get(key(0)) is None and store.stats().corrupt == 1


def test_disk_tier_respects_its_capacity(tmp_path):
    store = filled(10, spill_dir=tmp_path, spill_capacity_bytes=3 * 200)  # spill files are ~150 bytes
    s = store.stats()
    assert s.disk_bytes <= 600 and s.disk_evictions > 0
    assert s.disk_blocks == len(list(tmp_path.glob("*.kvb")))


def test_a_new_store_adopts_the_spill_files_it_finds(tmp_path):
    filled(5, spill_dir=tmp_path)
    store = ShardStore(300, spill_dir=tmp_path)
    assert store.get(key(1)) == value(1)


class StoreMachine(RuleBasedStateMachine):
    """Random put/get/pin/unpin/delete against a dict model. Without a disk tier a block may vanish (None)
    but is never wrong; with an unbounded one nothing acknowledged is ever lost."""

    spill = False
    CAPACITY = 1000

    def __init__(self) -> None:
        super().__init__()
        self.spill_dir = tempfile.mkdtemp() if self.spill else None
        self.store = ShardStore(self.CAPACITY, spill_dir=self.spill_dir)
        self.model: dict[bytes, bytes] = {}
        self.pins: dict[bytes, int] = {}

    def teardown(self) -> None:
        if self.spill_dir:
            shutil.rmtree(self.spill_dir)

    @rule(i=st.integers(0, 9), size=st.integers(1, 1200))
    def put(self, i, size):
        pinned = sum(len(self.model[k]) for k in self.pins if k != key(i))
        try:
            self.store.put(key(i), value(i, size))
        except BlockTooLargeError:
            assert size > self.CAPACITY
            return
        except StoreFullError:
            assert pinned + size > self.CAPACITY
            return
        self.model[key(i)] = value(i, size)

    @rule(i=st.integers(0, 9))
    def get(self, i):
        got = self.store.get(key(i))
        if self.spill or key(i) in self.pins:
            assert got == self.model.get(key(i))
        else:
            assert got in (None, self.model.get(key(i)))

    @rule(i=st.integers(0, 9))
    def pin(self, i):
        try:
            self.store.pin(key(i))
        except (KeyError, StoreFullError):
            return
        self.pins[key(i)] = self.pins.get(key(i), 0) + 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        k = data.draw(st.sampled_from(sorted(self.pins)))
        self.store.unpin(k)
        self.pins[k] -= 1
        if not self.pins[k]:
            del self.pins[k]

    @rule(i=st.integers(0, 9))
    def delete(self, i):
        if key(i) in self.pins:
            with pytest.raises(BlockPinnedError):
                self.store.delete(key(i))
            return
        self.store.delete(key(i))
        self.model.pop(key(i), None)

    @invariant()
    def capacity_never_exceeded(self):
        assert self.store.stats().bytes <= self.CAPACITY

    @invariant()
    def pinned_blocks_stay(self):
        for k in self.pins:
            assert self.store.contains(k)


class SpillingStoreMachine(StoreMachine):
    spill = True


_settings = settings(max_examples=40, stateful_step_count=30, deadline=None, derandomize=True)
TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = _settings
TestSpillingStoreMachine = SpillingStoreMachine.TestCase
TestSpillingStoreMachine.settings = _settings
