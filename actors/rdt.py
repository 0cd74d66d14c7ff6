"""RdtTransport: the expert call over Ray Direct Transport (RDT), one-sided NIXL, behind ExpertTransport.

Why NIXL and not a collective transport (Ray 2.60, doc/source/ray-core/direct-transport "Limitations"; code
ray/experimental/collective/collective.py, ray/experimental/rdt/): gloo and nccl need a collective group;
only the process that created it may submit tasks passing RDT objects; an actor is in one group per transport;
`ray.put` is refused for them (two-sided: the value must be an actor task's return); async actors and actors
with max_concurrency > 1 are not supported. The gating actor is async and produces the rows in its own step
thread (not as an actor task's return), the expert actors answer pings in a `health` concurrency group, and
several gating actors share the same expert actors: each of these rules out gloo/nccl for this architecture
without moving the dense model into a separate sync actor. NIXL is one-sided: no group, `ray.put(x,
_tensor_transport="nixl")` works from any worker, the receiver pulls; async actors and concurrency groups are
fine. So a call here is:

    gating step thread:  x_ref = ray.put(rows [M, D], _tensor_transport="nixl")
                         call = expert.forward_tensor.remote(layer, x_ref, meta, "nixl")
    expert actor:        rows pulled by NIXL onto its device type; answer [M, D] put as an RDT object -> [out_ref]
    gating step thread:  ray.wait(calls) -> [out_ref] = ray.get(call) -> ray.get(out_ref) pulls the answer by NIXL

`meta` (pair rows, expert ids, weights; engine/wire.py) stays small and inline. RDT refs have no working
`.future()` or `await` in Ray 2.60 (the RDT-store lookup times out); the backend's futures are completed by
RayBackend.wait_any (ray.wait, then ray.get of what is ready), as on the object store. The call's return is a
plain `[ref]` (the expert `ray.put`s its answer as an RDT object) rather than a `tensor_transport` method:
`.options(tensor_transport=...).remote()` does a blocking round trip to the actor on every call in Ray 2.60
(NixlTensorTransport.actor_has_tensor_transport) and raises there when the actor is dead. Failover, hedging and
fail-fast are the same state machine as the object-store transport (engine/failover.py): only the backend
differs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import ray
import torch

from moeray.actors.handles import ExpertHandle
from moeray.actors.transport import RayBackend, RayTransport, RefFuture, failed_future
from moeray.common.errors import ConfigError
from moeray.engine.wire import pack_pairs
from moeray.router.dispatch import ActorBatch

NIXL = "nixl"


def nixl_installed() -> bool:
    """NIXL's Python package is importable here (moeray[rdt]); does not import it."""
    return importlib.util.find_spec("nixl") is not None


def resolve_tensor_transport(tensor_transport: str, transport: str, gating_device_type: str,
                             expert_device: str) -> str:
    """ServeConfig.tensor_transport -> "nixl", "socket" or "object_store" ("object_store" also stands for "no
    expert calls between actors" under transport: local). `gating_device_type`: the torch device type the gating
    engine computes on (cpu, cuda, npu; see GatingActor); `expert_device`: the experts' placement. auto: nixl only
    when both compute on GPUs (RDT supports CPUs and NVIDIA GPUs; NPUs have no RDT transport in Ray 2.60) and
    NIXL is installed, else socket (actors/channel.py). A forced nixl without NIXL is a ConfigError naming the
    option."""
    if transport != "ray" or tensor_transport == "object_store":
        return "object_store"
    if tensor_transport == "socket":
        return "socket"
    if tensor_transport == NIXL:
        if not nixl_installed():
            raise ConfigError("tensor_transport: nixl needs NIXL (pip install 'moeray[rdt]') on every node; "
                              "or set tensor_transport: object_store")
        return NIXL
    on_gpus = gating_device_type == "cuda" and expert_device == "gpu"
    return NIXL if on_gpus and nixl_installed() else "socket"


def tensor_transport_of(cfg: Any, gating_device_type: str | None = None) -> str:
    """The resolved tensor transport of a ServeConfig. `gating_device_type`: what the gating engine computes on;
    None: what its `gating_device` placement means (spawn, before any actor runs). The gating actor passes the
    device it got (cpu under allow_cpu_fallback without CUDA: then the object store, whatever spawn enabled)."""
    if gating_device_type is None:
        from moeray.actors.devices import device_type

        gating_device_type = device_type(cfg.gating_device)
    return resolve_tensor_transport(cfg.tensor_transport, cfg.transport, gating_device_type, cfg.device)


class RdtBackend(RayBackend):
    """RayBackend whose rows and answers travel by RDT (`tensor_transport`, one-sided: nixl)."""

    host_rows = False  # rows stay on the engine's device: NIXL reads them there

    def __init__(self, actors: dict[int, Any], tensor_transport: str = NIXL) -> None:
        super().__init__(actors)
        self.tensor_transport = tensor_transport

    def send(self, actor_id: int, layer: int, x_rows: torch.Tensor, batch: ActorBatch):
        handle = self.actors.get(actor_id)
        if handle is None:  # a table entry whose handle has not arrived yet
            return failed_future(KeyError(f"no handle for expert actor {actor_id}"))
        meta = pack_pairs(batch.pair_rows, batch.slot_ids, batch.weights)
        # its own contiguous storage: NIXL registers whole storages, and rows of one gather are views of one
        x_ref = ray.put(x_rows.contiguous().clone(), _tensor_transport=self.tensor_transport)
        return RefFuture(ExpertHandle(handle, actor_id).forward_tensor(layer, x_ref, meta, self.tensor_transport).ref)

    def probe(self, actor_id: int):
        return RefFuture(ExpertHandle(self.actors[actor_id], actor_id).ping().ref)

    def decode(self, answer: Any) -> torch.Tensor:
        return answer  # already pulled (answer): a tensor on this process's device type

    def answer(self, value: Any) -> Any:
        """A send's value `[ref]` -> the tensor, pulled by NIXL here (in wait_any: a failed pull fails that send
        like a failed call); a probe's value (an int) as it is."""
        return ray.get(value[0]) if isinstance(value, list) else value


class RdtTransport(RayTransport):
    """RayTransport over RDT: same failover state machine, rows and answers moved by NIXL."""

    def __init__(self, actors: dict[int, Any], table, tensor_transport: str = NIXL, **kwargs: Any) -> None:
        super().__init__(actors, table, backend=RdtBackend(dict(actors), tensor_transport), **kwargs)
        self.tensor_transport = tensor_transport
