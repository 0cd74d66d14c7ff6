"""Expert-call failover as a small state machine over an abstract backend (no Ray; the Ray binding is
moeray.actors.transport, the unit tests drive it with a fake backend and a virtual clock).

One MoE layer's call is a set of *tasks*, one per target actor of the dispatch plan. A task is settled when one
of its *attempts* (the primary send, a hedge, a recovery) has answered for all of its pairs, or failed when
none can. Per task:

    RUNNING --all sends of an attempt answered------------------------------> DONE
    RUNNING --overdue (hedge_after_s) and a replica is live: send a hedge----> RUNNING (first answer wins)
    RUNNING --a send failed: actor GONE -> suspect it, re-plan elsewhere------> RUNNING (a recovery attempt)
            --a send failed: TRANSIENT -> resend to the same actor, and hedge at once if a replica is live
            --the actor's own error -> re-plan without that actor for this task
    RUNNING --nothing in flight, no live replica, some replica suspect--------> WAITING (its probe decides)
    any     --every replica of a needed expert DEAD, or the call deadline----> FAILED (only these rows)

Actor health is shared by all calls (`ActorHealth`): an actor whose call failed or ran overdue is *suspect*
(routed around by new calls) and probed with `ping` (answered in its own concurrency group, so a busy actor
answers at once; a restarting one answers when it is back); a successful probe makes it live again; probes
that fail `confirm_dead` times in a row mark it *dead* (Ray reports it gone for good): rows needing it fail
fast instead of waiting for the deadline.
Legend: T = tokens, K = choices per token, D = hidden, P = pairs.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from moeray.router.dispatch import ActorBatch, live_replicas, plan_dispatch
from moeray.router.table import NoReplicaError, RoutingTable


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


# ---- one call --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Send:
    """One actor call in flight for some of a task's pairs."""

    batch: ActorBatch  # token_ids in layer rows
    pairs: torch.Tensor  # [p] indices into the task's pairs
    future: Future
    sent_at: float
    hedge_at: float  # when to send a copy elsewhere if still unanswered (backs off after each copy)
    hedges: int = 0
    answered_at: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Task:
    """One target actor's share of the layer: pairs (layer row, expert id, weight). Settled when every pair is
    covered by an accepted answer or lost (no replica could compute it)."""

    rows: torch.Tensor  # [P] layer rows of the pairs
    expert_ids: torch.Tensor  # [P]
    weights: torch.Tensor  # [P]
    sends: list[Send]
    first_sent_at: float
    covered: torch.Tensor = None  # [P] bool
    lost: torch.Tensor = None  # [P] bool
    accepted: list[tuple[ActorBatch, torch.Tensor]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # why pairs were lost
    note: str | None = None  # the last fault an attempt met
    faulted: bool = False
    transient_retries: int = 0
    recoveries: int = 0
    hedges: int = 0
    answered_at: float = 0.0
    bad: set[int] = field(default_factory=set)  # actors whose own code failed these pairs
    tried: set[int] = field(default_factory=set)  # actors sent some of these pairs (hedges go elsewhere)
    settled: bool = False  # kept by refresh(): every pair covered or lost
    recheck: bool = False  # some pairs may be in flight nowhere (a send failed or a duplicate was dropped)

    def __post_init__(self) -> None:
        p = self.rows.numel()
        self.covered = torch.zeros(p, dtype=torch.bool)
        self.lost = torch.zeros(p, dtype=torch.bool)

    def refresh(self) -> None:
        self.settled = bool((self.covered | self.lost).all())


@dataclass(slots=True)
class ExpertCall:
    layer: int
    x: torch.Tensor  # [T, D] the layer input (kept for hedges and recoveries)
    tasks: list[Task]
    deadline: float
    submitted_at: float
    failed: list[tuple[torch.Tensor, str]] = field(default_factory=list)  # (layer rows, why) failed at submit


def plan_pairs(rows: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               layer_slots: Sequence[Sequence[int]], excluded: Collection[int],
               layer: int) -> list[tuple[ActorBatch, torch.Tensor]]:
    """Plan pairs (rows [P] in layer rows, expert_ids [P], weights [P]) over the live replicas: pair p goes to
    replica rows[p] % n of its expert (the rule of router.dispatch). -> (batch, indices of its pairs [p]) per
    actor. Raises NoReplicaError."""
    if rows.numel() == 0:
        return []
    replica_ids, num_live = live_replicas(layer_slots, excluded)  # [E, R], [E]
    n = num_live[expert_ids]
    if bool((n == 0).any()):
        e = int(expert_ids[n == 0][0])
        raise NoReplicaError(layer, e, layer_slots[e])
    actor = replica_ids[expert_ids, rows % n]  # [P]
    order = torch.argsort(actor, stable=True)
    actors, counts = torch.unique_consecutive(actor[order], return_counts=True)
    out = []
    for a, idx in zip(actors.tolist(), torch.split(order, counts.tolist()), strict=True):
        token_ids, pair_rows = torch.unique(rows[idx], sorted=True, return_inverse=True)
        out.append((ActorBatch(a, token_ids, pair_rows, expert_ids[idx], weights[idx]), idx))
    return out


def servable(expert_ids: torch.Tensor, layer_slots: Sequence[Sequence[int]], excluded: Collection[int]) -> torch.Tensor:
    """[P] bool: pairs whose expert has a replica outside `excluded`."""
    _, num_live = live_replicas(layer_slots, excluded)
    return num_live[expert_ids] > 0


class FailoverCaller:
    """Runs expert calls through `backend` with hedging, recovery and fail-fast (see the module docstring).
    `pack(x, batches, dtype)` -> one row buffer per batch (moeray.engine.wire.pack_rows)."""

    def __init__(self, backend: CallBackend, policy: FailoverPolicy | None = None, pack=None) -> None:
        from moeray.engine.wire import pack_rows

        self.backend = backend
        self.policy = policy or FailoverPolicy()
        self.pack = pack or pack_rows
        self.health = ActorHealth(backend, self.policy)
        self.latency_s = 0.0  # EWMA of answered calls (send -> answer)
        self.stats: dict[str, float] = {"calls": 0, "failovers": 0, "hedges": 0, "transient_retries": 0,
                                        "failed_rows": 0, "last_stall_s": 0.0, "max_stall_s": 0.0,
                                        "call_s": 0.0, "wait_s": 0.0}

    def hedge_after_s(self) -> float:
        """How long a send may run before a copy goes to another replica: a few typical call latencies."""
        return max(self.policy.min_hedge_s, self.policy.hedge_latency_factor * self.latency_s)

    # ---- submit ------------------------------------------------------------------------------------------
    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, table: RoutingTable,
               wire_dtype: torch.dtype) -> ExpertCall:
        """Plan (around unavailable actors where possible) and send one call per target actor."""
        now = self.backend.now()
        self.health.poll()
        call = ExpertCall(layer, x, [], now + self.policy.call_timeout_s, now)
        batches = self._plan_primary(layer, ids, weights, table.layer_slots(layer), call)
        for b, xr in zip(batches, self.pack(x, batches, wire_dtype), strict=True):
            t = Task(b.token_ids[b.pair_rows], b.slot_ids, b.weights, [], now)
            t.sends.append(self._send(call, b, torch.arange(b.num_pairs), xr))
            t.tried.add(b.actor_id)
            call.tasks.append(t)
        self.stats["calls"] += len(batches)
        return call

    def _plan_primary(self, layer: int, ids: torch.Tensor, weights: torch.Tensor, slots,
                      call: ExpertCall) -> list[ActorBatch]:
        try:
            return plan_dispatch(ids, weights, slots, self.health.unavailable(), layer=layer)
        except NoReplicaError:
            pass
        dead = self.health.dead()
        try:  # a suspect actor may be restarting: its call waits in Ray's queue until it is back
            return plan_dispatch(ids, weights, slots, dead, layer=layer)
        except NoReplicaError:
            pass
        rows = torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1])
        flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
        keep = servable(flat_ids, slots, dead)
        call.failed.append((torch.unique(rows[~keep]), _dead_msg(layer, flat_ids[~keep], slots)))
        return [b for b, _ in plan_pairs(rows[keep], flat_ids[keep], flat_w[keep], slots, dead, layer)]

    def _send(self, call: ExpertCall, b: ActorBatch, pairs: torch.Tensor, x_rows: torch.Tensor,
              hedge_now: bool = False) -> Send:
        now = self.backend.now()
        s = Send(b, pairs, self.backend.send(b.actor_id, call.layer, x_rows, b), now,
                 now if hedge_now else now + self.hedge_after_s())
        s.future.add_done_callback(lambda _f: s.answered_at.append(self.backend.now()))
        return s

    def _start(self, call: ExpertCall, t: Task, plan: list[tuple[ActorBatch, torch.Tensor]], wire_dtype) -> None:
        """Send planned sub-batches (pair indices local to `plan`'s input) for task t."""
        batches = [b for b, _ in plan]
        for (b, pairs), xr in zip(plan, self.pack(call.x, batches, wire_dtype), strict=True):
            t.sends.append(self._send(call, b, pairs, xr))
            t.tried.add(b.actor_id)

    # ---- wait --------------------------------------------------------------------------------------------
    def wait(self, call: ExpertCall, table_of, wire_dtype: torch.dtype):
        """Drive every task until settled. `table_of()` -> the current RoutingTable (re-read on each recovery:
        the controller may have routed around a lost actor meanwhile). Returns (batches, outputs, failed):
        the accepted answers and a list of (layer rows, why) that could not be computed."""
        t0 = self.backend.now()
        while True:
            self.health.poll()
            open_tasks = [t for t in call.tasks if not t.settled]
            for t in open_tasks:
                self._advance(call, t, table_of, wire_dtype)
            open_tasks = [t for t in open_tasks if not t.settled]
            if not open_tasks:
                break
            futs = [s.future for t in open_tasks for s in t.sends]
            if any(f.done() for f in futs):
                continue  # answers arrived meanwhile: read them first
            probes, probe_due = self.health.pending()
            wake = min([call.deadline, *(s.hedge_at for t in open_tasks for s in t.sends)]
                       + ([probe_due] if probe_due is not None else []))
            self.backend.wait_any(futs + probes, max(0.0, wake - self.backend.now()))
        end = self.backend.now()
        self.stats["wait_s"] += end - t0
        batches, outs, failed = [], [], list(call.failed)
        for t in call.tasks:
            for b, o in t.accepted:
                batches.append(b)
                outs.append(o)
            if bool(t.lost.any()):
                failed.append((torch.unique(t.rows[t.lost]), "; ".join(dict.fromkeys(t.errors)) or "failed"))
        done_at = max((t.answered_at for t in call.tasks if t.accepted), default=end)
        self.stats["call_s"] += max(0.0, min(done_at, end) - call.submitted_at)
        self.stats["failed_rows"] += sum(int(r.numel()) for r, _ in failed)
        return batches, outs, failed

    def _advance(self, call: ExpertCall, t: Task, table_of, wire_dtype) -> None:
        now = self.backend.now()
        # 1. read finished sends: take an answer whose pairs are all still open, drop a duplicate
        finished = [s for s in t.sends if s.future.done()]
        for s in finished:
            t.sends.remove(s)
            err = s.future.exception()
            if err is not None:
                self._on_error(call, t, s, err, wire_dtype)
                t.recheck = True
            elif not bool(t.covered[s.pairs].any()):
                t.covered[s.pairs] = True
                t.accepted.append((s.batch, self.backend.decode(s.future.result())))
                self._observe(t, s, now)
            else:
                t.recheck = True  # a duplicate: its other pairs may run nowhere else
        if finished:
            t.refresh()
        if t.settled:
            return
        # 2. out of time: every open pair is lost
        if now >= call.deadline:
            t.lost |= ~t.covered
            t.errors.append(f"layer {call.layer}: no answer within {self.policy.call_timeout_s:.0f}s"
                            + (f" (last: {t.note})" if t.note else ""))
            t.refresh()
            return
        # 3. pairs nobody is computing: recover them on live replicas (or wait for a suspect one, or fail fast)
        if t.recheck or not t.sends:
            inflight = torch.zeros_like(t.covered)
            for s in t.sends:
                inflight[s.pairs] = True
            orphans = torch.nonzero(~t.covered & ~t.lost & ~inflight).flatten()
            t.recheck = False
            if orphans.numel():
                self._recover(call, t, orphans, table_of(), wire_dtype)
                t.refresh()
                if t.settled:
                    return
        # 4. overdue sends: a copy of their open pairs to another replica
        for s in list(t.sends):
            if now >= s.hedge_at:
                self._hedge(call, t, s, table_of(), wire_dtype)

    def _observe(self, t: Task, s: Send, now: float) -> None:
        answered = max(s.answered_at, default=now)
        t.answered_at = max(t.answered_at, answered)
        if not t.faulted and t.hedges == 0:
            dt = answered - s.sent_at
            self.latency_s = dt if not self.latency_s else 0.9 * self.latency_s + 0.1 * dt
        elif t.settled:
            stall = answered - t.first_sent_at
            self.stats["last_stall_s"] = stall
            self.stats["max_stall_s"] = max(self.stats["max_stall_s"], stall)

    def _on_error(self, call: ExpertCall, t: Task, s: Send, err: BaseException, wire_dtype) -> None:
        actor = s.batch.actor_id
        t.faulted = True
        fault = self.backend.fault_of(err)
        if fault is None:  # the actor's own error (e.g. a slot it no longer holds): not this actor for these pairs
            t.bad.add(actor)
            t.note = f"layer {call.layer}: expert actor {actor} failed: {type(err).__name__}: {err}"
            return
        t.note = f"layer {call.layer}: expert actor {actor}: {fault.value} ({type(err).__name__})"
        self.health.suspect(actor)
        if fault is Fault.TRANSIENT and t.transient_retries < self.policy.max_transient_retries:
            # retry the same actor; the calls are stateless, so a copy on a replica (at once) costs only compute
            t.transient_retries += 1
            self.stats["transient_retries"] += 1
            xr = self.pack(call.x, [s.batch], wire_dtype)[0]
            t.sends.append(self._send(call, s.batch, s.pairs, xr, hedge_now=True))

    def _recover(self, call: ExpertCall, t: Task, idx: torch.Tensor, table: RoutingTable, wire_dtype) -> None:
        slots = table.layer_slots(call.layer)
        if t.recoveries >= self.policy.max_attempts:
            t.lost[idx] = True
            t.errors.append(f"gave up after {t.recoveries} recoveries; last: {t.note}")
            return
        # pairs whose every replica is dead (or failed them itself): lost now, not at the deadline
        ok = servable(t.expert_ids[idx], slots, self.health.dead() | t.bad)
        if not bool(ok.all()):
            gone = idx[~ok]
            t.lost[gone] = True
            t.errors.append(t.note if t.bad and t.note else _dead_msg(call.layer, t.expert_ids[gone], slots))
            idx = idx[ok]
        # plan what a live replica can take; the rest waits for a suspect actor's probe
        ready = servable(t.expert_ids[idx], slots, self.health.unavailable() | t.bad)
        t.recheck = not bool(ready.all())  # the rest waits: look again on the next pass
        idx = idx[ready]
        if not idx.numel():
            return
        plan = plan_pairs(t.rows[idx], t.expert_ids[idx], t.weights[idx], slots,
                          self.health.unavailable() | t.bad, call.layer)
        t.recoveries += 1
        self.stats["failovers"] += 1
        self._start(call, t, [(b, idx[p]) for b, p in plan], wire_dtype)

    def _hedge(self, call: ExpertCall, t: Task, s: Send, table: RoutingTable, wire_dtype) -> None:
        self.health.suspect(s.batch.actor_id)  # overdue: new calls avoid it until it answers a ping
        s.hedges += 1
        s.hedge_at = self.backend.now() + self.hedge_after_s() * 2 ** s.hedges  # if this copy is slow too
        idx = s.pairs[~t.covered[s.pairs]]
        if t.hedges >= self.policy.max_hedges or not idx.numel():
            return
        slots = table.layer_slots(call.layer)
        excluded = self.health.unavailable() | t.bad | {x.batch.actor_id for x in t.sends}  # not where it runs
        if bool(servable(t.expert_ids[idx], slots, excluded | t.tried).all()):
            excluded |= t.tried  # prefer actors that have not had these pairs yet
        idx = idx[servable(t.expert_ids[idx], slots, excluded)]
        if not idx.numel():  # nowhere else to send now: look again later (a replica may come back)
            return
        plan = plan_pairs(t.rows[idx], t.expert_ids[idx], t.weights[idx], slots, excluded, call.layer)
        t.hedges += 1
        self.stats["hedges"] += 1
        self._start(call, t, [(b, idx[p]) for b, p in plan], wire_dtype)


def _dead_msg(layer: int, expert_ids: torch.Tensor, slots) -> str:
    experts = sorted(set(expert_ids.tolist()))
    holders = sorted({a for e in experts for a in slots[e]})
    return f"layer {layer}: experts {experts} have no live replica (actors {holders} are dead)"
