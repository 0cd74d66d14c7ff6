"""The expert-call failover state machine (engine/failover.py) against a fake backend on a virtual clock:
death, restart, transient errors, slowness and actor errors injected at every point of a call."""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
from dataclasses import dataclass, field

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.engine.failover import FailoverCaller, FailoverPolicy, Fault, Health
from moeray.engine.wire import scatter_rows
from moeray.router.table import RoutingTable

D = 4
LAYER = 1


class TransientError(Exception):
    pass


class GoneError(Exception):
    pass


@dataclass
class FakeActor:
    """Ray-like semantics. `killed_at`: the process dies then; calls in flight fail `notice_s` later; calls sent
    while it restarts wait until `restart_s` after the kill (never, if restart_s is None: dead for good)."""

    latency_s: float = 0.002
    killed_at: float | None = None
    restart_s: float | None = 1.0
    notice_s: float = 0.01
    transient: int = 0  # the first n sends fail as transient
    app_error: bool = False
    slow_from: float | None = None  # from then on every call takes slow_s
    slow_s: float = 5.0
    sent: int = 0


@dataclass
class FakeBackend:
    actors: dict[int, FakeActor]
    t: float = 0.0
    events: list = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)

    def now(self) -> float:
        return self.t

    def _at(self, t: float, fut, value=None, error=None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fut, value, error))

    def _answer_time(self, a: FakeActor, sent: float) -> tuple[float, BaseException | None]:
        lat = a.slow_s if a.slow_from is not None and sent >= a.slow_from else a.latency_s
        done = sent + lat
        if a.killed_at is None or done < a.killed_at:
            return done, None
        if sent < a.killed_at:  # in flight at the kill
            return a.killed_at + a.notice_s, GoneError("actor died")
        if a.restart_s is None:
            return sent + 0.001, GoneError("actor is dead")
        return max(sent, a.killed_at + a.restart_s) + lat, None

    def send(self, actor_id, layer, x_rows, batch):
        a = self.actors[actor_id]
        a.sent += 1
        fut = concurrent.futures.Future()
        if a.transient > 0:
            a.transient -= 1
            self._at(self.t + 0.001, fut, error=TransientError("unavailable"))
            return fut
        when, err = self._answer_time(a, self.t)
        if err is None and a.app_error:
            err = KeyError("experts not loaded here")
        out = torch.zeros(batch.num_rows, D)
        out.index_add_(0, batch.pair_rows, x_rows[batch.pair_rows].float() * (batch.weights * (batch.slot_ids + 1))
                       .unsqueeze(1).float())
        self._at(when, fut, value=out, error=err)
        return fut

    def probe(self, actor_id):
        a = self.actors[actor_id]
        fut = concurrent.futures.Future()
        when, err = self._answer_time(FakeActor(0.0005, a.killed_at, a.restart_s, a.notice_s), self.t)
        self._at(when, fut, value=actor_id, error=err)
        return fut

    def fault_of(self, error):
        if isinstance(error, TransientError):
            return Fault.TRANSIENT
        if isinstance(error, GoneError):
            return Fault.GONE
        return None

    def decode(self, answer):
        return answer

    def wait_any(self, futures, timeout_s):
        if not futures:  # as RayBackend: nothing to wait on, look again soon (a new handle may arrive)
            timeout_s = min(timeout_s, 0.05)
        limit = self.t + timeout_s
        while self.events and self.events[0][0] <= limit:
            t, _, fut, value, err = heapq.heappop(self.events)
            self.t = max(self.t, t)
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(value)
            if any(f.done() for f in futures):
                return
        self.t = max(self.t, limit)


def reference(x, ids, w):
    return (x.unsqueeze(1) * (w * (ids + 1)).unsqueeze(-1)).sum(1)  # [T, D]


def run_call(backend, table, x, ids, w, policy=None, caller=None):
    caller = caller or FailoverCaller(backend, policy or FailoverPolicy(call_timeout_s=10.0))
    call = caller.submit(LAYER, x, ids, w, table, torch.float32)
    batches, outs, failed = caller.wait(call, lambda: table, torch.float32)
    out = scatter_rows(x.shape[0], D, batches, outs, torch.float32)
    failed_rows = torch.unique(torch.cat([r for r, _ in failed])) if failed else torch.empty(0, dtype=torch.long)
    return caller, out, failed_rows, failed


def workload(t=12, e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, D, generator=g)
    ids = torch.rand(t, e, generator=g).topk(k).indices
    w = torch.rand(t, k, generator=g)
    return x, ids, w


def table(num_experts=4, groups=2, replicas=2):
    return RoutingTable.round_robin([LAYER], num_experts, groups, replicas=replicas)


def test_healthy_call_matches_reference_and_never_hedges():
    be = FakeBackend({0: FakeActor(), 1: FakeActor()})
    x, ids, w = workload()
    caller, out, failed, _ = run_call(be, table(), x, ids, w)
    assert failed.numel() == 0
    assert torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert caller.stats["hedges"] == caller.stats["failovers"] == 0


def test_primary_dies_mid_call_recovers_on_replica_within_notice():
    be = FakeBackend({0: FakeActor(latency_s=0.05, killed_at=0.01), 1: FakeActor()})
    x, ids, w = workload()
    caller, out, failed, _ = run_call(be, table(), x, ids, w)
    assert failed.numel() == 0
    assert torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert be.t < 0.1  # hedge at 50 ms or the death notice at 20 ms, not Ray's restart (1 s)
    assert caller.health.state(0) is Health.SUSPECT


def test_killed_actor_is_routed_around_by_the_next_call():
    be = FakeBackend({0: FakeActor(killed_at=0.0, restart_s=5.0), 1: FakeActor()})
    x, ids, w = workload()
    caller, _, _, _ = run_call(be, table(), x, ids, w)
    sent0 = be.actors[0].sent
    t0 = be.t
    run_call(be, table(), x, ids, w, caller=caller)
    assert be.actors[0].sent == sent0  # suspect: not sent to
    assert be.t - t0 < 0.01


def test_overdue_primary_is_hedged_first_answer_wins():
    be = FakeBackend({0: FakeActor(slow_from=0.0, slow_s=3.0), 1: FakeActor()})
    x, ids, w = workload()
    caller, out, failed, _ = run_call(be, table(), x, ids, w)
    assert failed.numel() == 0 and torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert caller.stats["hedges"] >= 1
    assert be.t < 0.1  # did not wait for the slow actor


def test_primary_killed_after_its_hedge_was_sent():
    """The issue-18 crash: the hedge is out, then the primary dies; the hedge's answer must be taken."""
    be = FakeBackend({0: FakeActor(latency_s=1.0, killed_at=0.08), 1: FakeActor(latency_s=0.04)})
    x, ids, w = workload()
    caller, out, failed, _ = run_call(be, table(), x, ids, w)
    assert failed.numel() == 0 and torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert caller.stats["hedges"] >= 1


def test_both_replicas_die_then_one_restarts():
    be = FakeBackend({0: FakeActor(killed_at=0.0, restart_s=0.5), 1: FakeActor(killed_at=0.0, restart_s=0.7)})
    x, ids, w = workload()
    caller, out, failed, _ = run_call(be, table(), x, ids, w)
    assert failed.numel() == 0 and torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert 0.5 <= be.t < 1.0


def test_no_live_replica_and_dead_for_good_fails_fast_only_those_rows():
    be = FakeBackend({0: FakeActor(killed_at=0.0, restart_s=None), 1: FakeActor()})
    t1 = table(replicas=1)  # expert e on actor e % 2
    x, ids, w = workload()
    caller, out, failed, why = run_call(be, t1, x, ids, w)
    needs0 = torch.nonzero(((ids % 2) == 0).any(1)).flatten()
    assert torch.equal(failed, needs0)
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    ok[needs0] = False
    assert torch.allclose(out[ok], reference(x, ids, w)[ok], atol=1e-6)
    assert be.t < 1.0  # not the 10 s call timeout
    assert "no live replica" in why[0][1]
    assert caller.health.state(0) is Health.DEAD
    # the next call fails the same rows at submit, without sending to the dead actor
    sent0 = be.actors[0].sent
    _, _, failed2, _ = run_call(be, t1, x, ids, w, caller=caller)
    assert torch.equal(failed2, needs0) and be.actors[0].sent == sent0


def test_dead_actor_replaced_within_the_grace_serves_its_rows():
    """With a controller, a dead actor's rows wait (dead_grace_s) for the replacement handle instead of failing."""
    be = FakeBackend({0: FakeActor(killed_at=0.0, restart_s=None), 1: FakeActor()})
    caller = FailoverCaller(be, FailoverPolicy(call_timeout_s=10.0, dead_grace_s=5.0))

    def replace(_f):
        be.actors[0] = FakeActor()
        caller.health.forget([0])

    marker = concurrent.futures.Future()
    marker.add_done_callback(replace)
    be._at(2.0, marker, value=None)
    x, ids, w = workload()
    _, out, failed, _ = run_call(be, table(replicas=1), x, ids, w, caller=caller)
    assert failed.numel() == 0 and torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert 2.0 <= be.t < 2.5


def test_dead_actor_not_replaced_fails_its_rows_when_the_grace_ends():
    be = FakeBackend({0: FakeActor(killed_at=0.0, restart_s=None), 1: FakeActor()})
    x, ids, w = workload()
    _, _, failed, why = run_call(be, table(replicas=1), x, ids, w, FailoverPolicy(call_timeout_s=10.0,
                                                                                 dead_grace_s=3.0))
    assert failed.numel() > 0 and "no live replica" in why[0][1]
    assert 3.0 <= be.t < 3.5


def test_transient_error_retries_the_same_actor():
    be = FakeBackend({0: FakeActor(transient=1), 1: FakeActor()})
    t1 = table(replicas=1)
    x, ids, w = workload()
    caller, out, failed, _ = run_call(be, t1, x, ids, w)
    assert failed.numel() == 0 and torch.allclose(out, reference(x, ids, w), atol=1e-6)
    assert caller.stats["transient_retries"] == 1
    assert caller.health.state(0) is not Health.DEAD


def test_actor_error_with_no_other_replica_fails_those_rows_with_its_message():
    be = FakeBackend({0: FakeActor(app_error=True), 1: FakeActor()})
    x, ids, w = workload()
    _, _, failed, why = run_call(be, table(replicas=1), x, ids, w)
    assert failed.numel() > 0 and "not loaded here" in why[0][1]


def test_deadline_bounds_a_call_to_a_hung_actor():
    be = FakeBackend({0: FakeActor(slow_from=0.0, slow_s=100.0), 1: FakeActor()})
    x, ids, w = workload()
    _, _, failed, why = run_call(be, table(replicas=1), x, ids, w, FailoverPolicy(call_timeout_s=2.0))
    assert failed.numel() > 0 and "within 2s" in why[0][1]
    assert 2.0 <= be.t < 2.2


fault = st.fixed_dictionaries({
    "kill": st.none() | st.floats(0.0, 0.3),
    "restart": st.none() | st.floats(0.05, 1.5),
    "transient": st.integers(0, 2),
    "slow": st.none() | st.floats(0.0, 0.2),
})


@settings(max_examples=150, deadline=None)
@given(faults=st.lists(fault, min_size=3, max_size=3), replicas=st.integers(1, 3), seed=st.integers(0, 1000),
       healthy=st.integers(-1, 2))
def test_random_faults_every_call_terminates_and_only_unservable_rows_fail(faults, replicas, seed, healthy):
    """Property: with faults at random points, a call ends before its deadline; every row it returns equals the
    reference; a row fails only if one of its experts had no replica that could answer (dead for good, or still
    restarting at the deadline); with one untouched actor holding every expert nothing fails and the call
    ends within a hedge delay of the fault."""
    actors = {}
    for a, f in enumerate(faults):
        actors[a] = FakeActor(killed_at=f["kill"], restart_s=f["restart"], transient=f["transient"],
                              slow_from=f["slow"], slow_s=4.0)
    if healthy >= 0:
        actors[healthy] = FakeActor()
    be = FakeBackend(actors)
    tab = table(num_experts=6, groups=3, replicas=replicas)
    x, ids, w = workload(t=10, e=6, k=2, seed=seed)
    timeout = 3.0
    caller, out, failed, why = run_call(be, tab, x, ids, w, FailoverPolicy(call_timeout_s=timeout))
    assert be.t <= timeout + 0.05
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    ok[failed] = False
    assert torch.allclose(out[ok], reference(x, ids, w)[ok], atol=1e-5)

    def can_answer(a: int) -> bool:
        f = actors[a]
        back = f.killed_at is None or (f.restart_s is not None and f.killed_at + f.restart_s + 0.3 < timeout)
        return back and f.slow_from is None  # a slow actor stays slow (4 s > the deadline) after a restart

    layer_slots = tab.layer_slots(LAYER)
    for r in failed.tolist():
        assert not all(any(can_answer(a) for a in layer_slots[e]) for e in ids[r].tolist()), (r, why)
    if healthy >= 0 and replicas == 3:
        assert failed.numel() == 0
        assert be.t < 0.4  # at most: death notice or hedge, then one answer from the healthy replica
