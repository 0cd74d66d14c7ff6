"""actors/gating_buffers.py: deltas wait for their poller, and nothing grows when nobody polls."""

from __future__ import annotations

from moeray.actors.gating_buffers import DeltaBuffers
from moeray.common.sampling import StepDelta


def d(rid: str, ids=(1,), finish=None) -> StepDelta:
    return StepDelta(rid, list(ids), None, finish)


def test_deltas_are_taken_once_and_finished_requests_close():
    b = DeltaBuffers()
    b.open("a")
    b.add(d("a", [1]), now=0.0)
    b.add(d("a", [2]), now=0.0)
    assert [x.token_ids for x in b.take("a")] == [[1], [2]]
    assert b.take("a") == []
    b.add(d("a", [3], "length"), now=1.0)
    assert b.take("a")[-1].finish_reason == "length"
    assert b.take("a") is None and "a" not in b


def test_cancelled_requests_are_remembered_not_buffered():
    b = DeltaBuffers(max_cancelled=2)
    for rid in "abc":
        b.open(rid)
        b.add(StepDelta(rid, [], None, "cancelled"), now=0.0)
    assert len(b) == 0
    assert not b.was_cancelled("a") and b.was_cancelled("b") and b.was_cancelled("c")


def test_finished_buffers_nobody_polls_are_dropped_after_the_ttl():
    b = DeltaBuffers(unpolled_ttl_s=10.0)
    b.open("old")
    b.add(d("old", finish="stop"), now=0.0)
    b.open("new")
    b.add(d("new", finish="stop"), now=11.0)  # evicts what finished more than 10 s ago
    assert "old" not in b and "new" in b and b.num_dropped == 1


def test_at_most_max_finished_unpolled_buffers():
    b = DeltaBuffers(max_finished=100)
    for i in range(1000):
        b.open(f"r{i}")
        b.add(d(f"r{i}", finish="length"), now=0.0)
    assert len(b) == 100 and "r999" in b and "r0" not in b


def test_running_requests_are_never_dropped():
    b = DeltaBuffers(max_finished=1, unpolled_ttl_s=0.0)
    b.open("running")
    b.add(d("running"), now=0.0)
    for i in range(10):
        b.open(f"f{i}")
        b.add(d(f"f{i}", finish="stop"), now=100.0 + i)
    assert b.take("running") != []
