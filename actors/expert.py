"""ExpertGroupActor: the routed experts of some (layer, expert) slots, loaded from the checkpoint.

Stateless apart from its weights: any replica holding a slot can serve it; slots can be loaded and unloaded
at run time (rebalancing, draining). The weights live on the actor's torch device (from its placement) in the
serving dtype (`dtype`, `auto` resolved on that device). Calls use the wire of moeray.engine.wire: rows arrive as
one `bytes` in the wire dtype and are read in place; they move to the device once; the answer returns in the
dtype the rows came in.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import ray
import torch

from moeray.actors.devices import actor_options, torch_device
from moeray.engine.wire import decode_call, encode_answer, unpack_pairs
from moeray.models.checkpoint import Checkpoint, load_experts_into, new_expert_group
from moeray.models.config import ModelConfig
from moeray.models.dtypes import resolve_dtype


class ExpertGroupActor:
    def __init__(self, model_path: str, slots: dict[int, list[int]], device: str = "cpu",
                 allow_cpu_fallback: bool = False, torch_threads: int | None = 1, actor_id: int = 0,
                 dtype: str = "float32", expert_quant: str = "none", deployment: str = "",
                 namespace: str | None = None) -> None:
        torch.set_num_threads(torch_threads or 1)
        self._lock = threading.Lock()  # the group: Ray's method thread and the channel's worker both use it
        self.actor_id = actor_id
        self.device_kind = device
        self.device = torch_device(device, allow_cpu_fallback)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_path = model_path
        self.cfg = ModelConfig.from_pretrained(model_path)
        self.ckpt = Checkpoint(model_path, expert_quant)  # packed experts stay packed
        self.group = new_expert_group(self.cfg, self.ckpt, dtype=self.dtype, device=self.device)
        # a restarted actor loads what the controller's current table gives it, not its constructor's slots
        self.load_slots(_current_slots(deployment, namespace, actor_id, slots))
        self._busy_s = 0.0
        self._cpu_s = 0.0  # CPU time of this thread inside forward (busy_s is wall time: includes waiting for a core)
        self._rows = 0
        self._calls = 0
        self._started = time.monotonic()
        self._channel = None  # engine.channel.ChannelServer, started by channel_address
        self._channel_lock = threading.Lock()

    def forward(self, layer: int, rows: bytes, meta: bytes) -> bytes:
        """rows: [M, D] in the wire dtype, meta: header and pairs (pair rows, expert ids, weights), both as
        engine.wire.encode_call makes them -> the [M, D] weighted expert outputs per row in the wire dtype
        (encode_answer)."""
        with self._lock:  # the channel's worker thread calls this too (tensor_transport: socket)
            t0, c0 = time.perf_counter(), time.thread_time()
            x, pair_rows, expert_ids, weights = decode_call(rows, meta)
            out = encode_answer(self.group.forward(layer, x, pair_rows, expert_ids, weights))
            self._busy_s += time.perf_counter() - t0
            self._cpu_s += time.thread_time() - c0
            self._rows += int(pair_rows.shape[0])
            self._calls += 1
        return out

    @ray.method(concurrency_group="health")
    def channel_address(self) -> dict:
        """Where this actor's expert-call channel listens (engine/channel.py; started on the first ask): its Unix
        socket, its TCP address on this node, the connection token and this node's id. Also the socket
        transport's probe: answered in the health group like `ping`."""
        with self._channel_lock:
            if self._channel is None:
                from moeray.engine.channel import ChannelServer

                threads = torch.get_num_threads()
                self._channel = ChannelServer(lambda layer, meta, rows: self.forward(layer, rows, meta),
                                              host=ray.util.get_node_ip_address(),
                                              init=lambda: torch.set_num_threads(threads))
        return {**self._channel.address(), "node_id": ray.get_runtime_context().get_node_id(),
                "actor_id": self.actor_id}

    def forward_tensor(self, layer: int, x: torch.Tensor, meta: np.ndarray, tensor_transport: str) -> list:
        """`forward` over Ray Direct Transport (actors/rdt.py): x [M, D] arrives as a tensor pulled by NIXL (on
        this actor's device type); the answer [M, D] stays here, put as an RDT object whose ref is returned
        (`[ref]`: a plain return, so the caller's `.remote()` needs no per-call RDT check and its future works)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        pair_rows, expert_ids, weights = unpack_pairs(meta)
        out = self.group.forward(layer, x, pair_rows, expert_ids, weights).contiguous()
        ref = ray.put(out, _tensor_transport=tensor_transport)
        self._busy_s += time.perf_counter() - t0
        self._cpu_s += time.thread_time() - c0
        self._rows += int(pair_rows.shape[0])
        self._calls += 1
        return [ref]

    def load_slots(self, slots: dict[int, list[int]]) -> dict[int, list[int]]:
        """Load (layer -> expert ids) from the checkpoint; returns what is loaded now."""
        with self._lock:
            load_experts_into(self.group, self.cfg, self.ckpt, {int(k): v for k, v in slots.items()})
            return self.group.loaded()

    def unload_slots(self, slots: dict[int, list[int]]) -> dict[int, list[int]]:
        with self._lock:
            for layer, experts in slots.items():
                self.group.unload(int(layer), list(experts))
            return self.group.loaded()

    def loaded(self) -> dict[int, list[int]]:
        return self.group.loaded()

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return self.actor_id

    @ray.method(concurrency_group="health")
    def stats(self) -> dict:
        """Load counters since start: busy seconds, rows (pairs) served, calls; node and device. In the health group:
        the controller asks every pass (bounded by health_timeout_s), never queued behind expert calls."""
        return {"actor_id": self.actor_id, "busy_s": self._busy_s, "cpu_s": self._cpu_s, "rows": self._rows,
                "calls": self._calls, "channel_calls": self._channel.calls if self._channel is not None else 0,
                "uptime_s": time.monotonic() - self._started, "device": str(self.device), "pid": os.getpid(),
                "dtype": str(self.dtype).removeprefix("torch."), "placement": self.device_kind,
                "torch_threads": torch.get_num_threads(),
                "node_id": ray.get_runtime_context().get_node_id(), "weight_bytes": self.group.nbytes()}


def _current_slots(deployment: str, namespace: str | None, actor_id: int, slots: dict[int, list[int]],
                   timeout_s: float = 5.0) -> dict[int, list[int]]:
    """This actor's slots in the controller's active table when a controller runs and routes to it (a restart
    after a rebalance, scale or drain), else `slots` (first start: no controller yet, or none at all)."""
    if not deployment:
        return slots
    from moeray.actors.handles import ControllerHandle
    from moeray.actors.spawn import controller_name
    from moeray.router.table import RoutingTable

    try:
        ctl = ControllerHandle(ray.get_actor(controller_name(deployment), namespace=namespace), deployment)
        table = RoutingTable.from_dict(ctl.get_table().result(timeout_s))
    except Exception:  # noqa: BLE001 - no controller (yet) or unreachable: the constructor's slots
        return slots
    return table.actor_slots(actor_id) if actor_id in table.actor_ids else slots


def make_expert_actor(model_path: str, slots: dict[int, list[int]], actor_id: int, device: str, num_cpus: float,
                      allow_cpu_fallback: bool, torch_threads: int, max_restarts: int, name: str | None = None,
                      namespace: str | None = None, dtype: str = "float32", expert_quant: str = "none",
                      tensor_transport: bool = False, deployment: str = "", detached: bool = False):
    """Start one expert-group actor placed per `device` (restartable: Ray re-runs __init__ on restart).
    `tensor_transport`: enable Ray Direct Transport on it (forward_tensor; actors/rdt.py). `deployment`: whose
    controller a restarted actor asks for its current slots. `detached`: not ended with the process that starts it
    (the controller's actors: Ray ends an actor whose creator dies, and a controller restart is such a death)."""
    opts = actor_options(device, num_cpus)
    opts.update(max_restarts=max_restarts, max_task_retries=0)
    if name:
        opts.update(name=name, namespace=namespace, lifetime="detached" if detached else None)
    cls = ray.remote(concurrency_groups={"health": 1}, enable_tensor_transport=tensor_transport or None)(
        ExpertGroupActor).options(**opts)
    return cls.remote(model_path, slots, device, allow_cpu_fallback, torch_threads, actor_id, dtype,
                      expert_quant=expert_quant, deployment=deployment, namespace=namespace)
