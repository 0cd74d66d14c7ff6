"""Controller policies, pure apart from their explicit state: actor health (routing around, restarting the hung)
and expert-group autoscaling.

Time is always passed in (`now`, seconds on any monotonic clock); nothing here reads a clock, sleeps or
does I/O, so tests drive the policies with a fake clock.

Autoscaling rule, per group with `current` replicas and measured `GroupStats`:
- hot:  busy_fraction > target_utilization;
- cold: busy_fraction < target_utilization * downscale_factor;
- a group hot without a break for upscale_delay_s scales up to max(current + 1,
  ceil(current * busy_fraction / target_utilization)); cold for downscale_delay_s scales down by one replica
  (a drain is costly: one at a time);
- no change within cooldown_s of the group's previous change; the hot/cold timers restart after a change;
- the result is clamped to [min_replicas, max_replicas]; a group outside the bounds is moved inside at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moeray.common.config import AutoscaleConfig  # the policy's input; config models live in common/

# ---- health ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ActorHealth:
    healthy: bool = True
    failures: int = 0  # consecutive failed pings
    successes: int = 0  # consecutive successful pings while unhealthy
    unhealthy_since: float | None = None


class HealthTracker:
    """Per-actor health from ping outcomes. An actor never reported on is healthy.

    Unhealthy after `failure_threshold` consecutive failed pings or a `died` event; healthy again after
    `recovery_successes` consecutive successful pings. The `record_*` methods mutate the tracker and return
    whether the actor's health flipped.
    """

    def __init__(self, failure_threshold: int = 3, recovery_successes: int = 2):
        if failure_threshold < 1 or recovery_successes < 1:
            raise ValueError(f"failure_threshold and recovery_successes must be >= 1, "
                             f"got {failure_threshold} and {recovery_successes}")
        self.failure_threshold = failure_threshold
        self.recovery_successes = recovery_successes
        self._actors: dict[int, _ActorHealth] = {}

    def record_success(self, actor_id: int, now: float) -> bool:
        state = self._actors.setdefault(actor_id, _ActorHealth())
        state.failures = 0
        if state.healthy:
            return False
        state.successes += 1
        if state.successes < self.recovery_successes:
            return False
        state.healthy, state.successes, state.unhealthy_since = True, 0, None
        return True

    def record_failure(self, actor_id: int, now: float) -> bool:
        """A ping timed out or raised."""
        state = self._actors.setdefault(actor_id, _ActorHealth())
        state.failures += 1
        state.successes = 0
        if state.healthy and state.failures >= self.failure_threshold:
            return self._mark_unhealthy(state, now)
        return False

    def record_died(self, actor_id: int, now: float) -> bool:
        """Ray reported the actor dead (it may come back restarted): unhealthy at once."""
        state = self._actors.setdefault(actor_id, _ActorHealth())
        state.successes = 0
        return self._mark_unhealthy(state, now) if state.healthy else False

    def forget(self, actor_id: int) -> None:
        """Drop an actor that was removed for good."""
        self._actors.pop(actor_id, None)

    def is_healthy(self, actor_id: int) -> bool:
        state = self._actors.get(actor_id)
        return state is None or state.healthy

    def unhealthy(self) -> frozenset[int]:
        """Actors to route around."""
        return frozenset(a for a, s in self._actors.items() if not s.healthy)

    def unhealthy_for_s(self, actor_id: int, now: float) -> float:
        """Seconds the actor has been unhealthy (0.0 if healthy): to decide when to replace it."""
        state = self._actors.get(actor_id)
        if state is None or state.unhealthy_since is None:
            return 0.0
        return now - state.unhealthy_since

    @staticmethod
    def _mark_unhealthy(state: _ActorHealth, now: float) -> bool:
        state.healthy, state.unhealthy_since = False, now
        return True


class HungWatch:
    """Which actors to restart as hung: alive for Ray (the caller checks that) but failing every ping for `after_s`
    (a stopped or deadlocked process, a stuck driver call). Ray restarts only processes that die, so such an
    actor would hold its calls until their deadline, forever with no replica. `record` returns True once per hang:
    after that kill the actor is restarting, and it is not killed again until a ping succeeded (a slow restart
    -- loading its weights -- is not a hang; a constructor that never ends is StartWatch's)."""

    def __init__(self, after_s: float) -> None:
        if after_s <= 0:
            raise ValueError(f"hung_restart_s must be > 0, got {after_s}")
        self.after_s = after_s
        self._failing_since: dict[Any, float] = {}
        self._restarting: set[Any] = set()

    def record(self, key: Any, ok: bool, now: float) -> bool:
        """One ping outcome of `key` at `now`; True: kill it now so Ray restarts it."""
        if ok:
            self._failing_since.pop(key, None)
            self._restarting.discard(key)
            return False
        if key in self._restarting:
            return False
        since = self._failing_since.setdefault(key, now)
        if now - since < self.after_s:
            return False
        self._restarting.add(key)
        return True

    def forget(self, key: Any) -> None:
        """An actor gone for good (being replaced): start afresh."""
        self._failing_since.pop(key, None)
        self._restarting.discard(key)


class StartWatch:
    """Constructors that never end: Ray restarts a process that dies, not one stuck in its actor's constructor (a
    hung read of the checkpoint), and reports such an actor as still starting, for good. `record(key, pid, now)`
    with the pid of the process running `key`'s constructor (0: not in it -- alive, or still waiting for a node,
    which is the autoscaler's to solve) returns True once per process after `after_s`: kill it."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._since: dict[Any, tuple[int, float, bool]] = {}  # key -> (pid, first seen, killed)

    def record(self, key: Any, pid: int, now: float) -> bool:
        if not pid:
            self._since.pop(key, None)
            return False
        seen = self._since.get(key)
        if seen is None or seen[0] != pid:  # a new process: its clock starts now
            self._since[key] = (pid, now, False)
            return False
        if seen[2] or now - seen[1] < self.after_s:
            return False
        self._since[key] = (pid, seen[1], True)
        return True


# ---- autoscaling ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One expert group's load over the last measurement window, averaged over its replicas."""

    busy_fraction: float  # share of wall time the group's actors spent computing, in [0, 1]


@dataclass(slots=True)
class _GroupTimer:
    hot_since: float | None = None
    cold_since: float | None = None
    last_change: float | None = None


@dataclass(slots=True)
class AutoscaleState:
    """What `decide_replicas` remembers between calls (it mutates this)."""

    groups: dict[int, _GroupTimer] = field(default_factory=dict)


def decide_replicas(
    config: AutoscaleConfig,
    group_stats: Mapping[int, GroupStats],
    current: Mapping[int, int],
    now: float,
    state: AutoscaleState,
) -> dict[int, int]:
    """Desired replicas for every group in `current` (group -> replicas running now).

    A group without stats keeps its count and its timers restart. Updates `state`: callers pass the same
    state object on every call and apply the returned counts (a change is recorded at `now`).
    """
    desired = {}
    for group, replicas in current.items():
        timer = state.groups.setdefault(group, _GroupTimer())
        target = _decide_group(config, group_stats.get(group), replicas, now, timer)
        if target != replicas:
            timer.hot_since = timer.cold_since = None
            timer.last_change = now
        desired[group] = target
    for group in set(state.groups) - set(current):
        del state.groups[group]
    return desired


def _decide_group(config: AutoscaleConfig, stats: GroupStats | None, replicas: int, now: float,
                  timer: _GroupTimer) -> int:
    # 1. bounds first: a group outside them moves inside at once
    bounded = min(max(replicas, config.min_replicas), config.max_replicas)
    if bounded != replicas:
        return bounded
    # 2. update the hot/cold timers
    if stats is None:
        timer.hot_since = timer.cold_since = None
        return replicas
    hot = stats.busy_fraction > config.target_utilization
    cold = stats.busy_fraction < config.target_utilization * config.downscale_factor
    timer.hot_since = (timer.hot_since if timer.hot_since is not None else now) if hot else None
    timer.cold_since = (timer.cold_since if timer.cold_since is not None else now) if cold else None
    # 3. respect the cool-down
    if timer.last_change is not None and now - timer.last_change < config.cooldown_s:
        return replicas
    # 4. act on a condition that has lasted its delay
    if timer.hot_since is not None and now - timer.hot_since >= config.upscale_delay_s:
        wanted = max(replicas + 1, math.ceil(replicas * stats.busy_fraction / config.target_utilization))
        return min(wanted, config.max_replicas)
    if timer.cold_since is not None and now - timer.cold_since >= config.downscale_delay_s:
        return max(replicas - 1, config.min_replicas)
    return replicas
