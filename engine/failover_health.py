"""Expert-call failover, part 1: the backend protocol, the policy and the shared actor health tracker (no Ray).
The state machine is moeray.engine.failover (which re-exports these names)."""

from __future__ import annotations

import enum
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moeray.router.dispatch import ActorBatch


class Fault(enum.Enum):
    GONE = "gone"  # the actor died (Ray may restart it)
    TRANSIENT = "transient"  # unreachable for a moment: the same actor may answer a retry
    TIMEOUT = "timeout"  # no answer in time


class Future(Protocol):
    def done(self) -> bool: ...
    def result(self, timeout: float | None = None) -> Any: ...
    def exception(self, timeout: float | None = None) -> BaseException | None: ...
    def add_done_callback(self, fn: Any) -> None: ...


class CallBackend(Protocol):
    """What the state machine needs from the expert actors."""

    def send(self, actor_id: int, layer: int, x_rows: torch.Tensor, batch: ActorBatch) -> Future:
        """Start `batch`'s pairs on actor_id: x_rows [M, D] are its rows (batch.token_ids) in the wire dtype."""

    def probe(self, actor_id: int) -> Future:
        """A health ping of the actor."""

    def fault_of(self, error: BaseException) -> Fault | None:
        """The fault a failed send/probe stands for; None for an error the actor's code raised."""

    def decode(self, answer: Any) -> torch.Tensor:
        """An answer -> [M, D] tensor."""

    def now(self) -> float: ...

    def wait_any(self, futures: Sequence[Future], timeout_s: float) -> None:
        """Block until one of `futures` is done or timeout_s passed."""


@dataclass(slots=True)
class FailoverPolicy:
    call_timeout_s: float = 60.0  # a task still unsettled this long after submit fails
    min_hedge_s: float = 0.05  # never hedge earlier than this after the send
    hedge_latency_factor: float = 4.0  # ... nor earlier than this many typical call latencies
    max_transient_retries: int = 3
    max_attempts: int = 8  # recoveries per task
    max_hedges: int = 12  # copies of overdue sends per task (never where the pairs already run)
    confirm_dead: int = 3  # consecutive failed probes that mark an actor dead
    reprobe_s: tuple[float, ...] = (0.05, 0.25)  # delays before the 2nd, 3rd, ... probe
    dead_grace_s: float = 0.0  # a dead actor's rows wait this long for a replacement handle (a controller's)


# ---- actor health ------------------------------------------------------------------------------------------
class Health(enum.Enum):
    LIVE = "live"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(slots=True)
class _Probe:
    state: Health = Health.SUSPECT
    future: Future | None = None
    failures: int = 0
    next_at: float = 0.0
    dead_at: float = 0.0


class ActorHealth:
    """The transport's own view of which actors answer (shared by every call; thread-safe)."""

    def __init__(self, backend: CallBackend, policy: FailoverPolicy) -> None:
        self.backend, self.policy = backend, policy
        self._probes: dict[int, _Probe] = {}  # absent = live
        self._lock = threading.Lock()

    def state(self, actor_id: int) -> Health:
        p = self._probes.get(actor_id)
        return Health.LIVE if p is None else p.state

    def unavailable(self) -> set[int]:
        return set(self._probes)

    def dead(self) -> set[int]:
        """Actors Ray reports dead for longer than the policy's grace (no replacement came): fail their rows."""
        now = self.backend.now() + 1e-6  # the wake-up for a grace's end may land a rounding error early
        return {a for a, p in list(self._probes.items())
                if p.state is Health.DEAD and p.dead_at + self.policy.dead_grace_s <= now}

    def suspect(self, actor_id: int) -> None:
        """Route new calls around actor_id until a probe answers."""
        with self._lock:
            if actor_id not in self._probes:
                self._probes[actor_id] = _Probe(next_at=self.backend.now())
        self.poll()

    def forget(self, actor_ids: Collection[int]) -> None:
        """New handles for these actors (a replacement): live again."""
        with self._lock:
            for a in actor_ids:
                self._probes.pop(a, None)

    def poll(self) -> None:
        """Advance every probe: start due ones, read finished ones."""
        now = self.backend.now()
        with self._lock:
            for a, p in list(self._probes.items()):
                if p.state is Health.DEAD:
                    continue
                if p.future is not None and p.future.done():
                    err = p.future.exception()
                    p.future = None
                    if err is None:
                        del self._probes[a]
                        continue
                    if self.backend.fault_of(err) is not Fault.TRANSIENT:
                        p.failures += 1
                    if p.failures >= self.policy.confirm_dead:
                        p.state, p.dead_at = Health.DEAD, now
                        continue
                    delays = self.policy.reprobe_s or (0.0,)
                    p.next_at = now + delays[min(max(p.failures - 1, 0), len(delays) - 1)]
                if p.future is None and now >= p.next_at:
                    p.future = self.backend.probe(a)

    def pending(self) -> tuple[list[Future], float | None]:
        """Probes in flight, and the earliest time a new probe is due (None when none is)."""
        futs, due = [], None
        for p in list(self._probes.values()):
            if p.future is not None:
                futs.append(p.future)
            elif p.state is Health.SUSPECT:
                due = p.next_at if due is None else min(due, p.next_at)
            elif p.dead_at + self.policy.dead_grace_s > self.backend.now():  # its grace ends then
                end = p.dead_at + self.policy.dead_grace_s
                due = end if due is None else min(due, end)
        return futs, due
