"""FleetState: what the controller knows about its expert actors, pure (no Ray, no clock: `now` is passed in).

    desired   the routing table the controller wants (every replica, healthy or not)
    active    what gating actors route by: desired minus unhealthy and not-yet-ready actors (a slot whose
              every replica is unhealthy keeps them: the transport waits for Ray's restart)
    groups    expert group -> its replica actor ids; `pinned` groups (an operator's `scale`) are not autoscaled
    pending   new or replacement actors not ready yet
    events    the last MAX_EVENTS things that happened; `recovery_s` the last MAX_RECOVERIES recovery times

Every change that gating actors must see bumps `active.version` (versions never go backwards, across a restart
too: `to_dict`/`from_dict` persist them). The controller actor (actors/controller.py) drives this with pings,
stats and operator commands, one change at a time.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from moeray.router.policy import GroupStats, HealthTracker
from moeray.router.table import NoReplicaError, RoutingTable

MAX_EVENTS = 1000
MAX_RECOVERIES = 1000


class FleetState:
    def __init__(self, desired: RoutingTable, groups: dict[int, list[int]], failure_threshold: int = 2,
                 pinned: dict[int, int] | None = None, active_version: int = 0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.wall_clock = wall_clock  # stamps events only; every decision takes `now` from the caller
        self.desired = desired
        self.groups = {int(g): list(a) for g, a in groups.items()}
        self.pinned = {int(g): int(n) for g, n in (pinned or {}).items()}
        self.health = HealthTracker(failure_threshold=failure_threshold, recovery_successes=1)
        self.pending: set[int] = set()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self.recovery_s: collections.deque[float] = collections.deque(maxlen=MAX_RECOVERIES)
        self.next_id = max(desired.actor_ids, default=-1) + 1
        self.active = RoutingTable(max(desired.version, active_version), desired.layer_ids, desired.num_experts,
                                   desired.replicas)
        self._busy: dict[int, tuple[float, float]] = {}  # actor -> (busy_s, uptime_s) at the last stats
        self.busy_fraction: dict[int, float] = {}
        self._out_s: dict[int, float] = {}  # actor -> how long it was unhealthy, until `readmitted` reads it

    # ---- persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"table": self.desired.to_dict(), "groups": self.groups, "active_version": self.active.version,
                "pinned": self.pinned}

    @classmethod
    def from_dict(cls, data: dict[str, Any], failure_threshold: int = 2) -> FleetState:
        return cls(RoutingTable.from_dict(data["table"]), {int(g): a for g, a in data["groups"].items()},
                   failure_threshold, data.get("pinned"), int(data.get("active_version", 0)))

    # ---- the active table --------------------------------------------------------------------------------
    def refresh_active(self) -> RoutingTable:
        """Recompute `active` from `desired`, health and pending (always a new version)."""
        bad = self.health.unhealthy() | self.pending
        try:
            t = self.desired.without(bad) if bad else self.desired
        except NoReplicaError:
            t = self.desired.without({a for a in bad if self._removable(a)})
        self.active = RoutingTable(max(self.active.version + 1, t.version), t.layer_ids, t.num_experts, t.replicas)
        return self.active

    def _removable(self, a: int) -> bool:
        try:
            self.desired.without([a])
            return True
        except NoReplicaError:
            return False

    def group_of(self, a: int) -> int | None:
        return next((g for g, ids in self.groups.items() if a in ids), None)

    # ---- health --------------------------------------------------------------------------------------
    def record_ping(self, a: int, ok: bool, gone: bool, now: float) -> str | None:
        """Apply one ping outcome: "readmit" (healthy again), "unhealthy" (just flipped), or None."""
        was = self.health.is_healthy(a)
        if ok:
            out_s = self.health.unhealthy_for_s(a, now)  # read before the success clears it
            if self.health.record_success(a, now) and not was:
                self._out_s[a] = out_s
                return "readmit"
            return None
        flipped = self.health.record_died(a, now) if gone else self.health.record_failure(a, now)
        if flipped:
            self.event("unhealthy", actor=a, dead=gone)
            return "unhealthy"
        return None

    def readmitted(self, a: int, now: float) -> float:
        """Record a re-admission; returns how long the actor was out."""
        since = self._out_s.pop(a, self.health.unhealthy_for_s(a, now))
        self.recovery_s.append(since)
        self.event("readmitted", actor=a, unhealthy_s=round(since, 3))
        return since

    def ready(self, a: int) -> None:
        """A pending actor answered its first ping."""
        self.pending.discard(a)
        self.health.forget(a)
        self.event("ready", actor=a)

    # ---- membership ----------------------------------------------------------------------------------
    def add_replica(self, group: int) -> int:
        """A new actor id holding what the group's first replica holds; pending until ready."""
        a = self.next_id
        self.next_id += 1
        self.desired = self.desired.with_actor(a, like=self.groups[group][0])
        self.groups[group].append(a)
        self.pending.add(a)
        self.event("replica_added", group=group, actor=a)
        return a

    def remove(self, a: int) -> None:
        """Route around `a` for good (raises NoReplicaError when it holds the last replica of a slot)."""
        self.desired = self.desired.without([a])
        for members in self.groups.values():
            if a in members:
                members.remove(a)
        self.pending.discard(a)
        self.refresh_active()

    def forget(self, a: int) -> None:
        self.health.forget(a)
        self._busy.pop(a, None)
        self.busy_fraction.pop(a, None)
        self.event("replica_removed", actor=a)

    # ---- load ----------------------------------------------------------------------------------------
    def observe_stats(self, a: int, busy_s: float, uptime_s: float) -> float | None:
        """An actor's busy fraction since its previous stats (None on the first, or after it restarted)."""
        prev = self._busy.get(a)
        self._busy[a] = (busy_s, uptime_s)
        if prev is None or uptime_s <= prev[1]:
            return None
        frac = max(0.0, min(1.0, (busy_s - prev[0]) / (uptime_s - prev[1])))
        self.busy_fraction[a] = frac
        return frac

    def group_stats(self, fractions: dict[int, float]) -> dict[int, GroupStats]:
        """Mean busy fraction per group over the replicas measured this round."""
        per_group: dict[int, list[float]] = {}
        for a, f in fractions.items():
            g = self.group_of(a)
            if g is not None:
                per_group.setdefault(g, []).append(f)
        return {g: GroupStats(busy_fraction=sum(v) / len(v)) for g, v in per_group.items() if v}

    def scalable(self) -> dict[int, int]:
        """Replica counts of the groups autoscaling may change (not pinned by an operator)."""
        return {g: len(m) for g, m in self.groups.items() if g not in self.pinned}

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": self.wall_clock(), "event": kind, **fields})
