"""Fitting a deployment to its cluster, so deploy() never waits silently for resources that will not come.

1. `fit_cpu_shares`: CPU shares the user did not set (expert_num_cpus, gating_num_cpus, kv_store.shard_num_cpus)
   are scaled down together until every actor fits in the CPUs the cluster has free; shares set explicitly are
   kept.
2. `shortfall`: what the deployment asks for (CPUs; GPUs / NPUs of the expert actors' `device` and the gating
   actors' `gating_device`) against what the cluster has free, also per node
   (an actor's request must fit in one node); a message naming the fields to change, or None.
3. `fit_to_cluster` (Ray): both, against the live cluster; an explicit request that does not fit is refused
   after `wait_s` (an autoscaler is asked for the missing bundles meanwhile) with a ConfigError.
The first two are pure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from moeray.common.config import ServeConfig
from moeray.common.errors import ConfigError

MIN_SHARE = 0.01  # Ray schedules fractions down to 1e-4; below this an actor's share means nothing
DEVICE_RESOURCE = {"gpu": "GPU", "npu": "NPU"}


@dataclass(frozen=True, slots=True)
class ActorCounts:
    experts: int
    gating: int
    kv_shards: int


def counts_for(cfg: ServeConfig, num_expert_actors: int) -> ActorCounts:
    experts = num_expert_actors if cfg.transport == "ray" else 0
    return ActorCounts(experts, cfg.num_gating_actors, cfg.kv_store.num_shards if cfg.kv_store.enabled else 0)


def cpu_demand(cfg: ServeConfig, n: ActorCounts) -> float:
    return n.experts * cfg.expert_num_cpus + n.gating * cfg.gating_num_cpus + n.kv_shards * cfg.kv_store.shard_num_cpus


def fit_cpu_shares(cfg: ServeConfig, n: ActorCounts, free_cpus: float) -> ServeConfig:
    """`cfg` with its unset CPU shares scaled so that the whole deployment fits in `free_cpus` (unchanged if it
    fits already, or if every share was set explicitly)."""
    unset = {"expert_num_cpus", "gating_num_cpus"} - cfg.model_fields_set
    kv_unset = "shard_num_cpus" not in cfg.kv_store.model_fields_set
    demand = cpu_demand(cfg, n)
    if demand <= free_cpus or not (unset or kv_unset):
        return cfg
    flexible = (n.experts * cfg.expert_num_cpus * ("expert_num_cpus" in unset)
                + n.gating * cfg.gating_num_cpus * ("gating_num_cpus" in unset)
                + n.kv_shards * cfg.kv_store.shard_num_cpus * kv_unset)
    fixed = demand - flexible
    if flexible <= 0 or free_cpus - fixed <= 0:
        return cfg  # nothing to scale: `shortfall` names the fields
    factor = (free_cpus - fixed) / flexible

    def scaled(v: float) -> float:
        return max(MIN_SHARE, int(v * factor * 1e4) / 1e4)  # Ray's fraction precision, rounded down

    update = {k: scaled(getattr(cfg, k)) for k in unset}
    if kv_unset and n.kv_shards:
        kv = cfg.kv_store.model_copy(update={"shard_num_cpus": scaled(cfg.kv_store.shard_num_cpus)})
        kv.model_fields_set.discard("shard_num_cpus")
        update["kv_store"] = kv
    out = cfg.model_copy(update=update)
    out.model_fields_set.difference_update(unset)  # still "not set by the user": a later fit may scale again
    return out


def shortfall(cfg: ServeConfig, n: ActorCounts, free: dict[str, float],
              node_free: list[dict[str, float]]) -> str | None:
    """Why the deployment cannot be scheduled on a cluster with `free` resources (and `node_free` per node), or
    None when it can."""
    problems = []
    demand = cpu_demand(cfg, n)
    if demand > free.get("CPU", 0.0) + 1e-9:
        problems.append(
            f"{demand:g} CPUs needed ({n.experts} expert actors x expert_num_cpus {cfg.expert_num_cpus:g} + "
            f"{n.gating} gating actors x gating_num_cpus {cfg.gating_num_cpus:g} + {n.kv_shards} KV shards x "
            f"kv_store.shard_num_cpus {cfg.kv_store.shard_num_cpus:g}) but the cluster has {free.get('CPU', 0):g} "
            f"free; lower those fields (or leave them unset to have them divided), or add nodes")
    for res in sorted(set(DEVICE_RESOURCE.values())):
        experts = n.experts if DEVICE_RESOURCE.get(cfg.device) == res else 0
        gating = n.gating if DEVICE_RESOURCE.get(cfg.gating_device) == res else 0
        if experts + gating > free.get(res, 0.0) + 1e-9:
            who = " + ".join([f"{experts} expert actors (device {cfg.device!r})"] * bool(experts)
                             + [f"{gating} gating actors (gating_device {cfg.gating_device!r})"] * bool(gating))
            fix = " / ".join(["lower num_expert_groups / expert_replicas"] * bool(experts)
                             + ["lower num_gating_actors or set gating_device: cpu"] * bool(gating))
            problems.append(f"{who} need {experts + gating} {res}s but the cluster has {free.get(res, 0):g} free; "
                            f"{fix}, or add {res} nodes")
    biggest = max([s for s, k in ((cfg.expert_num_cpus, n.experts), (cfg.gating_num_cpus, n.gating),
                                  (cfg.kv_store.shard_num_cpus, n.kv_shards)) if k], default=0.0)
    most = max((nd.get("CPU", 0.0) for nd in node_free), default=0.0)
    if node_free and biggest > most + 1e-9:
        problems.append(f"one actor asks for {biggest:g} CPUs but no node has more than {most:g} free")
    return "; ".join(problems) or None


def fit_to_cluster(cfg: ServeConfig, num_expert_actors: int, wait_s: float = 20.0) -> ServeConfig:
    """`cfg` fitted to the running cluster's free resources; ConfigError naming the shortfall when an explicit
    request still does not fit after `wait_s` (nodes an autoscaler adds meanwhile count)."""
    n = counts_for(cfg, num_expert_actors)
    deadline = time.monotonic() + wait_s
    asked = False
    while True:
        free, node_free = _free_resources()
        cfg = fit_cpu_shares(cfg, n, free.get("CPU", 0.0))
        why = shortfall(cfg, n, free, node_free)
        if why is None:
            return cfg
        if time.monotonic() > deadline:
            raise ConfigError(f"deployment cannot be scheduled: {why}")
        if not asked:
            _ask_autoscaler(cfg, n)
            asked = True
        time.sleep(1.0)


def _free_resources() -> tuple[dict[str, float], list[dict[str, float]]]:
    """Free resources of the cluster, and per node where that is known without the dashboard (one node)."""
    import ray

    free = dict(ray.available_resources())
    alive = [nd for nd in ray.nodes() if nd.get("Alive")]
    return free, [free] if len(alive) == 1 else []


def _ask_autoscaler(cfg: ServeConfig, n: ActorCounts) -> None:
    gating_res = DEVICE_RESOURCE.get(cfg.gating_device)
    bundles = ([{"CPU": cfg.gating_num_cpus, **({gating_res: 1} if gating_res else {})}] * n.gating
               + [{"CPU": cfg.kv_store.shard_num_cpus}] * n.kv_shards)
    res = DEVICE_RESOURCE.get(cfg.device)
    bundles += [{"CPU": cfg.expert_num_cpus, **({res: 1} if res else {})}] * n.experts
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[b for b in bundles if any(b.values())])
    except Exception:  # noqa: BLE001 - no autoscaler on this cluster
        pass


def request_device_if_short(c: ServeConfig, event: Callable[..., None]) -> None:
    """A new expert replica needs its device: when the cluster has none free, ask the Ray autoscaler for one
    (events autoscaler_request / autoscaler_unavailable; without an autoscaler the actor stays pending)."""
    import ray

    need = {"CPU": c.expert_num_cpus} if c.device == "cpu" else ({"GPU": 1} if c.device == "gpu" else {"NPU": 1})
    free = ray.available_resources()
    if all(free.get(k, 0) >= v for k, v in need.items()):
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[need])
        event("autoscaler_request", bundle=need)
    except Exception as e:  # noqa: BLE001 - no autoscaler on this cluster: the actor stays pending
        event("autoscaler_unavailable", error=str(e)[:200])
