"""Starting actors: the one place each role is made an actor (`ray.remote(Cls).options(...)`) and named.

deploy() and the controller (replacements, new replicas, replaced KV shards) both start actors through these
functions, so an actor started by either has the same options but one: the controller's are detached. Ray ends an
actor when the process that created it dies, and a controller restart is such a death: without it every replica
and replacement the controller made would go with it. deploy()'s actors end with the driver, as before; the
detached ones are killed by `Deployment.shutdown` (by name). Expert-group actors are placed by actors/devices.py
through `make_expert_actor`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from moeray.actors.expert import make_expert_actor
from moeray.actors.handles import ControllerHandle
from moeray.actors.rdt import tensor_transport_of
from moeray.common.config import ServeConfig
from moeray.router.table import RoutingTable

CONTROLLER_NAME = "moeray-controller"


def expert_actor_name(deployment: str, actor_id: int) -> str:
    return f"{deployment}-expert-{actor_id}"


def kv_shard_name(deployment: str, shard_id: str) -> str:
    return f"{deployment}-{shard_id}"


def gating_actor_name(deployment: str, index: int) -> str:
    return f"{deployment}-gating-{index}"


def controller_name(deployment: str) -> str:
    return f"{deployment}-{CONTROLLER_NAME}"


def table_key(deployment: str) -> bytes:
    """Where the controller persists its state in Ray's internal KV."""
    return f"moeray/{deployment}/routing_table".encode()


HEAD_RESOURCE = "moeray_head"  # cluster.yaml gives the head node one: the controller and KV shards go there


def _on_head() -> dict[str, Any]:
    """Actor options that pin to the head node when the cluster declares HEAD_RESOURCE (else nothing)."""
    return {"resources": {HEAD_RESOURCE: 0.01}} if ray.cluster_resources().get(HEAD_RESOURCE) else {}


def start_expert(cfg: ServeConfig, deployment: str, actor_id: int, slots: dict[int, list[int]],
                 detached: bool = False) -> Any:
    """One expert-group actor holding `slots` (layer -> expert ids), restartable by Ray; `detached` for the
    controller's (see the module's docstring)."""
    return make_expert_actor(cfg.model, slots, actor_id, cfg.device, cfg.expert_num_cpus, cfg.allow_cpu_fallback,
                             cfg.threads_for("expert"), cfg.max_restarts, name=expert_actor_name(deployment, actor_id),
                             namespace=cfg.namespace, dtype=cfg.dtype, expert_quant=cfg.expert_quant,
                             tensor_transport=tensor_transport_of(cfg) == "nixl", deployment=deployment,
                             detached=detached)


def start_kv_shard(cfg: ServeConfig, deployment: str, shard_id: str, detached: bool = False) -> Any:
    from moeray.actors.kvshard import KVShardActor

    kv = cfg.kv_store
    spill_dir = None if kv.spill_dir is None else str(Path(kv.spill_dir).expanduser() / kv_shard_name(deployment,
                                                                                                      shard_id))
    spill_bytes = None if kv.spill_capacity_mb is None else int(kv.spill_capacity_mb * 2**20)
    cls = ray.remote(concurrency_groups={"health": 1})(KVShardActor)
    return cls.options(num_cpus=kv.shard_num_cpus, max_restarts=cfg.max_restarts, **_on_head(),
                       name=kv_shard_name(deployment, shard_id), namespace=cfg.namespace,
                       lifetime="detached" if detached else None).remote(
        shard_id, int(kv.shard_capacity_mb * 2**20), spill_dir, spill_bytes)


def start_gating(cfg: ServeConfig, deployment: str, table: RoutingTable, expert_actors: dict[int, Any] | None,
                 index: int, kv_shards: dict[str, Any] | None = None) -> Any:
    """A gating actor (async: max_concurrency bounds the polls in flight, pings have their own group)."""
    from moeray.actors.devices import actor_options
    from moeray.actors.gating import GatingActor

    rdt = tensor_transport_of(cfg) == "nixl"  # it puts the rows it sends as RDT objects
    cls = ray.remote(concurrency_groups={"health": 1}, enable_tensor_transport=rdt or None)(GatingActor)

    opts: dict[str, Any] = dict(**actor_options(cfg.gating_device, cfg.gating_num_cpus), max_restarts=cfg.max_restarts,
                                max_concurrency=1000, name=gating_actor_name(deployment, index),
                                namespace=cfg.namespace)
    return cls.options(**opts).remote(cfg.model_dump(), table.to_dict(), expert_actors, index, kv_shards, deployment)


def start_controller(cfg: ServeConfig, deployment: str, table: RoutingTable, groups: dict[int, list[int]],
                     gating: list[Any], kv_shards: dict[str, Any] | None) -> Any:
    """The named, detached controller; returns once its loop runs."""
    from moeray.actors.controller import Controller

    cls = ray.remote(concurrency_groups={"health": 1})(Controller)
    h = cls.options(name=controller_name(deployment), namespace=cfg.namespace, lifetime="detached",
                    num_cpus=0, max_restarts=-1, max_concurrency=100, **_on_head()).remote(
        cfg.model_dump(), deployment, table.to_dict(), groups, gating, kv_shards)
    ControllerHandle(h, deployment).start().result()
    return h
