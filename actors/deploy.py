"""deploy(): the distributed system on the current Ray cluster (a local Ray is started if none runs).

    dep = deploy(ServeConfig(model=path, num_expert_groups=4))
    outs = dep.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32, temperature=0.0))
    dep.shutdown()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import ray

from moeray.actors.gating import engine_config, load_tokenizer
from moeray.actors.handles import (
    ControllerHandle,
    ExpertHandle,
    GatingHandle,
    KVShardHandle,
    kill,
    named_actor,
    results,
)
from moeray.actors.resources import fit_to_cluster
from moeray.actors.spawn import (
    expert_actor_name,
    kv_shard_name,
    start_controller,
    start_expert,
    start_gating,
    start_kv_shard,
    table_key,
)
from moeray.actors.supervisor import RequestSupervisor, Tracked
from moeray.common.config import ServeConfig
from moeray.common.errors import BackendUnavailableError, RequestError
from moeray.common.sampling import RequestOutput, SamplingParams
from moeray.engine.engine import validate_request
from moeray.models.config import ModelConfig
from moeray.router.table import RoutingTable

T = TypeVar("T")


def _progress(msg: str) -> None:
    print(f"[moeray] {msg}", file=sys.stderr, flush=True)


def ensure_ray(address: str | None = None, namespace: str = "moeray", num_cpus: int | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray without the dashboard."""
    if ray.is_initialized():
        return
    kw: dict[str, Any] = dict(namespace=namespace, log_to_driver=True)
    if address:
        ray.init(address=address, **kw)
    elif os.environ.get("RAY_ADDRESS"):
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


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from blocking code (in a worker thread when this thread runs a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Deployment:
    """A running system. `expert_actors`, `gating` and `kv_shards` are the Ray actor handles (the ones running
    now: see `expert_actors`); requests go through one RequestSupervisor (failover across gating actors) and
    operations through the controller."""

    def __init__(self, config: ServeConfig, model_cfg: ModelConfig, table: RoutingTable,
                 expert_actors: dict[int, Any], gating: list[Any], kv_shards: dict[str, Any] | None = None,
                 name: str = "moeray", controller: Any = None) -> None:
        self.config, self.model_cfg, self.table = config, model_cfg, table
        self._experts, self.gating = dict(expert_actors), gating  # Ray restarts a gating actor: same handle
        self._kv_shards = dict(kv_shards or {})
        # the handles deploy() created own their actors: Ray ends an actor once its owner's handles are all gone, so
        # these stay referenced for the deployment's life even when a lookup gives a newer handle
        self._owned = [*self._experts.values(), *self._kv_shards.values()]
        self.name, self.controller = name, controller
        self.gating_handles = [GatingHandle(g, i) for i, g in enumerate(gating)]
        self.supervisor = RequestSupervisor(self.gating_handles)
        self._controller = ControllerHandle(controller) if controller is not None else None
        self.engine_config = engine_config(config)
        self.tokenizer = load_tokenizer(config.model)

    @property
    def expert_actors(self) -> dict[int, Any]:
        """Every expert actor's Ray handle by actor id, as the deployment runs now. With a controller that is the
        actors it runs: replicas it added included, removed ones left out, and for an actor it replaced (Ray could
        not restart it) the new actor under the same name, where a handle kept from before points at the dead
        one. Looked up by name on every access (a controller call and one lookup per actor): keep the dict in a
        local inside a loop."""
        if self._controller is not None:
            try:
                ids = [e["actor_id"] for e in self._controller.status().result(self.config.control_timeout_s)[
                    "experts"]]
            except BackendUnavailableError:  # the controller restarting: the actors known so far
                ids = sorted(self._experts)
            ns = self.config.namespace
            self._experts = {a: named_actor(expert_actor_name(self.name, a), ns, self._experts.get(a)) for a in ids}
        return dict(self._experts)

    @property
    def kv_shards(self) -> dict[str, Any]:
        """Every KV-store shard's Ray handle by shard id; a shard the controller replaced is the new actor."""
        if self._controller is not None:
            self._kv_shards = {s: named_actor(kv_shard_name(self.name, s), self.config.namespace, h)
                               for s, h in self._kv_shards.items()}
        return dict(self._kv_shards)

    def _named_leftovers(self) -> list[Any]:
        """Every actor still registered under this deployment's names (`<name>-...` in its namespace)."""
        try:
            names = [n["name"] for n in ray.util.list_named_actors(all_namespaces=True)
                     if n["namespace"] == self.config.namespace and n["name"].startswith(f"{self.name}-")]
        except Exception:  # noqa: BLE001 - Ray itself unreachable: nothing more to find
            return []
        return [h for h in (named_actor(n, self.config.namespace) for n in names) if h is not None]

    @property
    def failovers(self) -> int:
        """Requests resubmitted to another gating actor so far."""
        return self.supervisor.failovers

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
        reqs = [Tracked(f"{tag}-{i}", list(p), sp) for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))]
        outs = {r.request_id: RequestOutput(r.request_id, r.prompt_ids, logprobs=[] if r.params.logprobs else None)
                for r in reqs}
        _run_sync(self._generate(reqs, outs, time.monotonic() + timeout_s))
        for o in outs.values():
            if o.finish_reason and o.finish_reason.startswith("error"):
                raise BackendUnavailableError(f"request {o.request_id} failed: {o.finish_reason}")
            if self.tokenizer is not None:
                o.text = self.tokenizer.decode(o.token_ids)
        return list(outs.values())

    async def _generate(self, reqs: list[Tracked], outs: dict[str, RequestOutput], deadline: float) -> None:
        await self.supervisor.submit(reqs)
        try:
            async for r, d in self.supervisor.run(reqs, deadline):
                outs[r.request_id].add(d)  # ids, logprobs, top_logprobs, prompt_logprobs, finish
        except BaseException:
            await self.supervisor.cancel(reqs)
            raise

    # ---- streaming API (the front end's backend) ---------------------------------------------------------
    async def stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     gating_index: int | None = None) -> AsyncIterator:
        """Stream one request's deltas. If its gating actor dies, the request is resubmitted (same id, with the
        tokens already streamed) to the restarted actor or another one, which rebuilds it from the KV store:
        the caller sees one continuous stream."""
        req = Tracked(request_id, list(prompt_ids), params, -1 if gating_index is None else gating_index)
        async for d in self.supervisor.stream(req):
            yield d

    def new_request_id(self) -> str:
        return f"req-{uuid.uuid4().hex[:12]}"

    # ---- operations ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Gating actors' engine state plus, with a controller, every expert actor's node, health and load."""
        gst = results([g.status() for g in self.gating_handles])
        if self._controller is not None:
            return {"name": self.name, **self._controller.status().result(), "gating": gst}
        est = results([ExpertHandle(a, i).stats() for i, a in self._experts.items()])
        return {"name": self.name, "table_version": self.table.version, "gating": gst, "experts": est}

    def _need_controller(self) -> ControllerHandle:
        if self._controller is None:
            raise RuntimeError("this deployment runs without a controller (ServeConfig.controller=false)")
        return self._controller

    def scale(self, group: int, replicas: int) -> dict[str, Any]:
        return self._need_controller().scale(group, replicas).result()

    def drain(self, actor_id: int) -> dict[str, Any]:
        return self._need_controller().drain(actor_id).result()

    def rebalance(self, num_redundant: int | None = None) -> dict[str, Any]:
        return self._need_controller().rebalance(num_redundant).result()

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gating": results([g.status() for g in self.gating_handles])}
        if self._controller is not None:
            out["controller"] = self._controller.metrics_snapshot().result()
        return out

    def num_free_blocks(self) -> list[int]:
        return results([g.num_free_blocks() for g in self.gating_handles])

    def shutdown(self) -> None:
        """Kill every actor of this deployment (the Ray session itself stays up)."""
        if self._controller is not None:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_del(table_key(self.name))
        for a in [self.controller] * (self.controller is not None) + list(self.gating) + list(
                self._experts.values()) + list(self._kv_shards.values()):  # the handles known here
            kill(a)
        # then every actor still named for the deployment: the replicas and replacements the controller started
        # (detached), and the live actor under a name where a handle known here points at one it replaced
        for a in self._named_leftovers():
            kill(a)
        self.gating, self._experts, self._kv_shards, self.controller, self._controller = [], {}, {}, None, None
        self._owned = []


def deploy(config: ServeConfig | None = None, address: str | None = None, **fields: Any) -> Deployment:
    """Start expert-group actors and gating actors for `config` on the current Ray cluster (or a local one).

    CPU shares left unset are divided among the actors to fit the cluster's free CPUs; a request that cannot be
    scheduled is refused with a ConfigError naming the shortfall (see actors/resources.py)."""
    cfg = config or ServeConfig.build(**fields)
    model_cfg = ModelConfig.from_pretrained(cfg.model)
    table = build_table(cfg, model_cfg)
    ensure_ray(address, cfg.namespace)
    cfg = fit_to_cluster(cfg, len(table.actor_ids))
    name = f"{cfg.served_name}-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    experts: dict[int, Any] = {}
    if cfg.transport == "ray":
        _progress(f"starting {len(table.actor_ids)} expert-group actors on {cfg.device} "
                  f"({model_cfg.num_experts} experts x {model_cfg.num_moe_layers} MoE layers, "
                  f"{cfg.expert_num_cpus:g} CPU each)")
        experts = {a: start_expert(cfg, name, a, table.actor_slots(a)) for a in table.actor_ids}
    kv_shards: dict[str, Any] = {}
    if cfg.kv_store.enabled:
        kv = cfg.kv_store
        _progress(f"starting {kv.num_shards} KV-store shards (replication {kv.replication}, codec {kv.codec})")
        kv_shards = {f"kv-{i}": start_kv_shard(cfg, name, f"kv-{i}") for i in range(kv.num_shards)}
    _progress(f"starting {cfg.num_gating_actors} gating actor(s)")
    gating = [start_gating(cfg, name, table, experts or None, i, kv_shards or None)
              for i in range(cfg.num_gating_actors)]
    _wait_started([ExpertHandle(a, i) for i, a in experts.items()] + [GatingHandle(g, i) for i, g in enumerate(gating)]
                  + [KVShardHandle(h, sid) for sid, h in kv_shards.items()], t0, cfg.start_timeout_s)
    controller = None
    if cfg.controller and cfg.transport == "ray":
        _progress("starting the controller (health, failover, autoscaling, rebalancing)")
        controller = start_controller(cfg, name, table, {a: [a] for a in table.actor_ids}, gating, kv_shards or None)
    _progress(f"ready: {name} ({time.monotonic() - t0:.1f}s)")
    return Deployment(cfg, model_cfg, table, experts, gating, kv_shards, name=name, controller=controller)


def _wait_started(actors: list[ExpertHandle | GatingHandle | KVShardHandle], t0: float,
                  timeout_s: float = 600.0) -> None:
    """Wait for every actor's constructor (model loading); raise the first construction error."""
    pending = [a.ping().ref for a in actors]
    total, done = len(pending), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if not ready:
            raise BackendUnavailableError(f"{len(pending)} of {total} actors did not start within {timeout_s:.0f} s; "
                                          "`ray status` shows what the cluster is short of (a model that takes "
                                          "longer to load: raise start_timeout_s)")
        ray.get(ready)  # raises the actor's construction error, if any
        done += 1
        _progress(f"loaded {done}/{total} actors ({time.monotonic() - t0:.1f}s)")
