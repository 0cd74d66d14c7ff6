"""Controller: the single owner -- and single writer -- of the routing table.

A named, detached async actor around a pure FleetState (router/fleet.py). Every change -- the reconcile loop's
health, autoscaling and KV repair, and the operator's scale / drain / rebalance -- runs under one writer lock,
so no change can erase a concurrent one; reads (status, routing) take no lock. The state is persisted in Ray's
internal KV after every change: a controller Ray restarted recovers it and the actors by name (the ones it started
are detached, actors/spawn.py, so they outlive it), replaces those gone meanwhile and resumes its loop by itself.

One reconcile pass: ping expert actors (their own concurrency group) and gating actors -> route around the
unhealthy, re-admit the healthy (reloading the slots the table gives them), replace actors Ray cannot restart,
kill the hung (alive for Ray, every ping failing for hung_restart_s) so Ray restarts them -> start-up of new
actors -> KV-shard repair -> autoscaling -> push the active table to every gating actor.
Policies are the pure functions of router/policy.py and router/placement.py, fed with `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import ray
import torch

from moeray.actors import handles
from moeray.actors.controller_kv import KVShardKeeper
from moeray.actors.handles import RAY_CALL_ERRORS, ExpertHandle, GatingHandle, Reply, actor_exists, kill, named_actor
from moeray.actors.metrics import ControllerMetrics
from moeray.actors.resources import request_device_if_short
from moeray.actors.spawn import CONTROLLER_NAME, expert_actor_name, start_expert, table_key
from moeray.common.config import ServeConfig
from moeray.router.fleet import FleetState
from moeray.router.placement import default_redundant, imbalance, rebalance
from moeray.router.policy import AutoscaleState, HungWatch, StartWatch, decide_replicas
from moeray.router.table import NoReplicaError, RoutingTable

__all__ = ["CONTROLLER_NAME", "Controller", "expert_actor_name", "table_key"]


class Controller:
    def __init__(self, config: dict[str, Any], deployment: str, table: dict[str, Any], groups: dict[int, list[int]],
                 gating: list[Any], kv_shards: dict[str, Any] | None = None) -> None:
        self.config = c = ServeConfig(**config)
        self.deployment = deployment
        self.gating = [GatingHandle(g, i) for i, g in enumerate(gating)]
        stored = self._load()  # what a previous incarnation persisted, or None on first start
        self.fleet = (FleetState.from_dict(stored, c.health_failure_threshold) if stored else
                      FleetState(RoutingTable.from_dict(table), groups, c.health_failure_threshold))
        named = {a: named_actor(expert_actor_name(deployment, a), c.namespace) for a in self.fleet.desired.actor_ids}
        # one gone for good while no controller ran is missing here: the first health check replaces it
        self.actors: dict[int, ExpertHandle] = {a: ExpertHandle(h, a) for a, h in named.items() if h is not None}
        self.kv = KVShardKeeper(c, deployment, kv_shards, self.fleet.event)
        self.autoscale_state = AutoscaleState()
        self.starting: dict[int, Reply] = {}  # new actors: id -> their first ping
        self._stats: dict[int, dict[str, Any]] = {}  # actor -> its last stats (a new pid: Ray restarted it)
        self._gating_ok = [True] * len(self.gating)
        self.hung = HungWatch(c.hung_restart_s)  # alive for Ray, every ping failing: killed so Ray restarts it
        self.starts = StartWatch(c.start_timeout_s)  # in its constructor that long: killed so Ray starts it again
        self._load_history = torch.zeros(0)
        self._writer = asyncio.Lock()
        self.metrics = ControllerMetrics()
        self._task = asyncio.get_running_loop().create_task(self._loop()) if stored else None  # no start() then

    # ---- persistence ---------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any] | None:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(table_key(self.deployment))
        return json.loads(raw) if raw else None

    def _persist(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(table_key(self.deployment), json.dumps(self.fleet.to_dict()).encode(),
                                     overwrite=True)

    # ---- reads (no lock) -------------------------------------------------------------------------------
    async def start(self) -> int:
        if self._task is None:
            self._persist()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self.fleet.desired.version

    @ray.method(concurrency_group="health")
    async def ping(self) -> str:
        return CONTROLLER_NAME

    async def get_table(self) -> dict[str, Any]:
        return self.fleet.active.to_dict()

    async def routing(self) -> dict[str, Any]:
        """What a (re)started gating actor routes by: the active table, its actors' handles, the KV shards."""
        return {"table": self.fleet.active.to_dict(), "actors": self._routed(), "kv_shards": self.kv.raw()}

    async def status(self) -> dict[str, Any]:
        f = self.fleet
        experts = [{"actor_id": a, "group": f.group_of(a), "healthy": f.health.is_healthy(a),
                    "routed": a in f.active.actor_ids, "pending": a in f.pending,
                    "busy_fraction": f.busy_fraction.get(a, 0.0),
                    **{k: self._stats.get(a, {}).get(k, d) for k, d in (("node_id", ""), ("device", ""), ("dtype", ""),
                                                                         ("weight_bytes", 0), ("rows", 0))}}
                   for a in sorted(self.actors)]
        for e in experts:  # inside expert calls but off the CPU: waiting for a core (or for the device)
            st = self._stats.get(e["actor_id"], {})
            e["off_cpu_s"] = round(max(0.0, st.get("busy_s", 0.0) - st.get("cpu_s", 0.0)), 3)
        return {"table_version": f.active.version, "desired_version": f.desired.version, "experts": experts,
                "groups": {str(g): a for g, a in f.groups.items()}, "kv_shards": list(self.kv.shards),
                "gating_healthy": list(self._gating_ok), "events": list(f.events)[-20:],
                "recovery_s": list(f.recovery_s)[-10:]}

    async def metrics_snapshot(self) -> dict[str, Any]:
        return {"recovery_s": list(self.fleet.recovery_s), "failovers": self.metrics.failovers_total,
                "table_version": self.fleet.active.version, "events": len(self.fleet.events)}

    async def imbalance(self) -> float:
        async with self._writer:
            await self._collect_load()
        if self._load_history.numel() == 0:
            return 1.0
        return imbalance(self._load_history, self.fleet.active)

    # ---- changes (one at a time) -------------------------------------------------------------------------
    async def reconcile(self) -> dict[str, Any]:
        """One pass of the loop (tests call it directly to make progress deterministic)."""
        async with self._writer:
            now = time.monotonic()
            changed = await self._check_health(now)
            changed |= await self._check_starting()
            await self.kv.repair(self.gating)
            changed |= await self._autoscale(now)
            if changed:
                await self._push()
            return {"version": self.fleet.active.version, "unhealthy": sorted(self.fleet.health.unhealthy())}

    async def scale(self, group: int, replicas: int) -> dict[str, Any]:
        """Set a group's replica count (ops command); autoscaling leaves the group alone from then on."""
        if group not in self.fleet.groups:
            raise ValueError(f"unknown expert group {group}; groups: {sorted(self.fleet.groups)}")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        async with self._writer:
            self.fleet.pinned[group] = replicas
            await self._set_replicas(group, replicas)
            await self._push()
            return {"group": group, "replicas": list(self.fleet.groups[group])}

    async def drain(self, actor_id: int) -> dict[str, Any]:
        """Stop routing to an actor, let in-flight calls finish, then remove it (ops command)."""
        async with self._writer:
            if actor_id not in self.actors:
                raise ValueError(f"unknown expert actor {actor_id}; actors: {sorted(self.actors)}")
            try:
                self.fleet.desired.without([actor_id])
            except NoReplicaError as e:
                raise ValueError(f"cannot drain actor {actor_id}: {e}; add a replica first (moeray scale)") from None
            await self._remove_actor(actor_id)
            await self._push()
            return {"drained": actor_id, "table_version": self.fleet.active.version}

    async def rebalance(self, num_redundant: int | None = None) -> dict[str, Any]:
        """EPLB over the load measured since the last rebalance: load moved slots into their targets, switch the
        table atomically, then unload what moved away."""
        async with self._writer:
            return await self._rebalance(num_redundant)

    async def _rebalance(self, num_redundant: int | None) -> dict[str, Any]:
        f = self.fleet
        await self._collect_load()
        load = self._load_history
        if load.numel() == 0 or float(load.sum()) == 0:
            return {"changed": False, "reason": "no expert load measured yet"}
        actor_ids = sorted(a for a in f.desired.actor_ids if f.health.is_healthy(a))
        before = imbalance(load, f.desired)
        redundant = num_redundant if num_redundant is not None else default_redundant(load.shape[1],
                                                                                      len(actor_ids))
        placement = rebalance(load, len(actor_ids), redundant, layer_ids=list(f.desired.layer_ids),
                              actor_ids=actor_ids)
        new = placement.to_table(f.desired.version + 1)
        # 1. load added slots everywhere first (the old table stays valid meanwhile)
        await asyncio.gather(*[self.actors[a].load_slots(s).wait(self.config.expert_call_timeout_s)
                               for a, s in new.added_slots(f.desired).items() if s])
        # 2. switch atomically
        old, f.desired = f.desired, new
        f.refresh_active()
        await self._push()
        # 3. unload what no longer lives on each actor
        await asyncio.gather(*[self.actors[a].unload_slots(s).wait(self.config.expert_call_timeout_s)
                               for a, s in new.removed_slots(old).items() if s and a in self.actors],
                             return_exceptions=True)  # one that fails keeps a spare copy: harmless
        after = imbalance(load, new)
        f.event("rebalance", before=round(before, 3), after=round(after, 3), version=new.version)
        self.metrics.imbalance.set(after)
        self._load_history = torch.zeros(0)
        return {"changed": True, "imbalance_before": before, "imbalance_after": after, "version": new.version}

    # ---- the loop ------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as e:  # noqa: BLE001 - the loop must survive anything one pass hits
                self.fleet.event("reconcile_error", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.config.health_period_s)

    async def _ok(self, reply: Reply) -> bool:
        try:
            await reply.wait(self.config.health_timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure is a failed ping
            return False

    async def _check_health(self, now: float) -> bool:
        f = self.fleet
        missing = [a for a in f.desired.actor_ids if a not in self.actors]  # gone while no controller ran
        for a in missing:
            self._replace(a)
        ids = [a for a in f.desired.actor_ids if a in self.actors and a not in f.pending]
        oks = await asyncio.gather(*[self._ok(self.actors[a].ping()) for a in ids],
                                   *[self._ok(g.ping()) for g in self.gating])
        changed = bool(missing)
        for a, ok in zip(ids, oks[:len(ids)], strict=True):
            gone = not ok and not actor_exists(expert_actor_name(self.deployment, a), self.config.namespace)
            outcome = f.record_ping(a, ok, gone, now)
            if outcome == "readmit":
                await self._reload_slots(a)
                self.metrics.recovery.observe(f.readmitted(a, now))
                changed = True
            elif outcome == "unhealthy":
                self.metrics.failovers.inc()
                self.metrics.failovers_total += 1
                changed = True
            if gone:
                self.hung.forget(("actor", a))
                self._replace(a)
                changed = True
            else:
                self._watch_hung("actor", a, ok, now)
        await self._check_gating(oks[len(ids):], now)
        if changed:
            f.refresh_active()
        return changed

    async def _check_gating(self, oks: list[bool], now: float) -> None:
        """A gating actor back after failed pings was restarted (or stalled): give it the current table. One that
        failed every ping for hung_restart_s is killed: Ray restarts it, its requests are resubmitted (LOST)."""
        for i, ok in enumerate(oks):
            self._watch_hung("gating", i, ok, now)
            if ok and not self._gating_ok[i]:
                try:
                    await self.gating[i].set_table(self.fleet.active.to_dict(), self._routed()).wait(
                        self.config.control_timeout_s)
                except RAY_CALL_ERRORS:
                    ok = False  # try again next pass
                else:
                    self.fleet.event("gating_readmitted", gating=i)
            elif not ok and self._gating_ok[i]:
                self.fleet.event("gating_unhealthy", gating=i)
            self._gating_ok[i] = ok

    async def _reload_slots(self, a: int) -> None:
        """Bring a (restarted) actor to what the table says it holds: it restarts with its constructor's slots."""
        want = self.fleet.desired.actor_slots(a)
        have = await self.actors[a].load_slots(want).wait(self.config.expert_call_timeout_s)
        extra = {layer: [e for e in ex if e not in set(want.get(int(layer), []))] for layer, ex in have.items()}
        if any(extra.values()):
            await self.actors[a].unload_slots({k: v for k, v in extra.items() if v}).wait(
                self.config.expert_call_timeout_s)

    def _replace(self, a: int) -> None:
        """Start a new actor with the same id and slots (Ray could not restart the old one)."""
        self.fleet.event("replace", actor=a)
        self._start(a)

    def _start(self, a: int) -> None:
        request_device_if_short(self.config, self.fleet.event)
        h = start_expert(self.config, self.deployment, a, self.fleet.desired.actor_slots(a), detached=True)
        self.actors[a] = ExpertHandle(h, a)
        self._stats.pop(a, None)
        self.fleet.pending.add(a)
        self.starting[a] = self.actors[a].ping()

    def _watch_hung(self, role: str, i: int, ok: bool, now: float, running: bool = True) -> None:
        """Kill a hung actor so Ray starts it again: in its constructor (a start or a restart) for start_timeout_s
        (event start_hung), or, `running`, past it but failing every ping for hung_restart_s (hung_restart)."""
        key, actor = (role, i), (self.actors[i] if role == "actor" else self.gating[i]).actor
        pid = 0 if ok else handles.constructor_pid(actor)
        if pid:  # in its constructor (loading): never a hung_restart however long; StartWatch bounds it
            self.hung.forget(key)
            if self.starts.record(key, pid, now):
                self.fleet.event("start_hung", **{role: i}, pid=pid, starting_s=self.config.start_timeout_s)
                kill(actor, restart=True)
            return
        self.starts.record(key, 0, now)
        if running and self.hung.record(key, ok, now):
            self.fleet.event("hung_restart", **{role: i}, failing_s=self.config.hung_restart_s)
            kill(actor, restart=True)

    async def _check_starting(self) -> bool:
        changed = False
        for a, reply in list(self.starting.items()):
            ready, _ = ray.wait([reply.ref], timeout=0)
            if not ready:
                self._watch_hung("actor", a, False, time.monotonic(), running=False)  # 0 pid: waits for a node
                continue
            try:
                await reply
            except RAY_CALL_ERRORS as e:
                self.fleet.event("start_failed", actor=a, error=str(e)[:200])
                if actor_exists(expert_actor_name(self.deployment, a), self.config.namespace):
                    self.starting[a] = self.actors[a].ping()  # Ray is starting it again: wait for that one
                continue
            del self.starting[a]
            self.fleet.ready(a)
            self.fleet.refresh_active()
            changed = True
        return changed

    def _routed(self) -> dict[int, Any]:
        return {a: h.actor for a, h in self.actors.items() if a in self.fleet.active.actor_ids}

    async def _push(self) -> None:
        """Persist, then send the active table and the actor handles to every gating actor."""
        self._persist()
        table, routed = self.fleet.active.to_dict(), self._routed()
        await asyncio.gather(*[g.set_table(table, routed).wait(self.config.control_timeout_s)
                               for g in self.gating], return_exceptions=True)
        self.metrics.table_version.set(self.fleet.active.version)

    # ---- autoscaling -----------------------------------------------------------------------------------
    async def _collect_stats(self) -> dict[int, float]:
        """Busy fraction per healthy actor since the last pass; an actor found restarted gets its slots back."""
        f = self.fleet
        ids = [a for a in self.actors if a not in f.pending and f.health.is_healthy(a)]
        stats = await asyncio.gather(*[self.actors[a].stats().wait(self.config.health_timeout_s) for a in ids],
                                     return_exceptions=True)
        fractions = {}
        for a, st in zip(ids, stats, strict=True):
            if isinstance(st, BaseException):
                continue
            prev = self._stats.get(a)
            self._stats[a] = st
            if prev is not None and prev["pid"] != st["pid"]:  # restarted between two pings
                f.event("restarted", actor=a)
                await self._reload_slots(a)
            frac = f.observe_stats(a, st["busy_s"], st["uptime_s"])
            if frac is not None:
                fractions[a] = frac
                self.metrics.actor_load.set(frac, tags={"actor": str(a)})
        return fractions

    async def _autoscale(self, now: float) -> bool:
        cfg, f = self.config.autoscale, self.fleet
        fractions = await self._collect_stats()
        current = f.scalable()
        if cfg.max_replicas == cfg.min_replicas == 1 and all(n == 1 for n in current.values()):
            return False
        stats = f.group_stats(fractions)
        changed = False
        for g, n in decide_replicas(cfg, stats, current, now, self.autoscale_state).items():
            if n != current[g]:
                f.event("autoscale", group=g, replicas_from=current[g], replicas_to=n,
                        busy=round(stats[g].busy_fraction, 3) if g in stats else None)
                await self._set_replicas(g, n)
                changed = True
        return changed

    async def _set_replicas(self, group: int, n: int) -> None:
        members = self.fleet.groups[group]
        while len(members) < n:
            self._start(self.fleet.add_replica(group))
        while len(members) > n:
            await self._remove_actor(members[-1])
        self.fleet.refresh_active()
        self._persist()

    async def _remove_actor(self, a: int) -> None:
        """Drain: route around it, give in-flight calls time to finish, then kill it."""
        self.fleet.remove(a)
        self.starting.pop(a, None)
        await self._push()
        await asyncio.sleep(self.config.health_timeout_s)  # in-flight calls on the old table finish
        h = self.actors.pop(a, None)
        if h is not None:
            kill(h.actor)
        self.fleet.forget(a)

    # ---- EPLB input ------------------------------------------------------------------------------------
    async def _collect_load(self) -> None:
        loads = await asyncio.gather(*[g.take_expert_load().wait(self.config.control_timeout_s)
                                       for g in self.gating], return_exceptions=True)
        layers = list(self.fleet.desired.layer_ids)
        total = torch.zeros(len(layers), self.fleet.desired.num_experts, dtype=torch.float64)
        for ld in loads:
            if isinstance(ld, BaseException):
                continue
            for layer, counts in ld.items():
                if int(layer) in layers:
                    total[layers.index(int(layer))] += torch.tensor(counts, dtype=torch.float64)
        self._load_history = total if self._load_history.numel() == 0 else self._load_history + total
