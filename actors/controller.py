"""Controller: the single owner of the routing table; health, failover, autoscaling and rebalancing.

A named, detached async actor. The versioned table is persisted in Ray's internal KV after every change so
a restarted controller recovers it (and the expert actors it created, by name). One reconcile loop applies,
in turn: health (ping every actor in its own concurrency group; route around unhealthy ones, re-admit them
when healthy, replace those Ray cannot restart), KV-shard repair (restore the replication factor), and
autoscaling (replicas of hot groups added, idle ones drained). EPLB rebalancing runs on request (ops
command) or when the measured imbalance exceeds a threshold. Policies are the pure functions of
moeray.router.policy / moeray.router.placement, fed with `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, RayActorError

from moeray.actors.expert import make_expert_actor
from moeray.actors.metrics import ControllerMetrics
from moeray.common.config import ServeConfig
from moeray.router.placement import imbalance, rebalance
from moeray.router.policy import AutoscaleState, GroupStats, HealthTracker, decide_replicas
from moeray.router.table import NoReplicaError, RoutingTable

CONTROLLER_NAME = "moeray-controller"


def table_key(deployment: str) -> bytes:
    return f"moeray/{deployment}/routing_table".encode()


def expert_actor_name(deployment: str, actor_id: int) -> str:
    return f"{deployment}-expert-{actor_id}"


class Controller:
    def __init__(self, config: dict[str, Any], deployment: str, table: dict[str, Any], groups: dict[int, list[int]],
                 gating: list[Any], kv_shards: dict[str, Any] | None = None) -> None:
        self.config = ServeConfig(**config)
        self.deployment = deployment
        self.gating = list(gating)
        self.kv_shards = dict(kv_shards or {})
        stored = self._load()  # what a previous incarnation persisted, or None on first start
        self.desired = RoutingTable.from_dict(stored["table"] if stored else table)
        # group (the original expert group id) -> its replica actor ids
        saved_groups = stored["groups"] if stored else groups
        self.groups: dict[int, list[int]] = {int(g): list(a) for g, a in saved_groups.items()}
        self.pinned: dict[int, int] = {int(g): n for g, n in (stored or {}).get("pinned", {}).items()}
        # versions never go backwards across a controller restart
        version = max(self.desired.version, int((stored or {}).get("active_version", 0)))
        self.active = RoutingTable(version, self.desired.layer_ids, self.desired.num_experts, self.desired.replicas)
        self.actors: dict[int, Any] = {}
        for a in self.desired.actor_ids:
            try:
                self.actors[a] = ray.get_actor(expert_actor_name(deployment, a), namespace=self.config.namespace)
            except ValueError:
                pass  # started below by reconcile (replacement)
        self.health = HealthTracker(failure_threshold=self.config.health_failure_threshold, recovery_successes=1)
        self.autoscale_state = AutoscaleState()
        self.events: list[dict[str, Any]] = []
        self.pending: dict[int, Any] = {}  # new replicas not yet ready: actor id -> ping ref
        self._last_stats: dict[int, dict[str, float]] = {}
        self._load_history = torch.zeros(0)
        self._shard_started: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._next_id = max(self.desired.actor_ids, default=-1) + 1
        self.metrics = ControllerMetrics()
        self.recovery_s: list[float] = []

    # ---- persistence ---------------------------------------------------------------------------------
    def _kv(self):
        from ray.experimental import internal_kv

        return internal_kv

    def _load(self) -> dict[str, Any] | None:
        raw = self._kv()._internal_kv_get(table_key(self.deployment))
        return json.loads(raw) if raw else None

    def _persist(self) -> None:
        data = json.dumps({"table": self.desired.to_dict(), "groups": self.groups,
                           "active_version": self.active.version, "pinned": self.pinned})
        self._kv()._internal_kv_put(table_key(self.deployment), data.encode(), overwrite=True)

    # ---- public ------------------------------------------------------------------------------------
    async def start(self) -> int:
        if self._task is None:
            self._persist()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        return self.desired.version

    @ray.method(concurrency_group="health")
    async def ping(self) -> str:
        return CONTROLLER_NAME

    async def get_table(self) -> dict[str, Any]:
        return self.active.to_dict()

    async def status(self) -> dict[str, Any]:
        experts = []
        for a in sorted(self.actors):
            group = next((g for g, ids in self.groups.items() if a in ids), None)
            st = self._last_stats.get(a, {})
            experts.append({"actor_id": a, "group": group, "healthy": self.health.is_healthy(a),
                            "routed": a in self.active.actor_ids, "pending": a in self.pending,
                            "node_id": st.get("node_id", ""), "device": st.get("device", ""),
                            "busy_fraction": st.get("busy_fraction", 0.0), "rows": st.get("rows", 0)})
        return {"table_version": self.active.version, "desired_version": self.desired.version,
                "experts": experts, "groups": {str(g): a for g, a in self.groups.items()},
                "kv_shards": list(self.kv_shards), "events": self.events[-20:],
                "recovery_s": self.recovery_s[-10:]}

    async def reconcile(self) -> dict[str, Any]:
        """One pass of the loop (tests call it directly to make progress deterministic)."""
        now = time.monotonic()
        changed = await self._check_health(now)
        await self._check_pending()
        await self._repair_kv()
        if await self._autoscale(now):
            changed = True
        if changed:
            await self._push()
        return {"version": self.active.version, "unhealthy": sorted(self.health.unhealthy())}

    async def scale(self, group: int, replicas: int) -> dict[str, Any]:
        """Set a group's replica count (ops command)."""
        if group not in self.groups:
            raise ValueError(f"unknown expert group {group}; groups: {sorted(self.groups)}")
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.pinned[group] = replicas  # an operator's count: autoscaling leaves this group alone
        await self._set_replicas(group, replicas)
        await self._push()
        return {"group": group, "replicas": list(self.groups[group])}

    async def drain(self, actor_id: int) -> dict[str, Any]:
        """Stop routing to an actor, let in-flight calls finish, then remove it (ops command)."""
        if actor_id not in self.actors:
            raise ValueError(f"unknown expert actor {actor_id}; actors: {sorted(self.actors)}")
        try:
            self.desired.without([actor_id])
        except NoReplicaError as e:
            raise ValueError(f"cannot drain actor {actor_id}: {e}; add a replica first (moeray scale)") from None
        await self._remove_actor(actor_id)
        await self._push()
        return {"drained": actor_id, "table_version": self.active.version}

    async def rebalance(self, num_redundant: int | None = None) -> dict[str, Any]:
        """EPLB over the load measured since the last rebalance: place redundant copies of hot experts, load moved
        slots into their targets, then switch the table atomically, then unload what moved away."""
        await self._collect_load()
        load = self._load_history
        if load.numel() == 0 or float(load.sum()) == 0:
            return {"changed": False, "reason": "no expert load measured yet"}
        actor_ids = sorted(a for a in self.desired.actor_ids if self.health.is_healthy(a))
        before = imbalance(load, self.desired)
        redundant = num_redundant if num_redundant is not None else len(actor_ids)
        placement = rebalance(load, len(actor_ids), redundant, layer_ids=list(self.desired.layer_ids),
                              actor_ids=actor_ids)
        new = placement.to_table(self.desired.version + 1)
        # 1. load added slots everywhere first (the old table stays valid meanwhile)
        added = new.added_slots(self.desired)
        await asyncio.gather(*[self.actors[a].load_slots.remote(s) for a, s in added.items() if s])
        # 2. switch atomically
        old = self.desired
        self.desired = new
        self.active = self._active_table()
        self._persist()
        await self._push()
        # 3. unload what no longer lives on each actor
        removed = new.removed_slots(old)
        await asyncio.gather(*[self.actors[a].unload_slots.remote(s) for a, s in removed.items()
                               if s and a in self.actors])
        after = imbalance(load, new)
        self._event("rebalance", before=round(before, 3), after=round(after, 3), version=new.version)
        self.metrics.imbalance.set(after)
        self._load_history = torch.zeros(0)
        return {"changed": True, "imbalance_before": before, "imbalance_after": after, "version": new.version}

    async def imbalance(self) -> float:
        await self._collect_load()
        if self._load_history.numel() == 0:
            return 1.0
        return imbalance(self._load_history, self.active)

    async def metrics_snapshot(self) -> dict[str, Any]:
        return {"recovery_s": self.recovery_s, "failovers": self.metrics.failovers_total,
                "table_version": self.active.version, "events": len(self.events)}

    # ---- loop ------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as e:  # noqa: BLE001 - the loop must survive anything one pass hits
                self._event("reconcile_error", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.config.health_period_s)

    async def _ping(self, actor) -> bool:
        """Healthy within the timeout? (Whether a failed actor is gone for good is asked by name.)"""
        try:
            await asyncio.wait_for(actor.ping.remote(), self.config.health_timeout_s)
            return True
        except (RayActorError, ActorDiedError, asyncio.TimeoutError, Exception):  # noqa: BLE001
            return False

    async def _check_health(self, now: float) -> bool:
        ids = [a for a in self.desired.actor_ids if a in self.actors and a not in self.pending]
        results = await asyncio.gather(*[self._ping(self.actors[a]) for a in ids])
        changed = False
        for a, ok in zip(ids, results, strict=True):
            was = self.health.is_healthy(a)
            if ok:
                if self.health.record_success(a, now) and not was:
                    await self._readmit(a, now)
                    changed = True
            else:
                gone = not await self._actor_exists(a)
                flipped = self.health.record_died(a, now) if gone else self.health.record_failure(a, now)
                if flipped:
                    self._event("unhealthy", actor=a, dead=gone)
                    self.metrics.failovers.inc()
                    self.metrics.failovers_total += 1
                    changed = True
                if gone:
                    await self._replace(a)
                    changed = True
        if changed:
            self.active = self._active_table()
        return changed

    async def _actor_exists(self, a: int) -> bool:
        try:
            ray.get_actor(expert_actor_name(self.deployment, a), namespace=self.config.namespace)
            return True
        except ValueError:
            return False

    def _active_table(self) -> RoutingTable:
        bad = self.health.unhealthy() | set(self.pending)
        try:
            t = self.desired.without(bad) if bad else self.desired
        except NoReplicaError:
            # some slot has no healthy replica: keep routing to it; the transport waits for Ray's restart
            t = self.desired.without({a for a in bad if self._removable(a, bad)})
        return RoutingTable(max(self.active.version + 1, t.version), t.layer_ids, t.num_experts, t.replicas)

    def _removable(self, a: int, bad: set[int]) -> bool:
        try:
            self.desired.without([a])
            return True
        except NoReplicaError:
            return False

    async def _readmit(self, a: int, now: float) -> None:
        # a restarted actor reloads its constructor's slots; bring it to what the table says it holds
        want = self.desired.actor_slots(a)
        await self.actors[a].load_slots.remote(want)
        have = await self.actors[a].loaded.remote()
        extra = {layer: [e for e in ex if e not in set(want.get(layer, []))] for layer, ex in have.items()}
        if any(extra.values()):
            await self.actors[a].unload_slots.remote({k: v for k, v in extra.items() if v})
        since = self.health.unhealthy_for_s(a, now)
        self.recovery_s.append(since)
        self.metrics.recovery.observe(since)
        self._event("readmitted", actor=a, unhealthy_s=round(since, 3))

    async def _replace(self, a: int) -> None:
        """Start a new actor with the same id and slots (Ray could not restart the old one)."""
        self._event("replace", actor=a)
        self.actors[a] = self._start_actor(a, self.desired.actor_slots(a))
        self.pending[a] = self.actors[a].ping.remote()

    async def _check_pending(self) -> None:
        for a, ref in list(self.pending.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    ray.get(ready[0])
                except Exception as e:  # noqa: BLE001
                    self._event("start_failed", actor=a, error=str(e)[:200])
                    continue
                del self.pending[a]
                self.health.forget(a)
                self._event("ready", actor=a)
                self.active = self._active_table()
                await self._push()

    def _start_actor(self, a: int, slots: dict[int, list[int]]):
        c = self.config
        self._request_resources_if_needed()
        return make_expert_actor(c.model, slots, a, c.device, c.expert_num_cpus, c.allow_cpu_fallback,
                                 c.torch_threads, c.max_restarts, name=expert_actor_name(self.deployment, a),
                                 namespace=c.namespace, expert_quant=c.expert_quant)

    def _request_resources_if_needed(self) -> None:
        """A new replica needs its device: when the cluster has none free, ask the Ray autoscaler for one."""
        c = self.config
        need = {"CPU": c.expert_num_cpus} if c.device == "cpu" else ({"GPU": 1} if c.device == "gpu" else {"NPU": 1})
        free = ray.available_resources()
        if all(free.get(k, 0) >= v for k, v in need.items()):
            return
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[need])
            self._event("autoscaler_request", bundle=need)
        except Exception as e:  # noqa: BLE001 - no autoscaler on this cluster: the actor stays pending
            self._event("autoscaler_unavailable", error=str(e)[:200])

    async def _push(self) -> None:
        """Send the active table (and the actor handles) to every gating actor; they switch between steps."""
        self._persist()
        routed = {a: h for a, h in self.actors.items() if a in self.active.actor_ids}
        results = await asyncio.gather(*[g.set_table.remote(self.active.to_dict(), routed) for g in self.gating],
                                       return_exceptions=True)
        self.metrics.table_version.set(self.active.version)
        del results

    # ---- autoscaling -----------------------------------------------------------------------------------
    async def _collect_stats(self) -> dict[int, GroupStats]:
        ids = [a for a in self.actors if a not in self.pending and self.health.is_healthy(a)]
        stats = await asyncio.gather(*[self.actors[a].stats.remote() for a in ids], return_exceptions=True)
        per_group: dict[int, list[float]] = {}
        for a, st in zip(ids, stats, strict=True):
            if isinstance(st, BaseException):
                continue
            prev = self._last_stats.get(a)
            busy = 0.0
            if prev is not None and st["uptime_s"] > prev["uptime_s"]:
                busy = (st["busy_s"] - prev["busy_s"]) / (st["uptime_s"] - prev["uptime_s"])
            st = dict(st, busy_fraction=max(0.0, min(1.0, busy)))
            self._last_stats[a] = st
            self.metrics.actor_load.set(st["busy_fraction"], tags={"actor": str(a)})
            g = next((g for g, m in self.groups.items() if a in m), None)
            if g is not None and prev is not None:
                per_group.setdefault(g, []).append(st["busy_fraction"])
        return {g: GroupStats(busy_fraction=sum(v) / len(v)) for g, v in per_group.items() if v}

    async def _autoscale(self, now: float) -> bool:
        cfg = self.config.autoscale
        stats = await self._collect_stats()
        if cfg.max_replicas == cfg.min_replicas == 1 and all(
                len(m) == 1 for g, m in self.groups.items() if g not in self.pinned):
            return False
        current = {g: len(m) for g, m in self.groups.items() if g not in self.pinned}
        desired = decide_replicas(cfg, stats, current, now, self.autoscale_state)
        changed = False
        for g, n in desired.items():
            if n != current[g]:
                self._event("autoscale", group=g, replicas_from=current[g], replicas_to=n,
                            busy=round(stats[g].busy_fraction, 3) if g in stats else None)
                await self._set_replicas(g, n)
                changed = True
        return changed

    async def _set_replicas(self, group: int, n: int) -> None:
        members = self.groups[group]
        while len(members) < n:
            a = self._next_id
            self._next_id += 1
            like = members[0]
            self.desired = self.desired.with_actor(a, like=like)
            self.actors[a] = self._start_actor(a, self.desired.actor_slots(a))
            self.pending[a] = self.actors[a].ping.remote()
            members.append(a)
            self._event("replica_added", group=group, actor=a)
        while len(members) > n:
            await self._remove_actor(members[-1])
        self.active = self._active_table()
        self._persist()

    async def _remove_actor(self, a: int) -> None:
        """Drain: route around it, give in-flight calls time to finish, then kill it."""
        self.desired = self.desired.without([a])
        for members in self.groups.values():
            if a in members:
                members.remove(a)
        self.pending.pop(a, None)
        self.active = self._active_table()
        await self._push()
        await asyncio.sleep(self.config.health_timeout_s)  # in-flight calls on the old table finish
        h = self.actors.pop(a, None)
        if h is not None:
            ray.kill(h, no_restart=True)
        self.health.forget(a)
        self._event("replica_removed", actor=a)

    # ---- EPLB input ------------------------------------------------------------------------------------
    async def _collect_load(self) -> None:
        loads = await asyncio.gather(*[g.take_expert_load.remote() for g in self.gating], return_exceptions=True)
        layers = list(self.desired.layer_ids)
        total = torch.zeros(len(layers), self.desired.num_experts, dtype=torch.float64)
        for ld in loads:
            if isinstance(ld, BaseException):
                continue
            for layer, counts in ld.items():
                if int(layer) in layers:
                    total[layers.index(int(layer))] += torch.tensor(counts, dtype=torch.float64)
        if self._load_history.numel() == 0:
            self._load_history = total
        else:
            self._load_history = self._load_history + total

    # ---- KV shards -------------------------------------------------------------------------------------
    async def _repair_kv(self) -> None:
        """A shard that restarted (empty) or was replaced gets back the blocks it should hold."""
        if not self.kv_shards:
            return
        from moeray.kvstore.ring import HashRing

        ring = HashRing(list(self.kv_shards), replication=self.config.kv_store.replication)
        for sid, h in list(self.kv_shards.items()):
            try:
                st = await asyncio.wait_for(h.stats.remote(), self.config.health_timeout_s)
            except Exception:  # noqa: BLE001 - dead or restarting: next pass
                if not await self._shard_exists(sid):
                    await self._replace_shard(sid)
                continue
            started = st.get("started_at", 0.0)
            if self._shard_started.get(sid) not in (None, started):
                await self._copy_to(sid, ring)
            self._shard_started[sid] = started

    async def _shard_exists(self, sid: str) -> bool:
        """Alive or being restarted by Ray (its name is held); False once it is gone for good."""
        from moeray.actors.kvshard import kv_shard_name

        try:
            ray.get_actor(kv_shard_name(self.deployment, sid), namespace=self.config.namespace)
            return True
        except ValueError:
            return False

    async def _replace_shard(self, sid: str) -> None:
        from moeray.actors.kvshard import make_kv_shard
        from moeray.kvstore.ring import HashRing

        kv = self.config.kv_store
        self.kv_shards[sid] = make_kv_shard(sid, int(kv.shard_capacity_mb * 2**20), kv.shard_num_cpus,
                                           self.config.max_restarts, self.config.namespace, self.deployment)
        self._event("kv_shard_replaced", shard=sid)
        await self._copy_to(sid, HashRing(list(self.kv_shards), replication=kv.replication))
        await asyncio.gather(*[g.set_kv_shards.remote(self.kv_shards) for g in self.gating], return_exceptions=True)

    async def _copy_to(self, sid: str, ring) -> int:
        copied = 0
        for other, h in self.kv_shards.items():
            if other == sid:
                continue
            try:
                keys = await h.keys.remote()
            except Exception:  # noqa: BLE001
                continue
            mine = [k for k in keys if sid in ring.owners(k)]
            for k in mine:
                v = await h.get.remote(k)
                if v is not None:
                    await self.kv_shards[sid].put.remote(k, v)
                    copied += 1
        self._event("kv_repair", shard=sid, blocks=copied)
        return copied

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": time.time(), "event": kind, **fields})


def start_controller(config: ServeConfig, deployment: str, table: RoutingTable, groups: dict[int, list[int]],
                     gating: list[Any], kv_shards: dict[str, Any] | None):
    cls = ray.remote(concurrency_groups={"health": 1})(Controller)
    h = cls.options(name=f"{deployment}-{CONTROLLER_NAME}", namespace=config.namespace, lifetime="detached",
                    num_cpus=0, max_restarts=-1, max_concurrency=100).remote(
        config.model_dump(), deployment, table.to_dict(), groups, gating, kv_shards)
    ray.get(h.start.remote())
    return h
