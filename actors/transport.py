"""RayTransport: the engine's ExpertTransport over expert-group actors (one call per target actor per layer).

Failover: a call whose actor died is re-planned on the other live replicas of the same slots; if none is left,
the same actor is retried until Ray has restarted it (bounded by `call_timeout_s`). No request fails because
one expert actor was lost mid-step.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from moeray.actors.expert import as_tensor
from moeray.common.errors import ExpertUnavailableError
from moeray.engine.transport import ExpertLoad
from moeray.router.dispatch import ActorBatch, combine, gather_inputs, plan_dispatch
from moeray.router.table import NoReplicaError, RoutingTable

_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass(slots=True)
class _Call:
    layer: int
    x: torch.Tensor
    batches: list[ActorBatch]
    refs: list[Any]
    submitted: float = field(default_factory=time.perf_counter)


class RayTransport:
    def __init__(self, actors: dict[int, Any], table: RoutingTable, call_timeout_s: float = 60.0) -> None:
        self.actors, self.table = actors, table
        self.call_timeout_s = call_timeout_s
        self.excluded: set[int] = set()
        self.load = ExpertLoad()
        self.stats = {"calls": 0, "failovers": 0, "hedges": 0, "dispatch_s": 0.0, "wait_s": 0.0,
                      "last_stall_s": 0.0}
        self.min_hedge_s = 0.25
        self._latency_ewma_s = 0.0

    def set_table(self, table: RoutingTable) -> None:
        self.table = table

    def set_actors(self, actors: dict[int, Any]) -> None:
        self.actors = {**self.actors, **actors}  # keep handles of actors still finishing in-flight calls

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> _Call:
        t0 = time.perf_counter()
        self.load.add(layer, ids, self.table.num_experts)
        batches = plan_dispatch(ids, weights, self.table.layer_slots(layer), self.excluded, layer=layer)
        refs = [self._send(layer, x, b) for b in batches]
        self.stats["calls"] += len(refs)
        self.stats["dispatch_s"] += time.perf_counter() - t0
        return _Call(layer, x, batches, refs)

    def _send(self, layer: int, x: torch.Tensor, b: ActorBatch):
        return self.actors[b.actor_id].forward.remote(
            layer, gather_inputs(x, b).numpy(), b.pair_rows.numpy(), b.slot_ids.numpy(),
            b.weights.float().numpy())

    def wait(self, call: _Call) -> torch.Tensor:
        t0 = time.perf_counter()
        outs = [self._wait_one(call, b, ref) for b, ref in zip(call.batches, call.refs, strict=True)]
        self.stats["wait_s"] += time.perf_counter() - t0
        return combine(call.x.shape[0], call.x.shape[1], call.batches, outs, dtype=torch.float32)

    def _hedge_after_s(self) -> float:
        """How long past its submission a call may run before a copy is sent to another replica: many times
        the usual call latency (a lost actor's calls can take seconds to fail; a slow one is just slow)."""
        return max(self.min_hedge_s, 20.0 * self._latency_ewma_s)

    def _wait_one(self, call: _Call, b: ActorBatch, ref) -> torch.Tensor:
        fut = ref.future()
        try:
            left = call.submitted + self._hedge_after_s() - time.perf_counter()
            out = as_tensor(fut.result(timeout=max(left, 0.0)))
            self._observe_latency(time.perf_counter() - call.submitted)
            return out
        except concurrent.futures.TimeoutError:
            pass
        except _DEAD + (GetTimeoutError,):
            return self._recover(call, b)
        # overdue: send a copy of its pairs to other live replicas (if any) and take whichever answers first
        try:
            sub = plan_dispatch_pairs(b, self.table.layer_slots(call.layer), self.excluded | {b.actor_id}, call.layer)
        except NoReplicaError:
            sub = []
        hedge = None
        if sub:
            self.stats["hedges"] += 1
            sub_x = gather_inputs(call.x, b)
            hedge = [self._send(call.layer, sub_x, s).future() for s in sub]
        deadline = call.submitted + self.call_timeout_s
        t_overdue = time.perf_counter()
        while time.perf_counter() < deadline:
            try:
                return as_tensor(fut.result(timeout=0.01))
            except concurrent.futures.TimeoutError:
                pass
            except _DEAD + (GetTimeoutError,):
                if hedge is None:
                    return self._recover(call, b)
                fut = None
            if hedge is not None and all(h.done() for h in hedge):
                try:
                    outs = [as_tensor(h.result()) for h in hedge]
                    self.stats["last_stall_s"] = time.perf_counter() - t_overdue + self._hedge_after_s()
                    return combine(b.num_rows, call.x.shape[1], sub, outs, dtype=torch.float32)
                except _DEAD + (GetTimeoutError,):
                    hedge = None
            if fut is None and hedge is None:
                return self._recover(call, b)
            if fut is None:
                time.sleep(0.005)
        return self._recover(call, b)

    def _observe_latency(self, dt: float) -> None:
        self._latency_ewma_s = 0.9 * self._latency_ewma_s + 0.1 * dt if self._latency_ewma_s else dt

    def _recover(self, call: _Call, b: ActorBatch) -> torch.Tensor:
        """Recompute one actor's share of a layer on other replicas, or on the restarted actor."""
        t_lost = time.perf_counter()
        self.stats["failovers"] += 1
        deadline = t_lost + self.call_timeout_s
        dead = {b.actor_id}
        sub_x = gather_inputs(call.x, b)
        while True:
            try:
                sub = plan_dispatch_pairs(b, self.table.layer_slots(call.layer), self.excluded | dead, call.layer)
                refs = [self._send(call.layer, sub_x, s) for s in sub]
                outs = [as_tensor(_get(r, self.call_timeout_s)) for r in refs]
                self.stats["last_stall_s"] = time.perf_counter() - t_lost
                return combine(sub_x.shape[0], sub_x.shape[1], sub, outs, dtype=torch.float32)
            except NoReplicaError:
                dead = set()  # no other replica: wait for Ray to restart the lost actor
            except _DEAD + (GetTimeoutError, concurrent.futures.TimeoutError) as e:
                dead |= {s.actor_id for s in sub}
                if time.perf_counter() > deadline:
                    raise ExpertUnavailableError(
                        f"layer {call.layer}: expert actor(s) {sorted(dead) or [b.actor_id]} did not come back "
                        f"within {self.call_timeout_s:.0f}s ({type(e).__name__})") from e
            if time.perf_counter() > deadline:
                raise ExpertUnavailableError(f"layer {call.layer}: no live replica for actor {b.actor_id}'s slots "
                                             f"within {self.call_timeout_s:.0f}s")
            time.sleep(0.1)


def _get(ref, timeout_s: float):
    """Wait for an expert call from the engine's step thread (a future, not ray.get: the caller may live inside
    an async actor, whose event loop this thread must not be mistaken for)."""
    return ref.future().result(timeout=timeout_s)


def plan_dispatch_pairs(b: ActorBatch, layer_slots, excluded: set[int], layer: int) -> list[ActorBatch]:
    """Re-plan one actor batch's pairs (rows indexed within that batch) over the remaining replicas."""
    k_ids = b.slot_ids.view(-1, 1)
    k_w = b.weights.view(-1, 1)
    # each pair becomes its own "token" row; rows map back through pair_rows
    sub = plan_dispatch(k_ids, k_w, layer_slots, excluded, layer=layer)
    out = []
    for s in sub:
        pairs = s.token_ids  # indices into b's pairs
        rows = b.pair_rows[pairs]
        uniq, inv = torch.unique(rows, sorted=True, return_inverse=True)
        out.append(ActorBatch(s.actor_id, uniq, inv, b.slot_ids[pairs], b.weights[pairs]))
    return out
