"""RayTransport: the engine's ExpertTransport over expert-group actors (one call per target actor per layer).

The wire (moeray.engine.wire): per target actor one `bytes` of rows in the wire dtype (the experts' compute
dtype) plus a small `bytes` of routing (header and int32 pairs); answers come back as `bytes` in the wire dtype
and are combined with one scatter. Failover, hedging and fail-fast are the state machine of
moeray.engine.failover; this module binds it to Ray: sends are `forward.remote`, probes are `ping` (the actors'
health concurrency group), Ray errors are classified once, by moeray.actors.handles.classify.

On a gating engine with a device (cuda, npu) the layer's routing ([N, K] ids and weights) comes to the host in one
copy (the dispatch plan and the failover bookkeeping are host work); the rows are gathered on the device and
cross to the host in one copy when the backend sends host arrays (`host_rows`: the object store), else stay on
the device (RDT); answers are combined on the device.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import ray
import torch

from moeray.actors.handles import ExpertHandle, classify
from moeray.common.errors import ActorGoneError, ActorTimeoutError, ActorTransientError
from moeray.engine.failover import ExpertCall, FailoverCaller, FailoverPolicy, Fault
from moeray.engine.transport import ExpertLoad, ExpertRowsFailed
from moeray.engine.wire import decode_answer, encode_call, host_routing, pack_rows, scatter_rows
from moeray.router.dispatch import ActorBatch
from moeray.router.table import RoutingTable

_FAULTS = {ActorGoneError: Fault.GONE, ActorTransientError: Fault.TRANSIENT, ActorTimeoutError: Fault.TIMEOUT}


class RefFuture(concurrent.futures.Future):
    """A Future of one Ray call, completed by RayBackend.wait_any (the step thread) rather than by Ray's callback
    thread: `ref.future()` costs a thread hand-off and a deserialization off the waiting thread per call
    (measured ~0.3 ms per 4-actor fan-out on this box), and does not work at all for RDT refs."""

    def __init__(self, ref: ray.ObjectRef) -> None:
        super().__init__()
        self.ref = ref


def failed_future(error: BaseException) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_exception(error)
    return f


class RayBackend:
    """The state machine's view of the expert actors: send, probe, classify, wait. Sends and probes return
    RefFutures; `wait_any` blocks in `ray.wait` and completes every ready one (one `ray.get` for all of them)."""

    host_rows = True  # rows are sent as host (numpy) arrays: pack them to the host in one copy

    def __init__(self, actors: dict[int, Any]) -> None:
        self.actors = actors

    def send(self, actor_id: int, layer: int, x_rows: torch.Tensor, batch: ActorBatch):
        handle = self.actors.get(actor_id)
        if handle is None:  # a table entry whose handle has not arrived yet
            return failed_future(KeyError(f"no handle for expert actor {actor_id}"))
        rows, meta = encode_call(x_rows, batch.pair_rows, batch.slot_ids, batch.weights)
        return RefFuture(ExpertHandle(handle, actor_id).forward(layer, rows, meta).ref)

    def probe(self, actor_id: int):
        return RefFuture(ExpertHandle(self.actors[actor_id], actor_id).ping().ref)

    def fault_of(self, error: BaseException) -> Fault | None:
        kind = classify(error)
        return None if kind is None else _FAULTS.get(kind, Fault.GONE)

    def decode(self, answer: Any) -> torch.Tensor:
        return decode_answer(answer)

    def answer(self, value: Any) -> Any:
        """A ready call's value -> the future's result (RDT: pulls the tensor the value refers to)."""
        return value

    def now(self) -> float:
        return time.perf_counter()

    def wait_any(self, futures, timeout_s: float) -> None:
        """Block until one of `futures` is ready (or timeout_s), then complete every ready one."""
        open_ = {f.ref: f for f in futures if isinstance(f, RefFuture) and not f.done()}
        if not open_:
            if futures:
                concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)
            elif timeout_s > 0:
                time.sleep(min(timeout_s, 0.05))
            return
        refs = list(open_)
        ready, rest = ray.wait(refs, num_returns=1, timeout=max(0.0, timeout_s))
        if ready and rest:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        self._complete([open_[r] for r in ready])

    def _complete(self, futures: list[RefFuture]) -> None:
        try:
            values = ray.get([f.ref for f in futures])
        except Exception:  # noqa: BLE001 - one failed: read them one by one below
            values = None
        for i, f in enumerate(futures):
            try:
                f.set_result(self.answer(values[i] if values is not None else ray.get(f.ref)))
            except Exception as e:  # noqa: BLE001 - classified by the state machine (fault_of)
                f.set_exception(e)


class RayTransport:
    """ExpertTransport over Ray actors. `wire_dtype`: what rows travel in (the experts' compute dtype).
    `dead_grace_s`: how long rows needing an actor Ray reports dead wait for a replacement handle (set_actors, from
    the controller) before they fail; 0 (no controller): fail at once.
    `overlaps`: whether the experts compute on resources of their own (an accelerator), so that splitting a
    step into micro-batches can hide their calls; on CPU actors sharing the gating actor's cores it only adds
    calls (measured by bench/dispatch.py --compare-mb1), so the default micro-batch choice then stays at 1."""

    def __init__(self, actors: dict[int, Any], table: RoutingTable, call_timeout_s: float = 60.0,
                 wire_dtype: torch.dtype = torch.float32, policy: FailoverPolicy | None = None,
                 overlaps: bool = False, dead_grace_s: float = 0.0, backend: RayBackend | None = None) -> None:
        self.table = table
        self.overlaps = overlaps
        self.wire_dtype = wire_dtype
        self.backend = backend or RayBackend(dict(actors))  # RDT: moeray.actors.rdt.RdtBackend
        policy = policy or FailoverPolicy(call_timeout_s=call_timeout_s, dead_grace_s=dead_grace_s)
        rows_device = "cpu" if self.backend.host_rows else None
        self.caller = FailoverCaller(self.backend, policy,
                                     lambda x, batches, dtype: pack_rows(x, batches, dtype, rows_device))
        self.load = ExpertLoad()
        self.stats = self.caller.stats
        self.stats.update(dispatch_s=0.0)

    @property
    def actors(self) -> dict[int, Any]:
        return self.backend.actors

    @property
    def excluded(self) -> set[int]:
        """Actors new calls route around (suspect or dead in this transport's view)."""
        return self.caller.health.unavailable()

    def set_table(self, table: RoutingTable) -> None:
        self.table = table

    def set_actors(self, actors: dict[int, Any]) -> None:
        """New handles (replacements): keep the others (they may still finish in-flight calls)."""
        changed = [a for a, h in actors.items() if self.backend.actors.get(a) is not h]
        self.backend.actors = {**self.backend.actors, **actors}
        self.caller.health.forget(changed)

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> ExpertCall:
        t0 = time.perf_counter()
        table = self.table
        if ids.device.type != "cpu":
            ids, weights = host_routing(ids, weights)
        self.load.add(layer, ids, table.num_experts)
        call = self.caller.submit(layer, x, ids, weights, table, self.wire_dtype)
        self.stats["dispatch_s"] += time.perf_counter() - t0
        return call

    def wait(self, call: ExpertCall) -> torch.Tensor:
        batches, outs, failed = self.caller.wait(call, lambda: self.table, self.wire_dtype)
        out = scatter_rows(call.x.shape[0], call.x.shape[1], batches, outs, call.x.dtype, call.x.device)
        if failed:
            rows = torch.unique(torch.cat([r for r, _ in failed]))
            raise ExpertRowsFailed("; ".join(sorted({why for _, why in failed})), out, rows)
        return out
