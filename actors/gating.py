"""GatingActor: an async actor around the Engine. The step loop runs as a background task (each step in a
worker thread so the event loop stays free); submit / poll / cancel / ping are separate methods, ping in its
own concurrency group so a busy step never fails a health check. Tokens leave per step: `poll` returns every
delta of the asked-for requests since the last poll in one message.

Placement: the actor asks for its `gating_device`'s resource (actors/devices.py: num_gpus=1, or the NPU resource)
and its engine computes on that torch device (cuda:0, npu:0; torch_npu imported only for NPUs): the dense
weights in the serving dtype, the paged KV cache, attention, gate, shared experts and sampling. Without the
device's torch support it fails with a ConfigError naming the fix, or computes on the CPU under
allow_cpu_fallback. `status` reports the torch device and dtype it computes in.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
import traceback
from typing import Any

import ray
import torch

from moeray.actors.gating_buffers import DeltaBuffers
from moeray.actors.supervisor import LOST
from moeray.common.config import ServeConfig
from moeray.common.errors import DuplicateRequestError, RequestError
from moeray.common.procstat import cpu_wait_s
from moeray.common.sampling import SamplingParams, StepDelta
from moeray.engine.engine import Engine, EngineConfig
from moeray.engine.transport import LocalTransport, local_expert_groups
from moeray.models.checkpoint import Checkpoint, load_dense, load_experts_into, new_expert_group
from moeray.models.config import ModelConfig
from moeray.models.dtypes import resolve_dtype
from moeray.models.registry import build_dense_model
from moeray.router.table import RoutingTable

__all__ = ["LOST", "GatingActor", "engine_config", "load_tokenizer", "model_id"]


def engine_config(cfg: ServeConfig, dtype: torch.dtype = torch.float32) -> EngineConfig:
    """The engine's settings; `dtype` is the resolved serving dtype (GatingActor: resolve_dtype(cfg.dtype))."""
    from moeray.engine.paged_cache import cache_dtype

    return EngineConfig(block_size=cfg.block_size, num_blocks=cfg.kv_cache_blocks,
                        max_num_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
                        micro_batches=cfg.micro_batches, kv_cache_bytes=cfg.kv_cache_bytes,
                        kv_cache_dtype=cache_dtype(cfg.kv_cache_dtype), prefix_caching=cfg.prefix_caching,
                        dtype=dtype)


def load_tokenizer(model_path: str):
    """The model's tokenizer.json (tokenizers library) or None when the folder ships none."""
    from pathlib import Path

    f = Path(model_path) / "tokenizer.json"
    if not f.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(f))


class GatingActor:
    def __init__(self, config: dict[str, Any], table: dict[str, Any], expert_actors: dict[int, Any] | None,
                 index: int = 0, kv_shards: dict[str, Any] | None = None, deployment: str = "") -> None:
        self.config = ServeConfig(**config)
        self.index = index
        # a restarted actor takes the controller's current table and handles, not its constructor's
        table, expert_actors, kv_shards = _current_routing(self.config, deployment, table, expert_actors, kv_shards)
        torch.set_num_threads(self.config.threads_for("gating"))
        from moeray.actors.devices import device_type, torch_device

        # where the engine computes: the placement's torch device, decided once here (GPU: cuda:0)
        self.device = torch_device(self.config.gating_device, self.config.allow_cpu_fallback)
        self.model_cfg = ModelConfig.from_pretrained(self.config.model)
        ckpt = Checkpoint(self.config.model, self.config.expert_quant)
        dense = build_dense_model(self.model_cfg)
        load_dense(dense, self.model_cfg, ckpt)
        dense.eval()
        # the serving dtype, decided once here for that device (auto: bf16 on GPU/NPU and where this CPU computes it
        # fast; models/dtypes.py)
        self.dtype = resolve_dtype(self.config.dtype, self.device,
                                   reduced_ok=getattr(dense, "reduced_precision", False))
        self.table = RoutingTable.from_dict(table)
        if self.config.transport == "local" or not expert_actors:
            groups = local_expert_groups(self.table, lambda: new_expert_group(self.model_cfg, ckpt, dtype=self.dtype,
                                                                              device=self.device),
                                         lambda g, slots: load_experts_into(g, self.model_cfg, ckpt, slots))
            transport = LocalTransport(groups, self.table)
        else:
            from moeray.actors.rdt import RdtTransport, tensor_transport_of
            from moeray.actors.transport import RayTransport

            # rows travel in the experts' compute dtype (resolved for their device, as the expert actors do). The
            # calls overlap the engine's compute when the two do not share CPU cores: experts or engine on a device
            kwargs = dict(call_timeout_s=self.config.expert_call_timeout_s,
                          wire_dtype=resolve_dtype(self.config.dtype, device_type(self.config.device)),
                          overlaps=self.config.device != "cpu" or torch.device(self.device).type != "cpu",
                          dead_grace_s=30.0 if self.config.controller else 0.0)
            tensor_transport = tensor_transport_of(self.config, torch.device(self.device).type)
            if tensor_transport == "socket":
                from moeray.actors.channel import ChannelTransport

                transport = ChannelTransport(dict(expert_actors), self.table, **kwargs)
            elif tensor_transport == "object_store":
                transport = RayTransport(dict(expert_actors), self.table, **kwargs)
            else:
                transport = RdtTransport(dict(expert_actors), self.table, tensor_transport, **kwargs)
        self.transport = transport
        tok = load_tokenizer(self.config.model)
        self.kv_client = None
        prefix = None
        if kv_shards:
            from moeray.actors.kvshard import RayKVClient
            from moeray.engine.prefix import PrefixCache

            kv = self.config.kv_store
            self.kv_client = RayKVClient(dict(kv_shards), kv.replication)
            prefix = PrefixCache(self.kv_client, self.config.block_size, model_id(self.config.model), kv.codec,
                                 kv.max_inflight_writes, background=True)  # store I/O off the step thread
        grammars = None
        if tok is not None:  # structured output needs the vocabulary
            from moeray.engine.structured import Grammars

            grammars = Grammars(tok.to_str(), self.model_cfg.vocab_size, list(self.model_cfg.eos_token_ids))
        self.engine = Engine(dense, transport, engine_config(self.config, self.dtype),
                             decode=(lambda ids: tok.decode(ids)) if tok is not None else None, prefix=prefix,
                             grammars=grammars, device=self.device)
        self._inbox: collections.deque = collections.deque()
        self._inbox_lock = threading.Lock()
        self._buffers = DeltaBuffers()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeray-step")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._cond: asyncio.Condition | None = None
        self._num_active = 0
        self._last_error: str | None = None
        self._step_s = 0.0  # the last step's wall seconds
        # every step's wall seconds and the step thread's run-queue wait inside them (common/procstat.py)
        self._steps_time = {"busy_s": 0.0, "cpu_wait_s": 0.0}
        self._t_submit: dict[str, float] = {}
        self._t_last: dict[str, float] = {}
        self._kv_written = 0  # acknowledged KV-store writes already counted in the metric
        from moeray.actors.metrics import GatingMetrics

        self.metrics = GatingMetrics(index)

    # ---- requests --------------------------------------------------------------------------------------
    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                     output_ids: list[int] | None = None) -> None:
        """Queue a request; raises RequestError when it can never be served (nothing else is affected).
        `output_ids` resumes a request another (failed) gating actor had started."""
        self.engine.check_request(list(prompt_ids), params)
        if request_id in self._buffers:
            raise DuplicateRequestError(f"request_id {request_id!r} is already in use")
        self._buffers.open(request_id)
        self._num_active += 1
        self._t_submit[request_id] = time.monotonic()
        self._push(("add", request_id, list(prompt_ids), params, list(output_ids or [])))

    async def cancel(self, request_id: str) -> bool:
        """Stop a request and free its blocks (between steps)."""
        if request_id not in self._buffers:
            return False
        self._push(("abort", request_id))
        return True

    async def poll(self, request_ids: list[str], timeout_s: float = 1.0) -> dict[str, list[StepDelta]]:
        """Deltas of these requests since the last poll; waits up to timeout_s for at least one."""
        self._ensure_loop()
        deadline = time.monotonic() + timeout_s
        async with self._cond:
            while not any(self._buffers.has_deltas(r) for r in request_ids):
                left = deadline - time.monotonic()
                if left <= 0 or not any(r in self._buffers for r in request_ids):
                    break
                try:
                    await asyncio.wait_for(self._cond.wait(), left)
                except asyncio.TimeoutError:
                    break
        out = {}
        for r in request_ids:
            buf = self._buffers.take(r)
            if buf is None:
                # cancelled here, or never known here (this actor restarted and lost it): tell the poller
                out[r] = [StepDelta(r, [], None, "cancelled" if self._buffers.was_cancelled(r) else LOST)]
            elif buf:
                out[r] = buf
        return out

    @ray.method(concurrency_group="health")
    async def ping(self) -> int:
        return self.index

    async def status(self) -> dict[str, Any]:
        st = self.engine.running_status()
        st.update(index=self.index, active=self._num_active, last_error=self._last_error, step_s=self._step_s,
                  table_version=self.transport.table.version, node_id=ray.get_runtime_context().get_node_id(),
                  transport=self.config.transport, num_blocks=self.config.kv_cache_blocks,
                  tensor_transport=getattr(self.transport, "tensor_transport", "object_store"),
                  transport_stats=dict(getattr(self.transport, "stats", {})), **self._steps_time,
                  device=str(self.engine.device), placement=self.config.gating_device,
                  dtype=str(self.dtype).removeprefix("torch."),
                  accelerator_ids={k: list(v) for k, v in ray.get_runtime_context().get_accelerator_ids().items()
                                   if v})
        return st

    async def set_kv_shards(self, shards: dict[str, Any]) -> int:
        """Use a new set of KV shard handles (a shard was replaced by the controller)."""
        if self.kv_client is not None:
            self.kv_client.set_shards(dict(shards))
        return len(shards)

    async def flush_kv(self) -> int:
        """Wait for in-flight KV-store writes; returns the number of acknowledged blocks."""
        if self.kv_client is None:
            return 0
        await asyncio.get_running_loop().run_in_executor(None, self.engine.prefix.flush)
        return self.kv_client.num_acked

    async def acked_keys(self) -> list[bytes]:
        return list(self.kv_client.acked) if self.kv_client is not None else []

    async def take_expert_load(self) -> dict[int, list[int]]:
        """Per-(layer, expert) routed pairs since the last call (the controller's EPLB input). Swapped on the
        step thread, between steps: the step adds to these counts, so reading them on the loop would race."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.transport.load.take)

    async def load(self) -> int:
        return self._num_active

    async def num_free_blocks(self) -> int:
        # settle pending aborts first so callers see their effect
        await self._drain()
        return self.engine.num_free_blocks

    async def set_table(self, table: dict[str, Any], expert_actors: dict[int, Any] | None = None) -> int:
        """Take a new routing table and actor handles. Applied at once (not between steps): a step that is
        waiting for a lost actor's replacement must see the new handle. Each layer's dispatch reads the table
        once, so a switch between layers is safe (the controller loads slots before it switches).
        A table older than the one in use is refused (a delayed push must not undo a newer one); returns the
        version in use."""
        new = RoutingTable.from_dict(table)
        if new.version < self.transport.table.version:
            return self.transport.table.version
        if expert_actors is not None and hasattr(self.transport, "set_actors"):
            self.transport.set_actors(dict(expert_actors))
        self.transport.set_table(new)
        return self.transport.table.version

    # ---- the loop ------------------------------------------------------------------------------------
    def _observe(self, deltas: list[StepDelta]) -> None:
        now = time.monotonic()
        for d in deltas:
            if d.token_ids:
                self.metrics.tokens.inc(len(d.token_ids))
                last = self._t_last.get(d.request_id)
                if last is None:
                    t0 = self._t_submit.get(d.request_id)
                    if t0 is not None:
                        self.metrics.ttft.observe(now - t0)
                else:
                    self.metrics.itl.observe(now - last)
                self._t_last[d.request_id] = now
            if d.finish_reason is not None:
                self._t_submit.pop(d.request_id, None)
                self._t_last.pop(d.request_id, None)
                if d.num_cached_tokens:
                    self.metrics.kv_hit_tokens.inc(d.num_cached_tokens)
        if self.kv_client is not None:  # blocks whose write-through all replicas acknowledged
            written = self.kv_client.num_acked
            if written > self._kv_written:
                self.metrics.kv_written.inc(written - self._kv_written)
                self._kv_written = written
        self.metrics.queue.set(len(self.engine.scheduler.waiting))
        self.metrics.running.set(len(self.engine.scheduler.running))
        self.metrics.kv_cache(self.engine.blocks.cache_stats()["hit_rate"], self.engine.blocks.usage())

    def _push(self, item: tuple) -> None:
        with self._inbox_lock:
            self._inbox.append(item)
        self._ensure_loop()
        self._wake.set()

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._cond = asyncio.Condition()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _drain(self) -> None:
        """Wait until the inbox has been applied by the loop."""
        self._ensure_loop()
        while self._inbox:
            self._wake.set()
            await asyncio.sleep(0.005)

    def _apply_inbox(self) -> list[StepDelta]:
        out = []
        with self._inbox_lock:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if item[0] == "add":
                _, rid, prompt, params, done = item
                try:
                    self.engine.add_request(rid, prompt, params, output_ids=done)
                except RequestError as e:
                    out.append(StepDelta(rid, [], None, f"error: {e}"))
            elif item[0] == "abort":
                if self.engine.abort(item[1]):
                    out.append(StepDelta(item[1], [], None, "cancelled"))
        return out

    def _step(self) -> list[StepDelta]:
        deltas = self._apply_inbox()
        if self.engine.has_unfinished():
            t0, w0 = time.perf_counter(), cpu_wait_s()
            try:
                deltas += self.engine.step()
            except Exception as e:  # a failed step fails its requests, never the actor
                self._last_error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                for rid in list(self.engine.seqs):
                    self.engine.abort(rid)
                    deltas.append(StepDelta(rid, [], None, f"error: {self._last_error}"))
            self._step_s = time.perf_counter() - t0
            self._steps_time["busy_s"] += self._step_s
            if w0 is not None:
                self._steps_time["cpu_wait_s"] += cpu_wait_s() - w0
        return deltas

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished() and not self._inbox:
                await self._wake.wait()
            self._wake.clear()
            deltas = await loop.run_in_executor(self._pool, self._step)
            if deltas:
                self._observe(deltas)
                now = time.monotonic()
                for d in deltas:
                    self._buffers.add(d, now)
                    if d.finish_reason is not None:
                        self._num_active = max(0, self._num_active - 1)
                async with self._cond:
                    self._cond.notify_all()


def model_id(model_path: str) -> str:
    """Identifies the weights + cache layout in KV-store keys: a hash of config.json and of the weights' index
    (model.safetensors.index.json, or each safetensors file's header: tensor names, dtypes, shapes, offsets).
    Not the folder name: two folders with the same weights share blocks, a folder whose weights changed does not."""
    import hashlib
    import struct
    from pathlib import Path

    p = Path(model_path)
    h = hashlib.blake2b(digest_size=8)
    h.update((p / "config.json").read_bytes())
    index = p / "model.safetensors.index.json"
    if index.exists():
        h.update(index.read_bytes())
    for f in sorted(p.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(f.name.encode() + fh.read(n) + str(f.stat().st_size).encode())
    return f"m-{h.hexdigest()}"


def _current_routing(cfg: ServeConfig, deployment: str, table: dict[str, Any], expert_actors: dict[int, Any] | None,
                     kv_shards: dict[str, Any] | None) -> tuple[dict[str, Any], dict[int, Any] | None, Any]:
    """The controller's routing table, expert handles and KV shards when a controller runs (this actor was
    restarted, or started after a change), else the constructor's. The newer table wins."""
    if not deployment or not cfg.controller or cfg.transport != "ray":
        return table, expert_actors, kv_shards
    from moeray.actors.handles import ControllerHandle
    from moeray.actors.spawn import controller_name

    try:
        ctl = ControllerHandle(ray.get_actor(controller_name(deployment), namespace=cfg.namespace), deployment)
        cur = ctl.routing().result(cfg.control_timeout_s)
    except Exception:  # noqa: BLE001 - no controller yet (first start) or unreachable: the constructor's
        return table, expert_actors, kv_shards
    if int(cur["table"]["version"]) < int(table.get("version", 0)):
        return table, expert_actors, kv_shards
    return cur["table"], {**(expert_actors or {}), **cur["actors"]}, cur.get("kv_shards") or kv_shards
