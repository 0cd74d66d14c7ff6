"""router/fleet.py: the controller's pure state -- active table, health, membership, bounded history."""

from __future__ import annotations

import pytest

from moeray.router import fleet as fleet_mod
from moeray.router.fleet import FleetState
from moeray.router.table import NoReplicaError, RoutingTable


def make(replicas: int = 1) -> FleetState:
    table = RoutingTable.round_robin([1, 2], num_experts=4, num_groups=2, replicas=replicas)
    groups = {g: [a for a in table.actor_ids if a % 2 == g] for g in range(2)} if replicas > 1 else {0: [0], 1: [1]}
    return FleetState(table, groups, failure_threshold=2, wall_clock=lambda: 0.0)


def test_unhealthy_actor_is_routed_around_and_readmitted():
    f = make(replicas=2)
    v0 = f.active.version
    a = f.desired.actor_ids[0]
    assert f.record_ping(a, ok=False, gone=False, now=1.0) is None  # one failure is below the threshold
    assert f.record_ping(a, ok=False, gone=False, now=2.0) == "unhealthy"
    f.refresh_active()
    assert a not in f.active.actor_ids and f.active.version > v0
    assert f.record_ping(a, ok=True, gone=False, now=5.0) == "readmit"
    assert f.readmitted(a, now=5.0) == pytest.approx(3.0)
    f.refresh_active()
    assert a in f.active.actor_ids


def test_dead_actor_is_unhealthy_at_once():
    f = make(replicas=2)
    assert f.record_ping(0, ok=False, gone=True, now=1.0) == "unhealthy"


def test_last_replica_keeps_being_routed_while_unhealthy():
    f = make(replicas=1)
    f.record_ping(0, ok=False, gone=True, now=1.0)
    f.refresh_active()
    assert 0 in f.active.actor_ids  # no other replica: the transport waits for Ray's restart


def test_versions_only_grow_and_survive_persistence():
    f = make()
    for _ in range(3):
        f.refresh_active()
    g = FleetState.from_dict(f.to_dict())
    assert g.active.version == f.active.version
    g.refresh_active()
    assert g.active.version > f.active.version


def test_add_replica_is_pending_until_ready_then_routed():
    f = make()
    a = f.add_replica(0)
    assert a == 2 and f.groups[0] == [0, 2] and a in f.pending
    f.refresh_active()
    assert a not in f.active.actor_ids
    f.ready(a)
    f.refresh_active()
    assert a in f.active.actor_ids and f.desired.actor_slots(a) == f.desired.actor_slots(0)


def test_remove_refuses_the_last_replica():
    f = make()
    with pytest.raises(NoReplicaError):
        f.remove(0)
    a = f.add_replica(0)
    f.ready(a)
    f.remove(a)
    assert f.groups[0] == [0] and a not in f.desired.actor_ids


def test_busy_fraction_from_counter_deltas_and_restart():
    f = make()
    assert f.observe_stats(0, busy_s=1.0, uptime_s=10.0) is None  # first sample: no window yet
    assert f.observe_stats(0, busy_s=2.0, uptime_s=12.0) == pytest.approx(0.5)
    assert f.observe_stats(0, busy_s=0.1, uptime_s=1.0) is None  # restarted: counters went back
    stats = f.group_stats({0: 0.5, 1: 0.1})
    assert stats[0].busy_fraction == pytest.approx(0.5) and stats[1].busy_fraction == pytest.approx(0.1)


def test_events_and_recovery_times_are_bounded(monkeypatch):
    f = make(replicas=2)
    for i in range(fleet_mod.MAX_EVENTS + 50):
        f.event("tick", i=i)
    assert len(f.events) == fleet_mod.MAX_EVENTS and f.events[-1]["i"] == fleet_mod.MAX_EVENTS + 49
    for i in range(fleet_mod.MAX_RECOVERIES + 5):
        f.record_ping(0, ok=False, gone=True, now=float(i))
        f.record_ping(0, ok=True, gone=False, now=i + 0.5)
        f.readmitted(0, i + 0.5)
    assert len(f.recovery_s) == fleet_mod.MAX_RECOVERIES
