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

import torch

from moeray.engine.failover_health import (  # noqa: F401 (re-exported: the public names live here)
    ActorHealth,
    CallBackend,
    FailoverPolicy,
    Fault,
    Future,
    Health,
)
from moeray.engine.failover_task import ExpertCall, Send, Task, plan_pairs, servable  # noqa: F401 (re-exported)
from moeray.router.dispatch import ActorBatch, plan_dispatch
from moeray.router.table import NoReplicaError, RoutingTable


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
