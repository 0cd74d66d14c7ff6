"""deploy(): the distributed system on the current Ray cluster (a local Ray is started if none runs).

    dep = deploy(ServeConfig(model=path, num_expert_groups=4))
    outs = dep.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32, temperature=0.0))
    dep.shutdown()
"""

from __future__ import annotations

import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from moeray.actors.controller import expert_actor_name
from moeray.actors.expert import make_expert_actor
from moeray.actors.gating import LOST, engine_config, load_tokenizer, make_gating_actor
from moeray.actors.kvshard import make_kv_shard
from moeray.common.config import ServeConfig
from moeray.common.errors import BackendUnavailableError, RequestError
from moeray.common.sampling import RequestOutput, SamplingParams, StepDelta
from moeray.engine.engine import validate_request
from moeray.models.config import ModelConfig
from moeray.router.table import RoutingTable

_ACTOR_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


def _progress(msg: str) -> None:
    print(f"[moeray] {msg}", file=sys.stderr, flush=True)


def ensure_ray(address: str | None = None, namespace: str = "moeray", num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray without the dashboard."""
    if ray.is_initialized():
        return
    kw: dict[str, Any] = dict(namespace=namespace, log_to_driver=True)
    if address:
        ray.init(address=address, **kw)
    else:
        import os

        if os.environ.get("RAY_ADDRESS"):
            ray.init(**kw)
        else:  # a private local Ray: never join some other cluster that happens to run on this machine
            ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, **kw)


def build_table(cfg: ServeConfig, model_cfg: ModelConfig) -> RoutingTable:
    if cfg.num_expert_groups > model_cfg.num_experts:
        raise ValueError(f"num_expert_groups ({cfg.num_expert_groups}) must be <= the model's "
                         f"{model_cfg.num_experts} experts")
    make = RoutingTable.round_robin if cfg.placement == "round_robin" else RoutingTable.blocks
    return make(list(model_cfg.moe_layers), model_cfg.num_experts, cfg.num_expert_groups,
                replicas=cfg.expert_replicas)


class Deployment:
    """Handles to a running system: expert-group actors, gating actors, the routing table."""

    def __init__(self, config: ServeConfig, model_cfg: ModelConfig, table: RoutingTable,
                 expert_actors: dict[int, Any], gating: list[Any], kv_shards: dict[str, Any] | None = None,
                 name: str = "moeray", controller: Any = None) -> None:
        self.config, self.model_cfg, self.table = config, model_cfg, table
        self.expert_actors, self.gating = expert_actors, gating
        self.kv_shards = kv_shards or {}
        self.name, self.controller = name, controller
        self.failovers = 0
        self.engine_config = engine_config(config)
        self.tokenizer = load_tokenizer(config.model)
        self._ids = itertools.count()
        self._rr = itertools.count()

    # ---- batch API -----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 timeout_s: float = 600.0) -> list[RequestOutput]:
        """Generate for every prompt (token ids). Each request is checked before any work starts: one that can
        never fit is rejected with a ValueError naming it."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            try:
                validate_request(self.model_cfg, self.engine_config, list(p), sp)
            except RequestError as e:
                raise type(e)(f"request {i}: {e}") from None
        tag = uuid.uuid4().hex[:8]
        outs: dict[str, RequestOutput] = {}
        by_actor: dict[int, list[str]] = {}
        plist_by_rid: dict[str, SamplingParams] = {}
        submits = []
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            rid = f"{tag}-{i}"
            gi = self._pick()
            outs[rid] = RequestOutput(rid, list(p), logprobs=[] if sp.logprobs else None)
            plist_by_rid[rid] = sp
            by_actor.setdefault(gi, []).append(rid)
            submits.append(self.gating[gi].submit.remote(rid, list(p), sp))
        ray.get(submits)
        deadline = time.monotonic() + timeout_s
        while any(not o.finished for o in outs.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"generate did not finish within {timeout_s}s")
            live = {gi: [r for r in rids if not outs[r].finished] for gi, rids in by_actor.items()}
            polls = {gi: self.gating[gi].poll.remote(rids, 1.0) for gi, rids in live.items() if rids}
            for gi, ref in polls.items():
                try:
                    got = ray.get(ref)
                except _ACTOR_GONE:
                    self._failover_batch(gi, live[gi], outs, plist_by_rid, by_actor, deadline)
                    continue
                lost = [rid for rid, deltas in got.items() if deltas and deltas[-1].finish_reason == LOST]
                if lost:  # the actor restarted between two polls and forgot them
                    self._failover_batch(gi, lost, outs, plist_by_rid, by_actor, deadline)
                for rid, deltas in got.items():
                    if rid not in lost:
                        _apply(outs[rid], deltas)
        for o in outs.values():
            if o.finish_reason and o.finish_reason.startswith("error"):
                raise BackendUnavailableError(f"request {o.request_id} failed: {o.finish_reason}")
            if self.tokenizer is not None:
                o.text = self.tokenizer.decode(o.token_ids)
        return list(outs.values())

    def _failover_batch(self, lost: int, rids: list[str], outs: dict[str, RequestOutput],
                        params: dict[str, SamplingParams], by_actor: dict[int, list[str]], deadline: float) -> None:
        """Resubmit a dead gating actor's unfinished requests (with what they generated) to a live one."""
        self.failovers += 1
        by_actor[lost] = [r for r in by_actor[lost] if r not in set(rids)]
        while time.monotonic() < deadline:
            for gi in [i for i in range(len(self.gating)) if i != lost] + [lost]:
                try:
                    ray.get([self.gating[gi].submit.remote(r, outs[r].prompt_token_ids, params[r],
                                                           outs[r].token_ids) for r in rids])
                except _ACTOR_GONE:
                    continue
                by_actor.setdefault(gi, []).extend(rids)
                return
            time.sleep(0.2)
        raise BackendUnavailableError(f"no gating actor came back for requests {rids[:3]}...")

    # ---- streaming API (the front end's backend) ---------------------------------------------------------
    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     gating_index: int | None = None, failover_timeout_s: float = 120.0) -> AsyncIterator[StepDelta]:
        """Stream one request's deltas. If its gating actor dies, the request is resubmitted (same id, with the
        tokens already streamed) to the restarted actor or another one, which rebuilds it from the KV store:
        the caller sees one continuous stream."""
        gi = self._pick() if gating_index is None else gating_index
        done: list[int] = []
        finished = False
        await self.gating[gi].submit.remote(request_id, list(prompt_ids), params)
        try:
            while True:
                try:
                    got = await self.gating[gi].poll.remote([request_id], 1.0)
                except _ACTOR_GONE:
                    gi = await self._resubmit(request_id, prompt_ids, params, done, gi, failover_timeout_s)
                    continue
                deltas = got.get(request_id, [])
                if deltas and deltas[-1].finish_reason == LOST:  # the actor restarted and forgot it
                    gi = await self._resubmit(request_id, prompt_ids, params, done, gi, failover_timeout_s)
                    continue
                for d in deltas:
                    done.extend(d.token_ids)
                    yield d
                    if d.finish_reason is not None:
                        finished = True
                        return
        finally:
            if not finished:  # client gone or error: free the request's blocks
                try:
                    await self.gating[gi].cancel.remote(request_id)
                except Exception:  # noqa: BLE001 - best effort on teardown
                    pass

    async def _resubmit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, done: list[int],
                        lost: int, timeout_s: float) -> int:
        import asyncio

        self.failovers += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            order = [i for i in range(len(self.gating)) if i != lost] + [lost]
            for gi in order:
                try:
                    await self.gating[gi].submit.remote(request_id, list(prompt_ids), params, list(done))
                    return gi
                except _ACTOR_GONE:
                    continue
                except RequestError as e:
                    if "already in use" in str(e):
                        return gi
                    raise
            await asyncio.sleep(0.2)
        raise BackendUnavailableError(f"request {request_id}: no gating actor came back within {timeout_s:.0f}s")

    def new_request_id(self) -> str:
        return f"req-{uuid.uuid4().hex[:12]}"

    def _pick(self) -> int:
        return next(self._rr) % len(self.gating)

    # ---- operations ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Gating actors' engine state plus, with a controller, every expert actor's node, health and load."""
        gst = ray.get([g.status.remote() for g in self.gating])
        if self.controller is not None:
            return {"name": self.name, **ray.get(self.controller.status.remote()), "gating": gst}
        est = ray.get([a.stats.remote() for a in self.expert_actors.values()])
        return {"name": self.name, "table_version": self.table.version, "gating": gst, "experts": est}

    def _need_controller(self) -> Any:
        if self.controller is None:
            raise RuntimeError("this deployment runs without a controller (ServeConfig.controller=false)")
        return self.controller

    def scale(self, group: int, replicas: int) -> dict[str, Any]:
        return ray.get(self._need_controller().scale.remote(group, replicas))

    def drain(self, actor_id: int) -> dict[str, Any]:
        return ray.get(self._need_controller().drain.remote(actor_id))

    def rebalance(self, num_redundant: int | None = None) -> dict[str, Any]:
        return ray.get(self._need_controller().rebalance.remote(num_redundant))

    def metrics(self) -> dict[str, Any]:
        gst = ray.get([g.status.remote() for g in self.gating])
        out: dict[str, Any] = {"gating": gst}
        if self.controller is not None:
            out["controller"] = ray.get(self.controller.metrics_snapshot.remote())
        return out

    def num_free_blocks(self) -> list[int]:
        return ray.get([g.num_free_blocks.remote() for g in self.gating])

    def shutdown(self) -> None:
        """Kill every actor of this deployment (the Ray session itself stays up)."""
        experts = list(self.expert_actors.values())
        if self.controller is not None:
            try:  # the controller also owns replicas it started itself
                from moeray.actors.controller import expert_actor_name

                st = ray.get(self.controller.status.remote(), timeout=10)
                for e in st["experts"]:
                    try:
                        experts.append(ray.get_actor(expert_actor_name(self.name, e["actor_id"]),
                                                     namespace=self.config.namespace))
                    except ValueError:
                        pass
            except Exception:  # noqa: BLE001 - controller gone: kill what we know
                pass
            from ray.experimental import internal_kv

            from moeray.actors.controller import table_key

            internal_kv._internal_kv_del(table_key(self.name))
        for a in [self.controller] * (self.controller is not None) + list(self.gating) + experts + list(
                self.kv_shards.values()):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.gating, self.expert_actors, self.controller = [], {}, None


def _apply(out: RequestOutput, deltas: list[StepDelta]) -> None:
    for d in deltas:
        out.token_ids.extend(d.token_ids)
        if d.logprobs and out.logprobs is not None:
            out.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            out.finish_reason = d.finish_reason
            out.num_cached_tokens = d.num_cached_tokens


def deploy(config: ServeConfig | None = None, address: str | None = None, **fields: Any) -> Deployment:
    """Start expert-group actors and gating actors for `config` on the current Ray cluster (or a local one)."""
    cfg = config or ServeConfig.build(**fields)
    model_cfg = ModelConfig.from_pretrained(cfg.model)
    table = build_table(cfg, model_cfg)
    ensure_ray(address, cfg.namespace)
    name = f"{cfg.served_name}-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    experts: dict[int, Any] = {}
    if cfg.transport == "ray":
        _progress(f"starting {len(table.actor_ids)} expert-group actors on {cfg.device} "
                  f"({model_cfg.num_experts} experts x {model_cfg.num_moe_layers} MoE layers)")
        for a in table.actor_ids:
            experts[a] = make_expert_actor(cfg.model, table.actor_slots(a), a, cfg.device, cfg.expert_num_cpus,
                                           cfg.allow_cpu_fallback, cfg.torch_threads, cfg.max_restarts,
                                           name=expert_actor_name(name, a), namespace=cfg.namespace,
                                           expert_quant=cfg.expert_quant)
    kv_shards: dict[str, Any] = {}
    if cfg.kv_store.enabled:
        kv = cfg.kv_store
        _progress(f"starting {kv.num_shards} KV-store shards (replication {kv.replication}, codec {kv.codec})")
        kv_shards = {f"kv-{i}": make_kv_shard(f"kv-{i}", int(kv.shard_capacity_mb * 2**20), kv.shard_num_cpus,
                                              cfg.max_restarts, cfg.namespace, name) for i in range(kv.num_shards)}
    _progress(f"starting {cfg.num_gating_actors} gating actor(s)")
    gating = [make_gating_actor(cfg, table, experts or None, i, kv_shards=kv_shards or None)
              for i in range(cfg.num_gating_actors)]
    pending = ([a.ping.remote() for a in experts.values()] + [g.ping.remote() for g in gating]
               + [s.ping.remote() for s in kv_shards.values()])
    total, done = len(pending), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=600)
        if not ready:
            raise BackendUnavailableError("actors did not start within 600 s: check `ray status` for resources")
        ray.get(ready)  # raises the actor's construction error, if any
        done += 1
        _progress(f"loaded {done}/{total} actors ({time.monotonic() - t0:.1f}s)")
    controller = None
    if cfg.controller and cfg.transport == "ray":
        from moeray.actors.controller import start_controller

        _progress("starting the controller (health, failover, autoscaling, rebalancing)")
        controller = start_controller(cfg, name, table, {a: [a] for a in table.actor_ids}, gating, kv_shards or None)
    _progress(f"ready: {name} ({time.monotonic() - t0:.1f}s)")
    return Deployment(cfg, model_cfg, table, experts, gating, kv_shards, name=name, controller=controller)
