"""ChannelTransport: expert calls over each expert actor's own socket (tensor_transport: socket), Ray as control plane.

The rows and answers of every layer's calls go over engine/channel.py's connection to each target actor (a Unix
socket on the same node, TCP to other nodes) instead of a Ray task: no task submission, no scheduling hop, no
result object (on the 2-core boxes measured here an empty Ray call to one actor costs ~0.9 ms, to four
2.1-2.4 ms; an empty call over the channel 0.3 ms to one, 0.7 ms to four; bench/dispatch.py). Everything else
stays on Ray: the address and token come from the actor's `channel_address` (its health concurrency group, over
Ray's authenticated connection), which is also the probe of the failover state machine (engine/failover.py; same
policy, hedging and fail-fast as the object store), so a restarted actor's new address arrives with the probe
that finds it back. A broken connection fails its pending calls as the actor being gone (the state machine
suspects the actor, re-plans the rows on replicas and probes it); the actor's own error comes back as that call's
error. Calls complete in the step thread (select over the connections), as on Ray. An actor whose channel cannot
be connected to (a firewalled port between nodes, say) is called through Ray's object store instead for
FALLBACK_S, with a warning naming the fix: slower, never lost.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch

from moeray.actors.handles import ExpertHandle
from moeray.actors.transport import RayBackend, RayTransport, RefFuture, failed_future
from moeray.engine.channel import ChannelClient, ChannelClosed, RemoteCallError, wait_readable
from moeray.engine.failover import Fault
from moeray.engine.wire import call_buffers
from moeray.router.dispatch import ActorBatch

SOCKET = "socket"
FALLBACK_S = 30.0  # after a failed connect, how long an actor's calls go through the object store
log = logging.getLogger(__name__)
_RAY_SLICE_S = 0.002  # while probes (Ray refs) are open too, how often the wait looks at them


class AddressProbe(RefFuture):
    """A probe (`channel_address`) of one actor: its answer is the actor's current channel address."""

    def __init__(self, ref: ray.ObjectRef, actor_id: int) -> None:
        super().__init__(ref)
        self.actor_id = actor_id


class ChannelBackend(RayBackend):
    """The state machine's backend over channels: sends on the actor's connection (opened on first use from the
    address its probe or a first `channel_address` gave), probes over Ray."""

    host_rows = True  # rows are written from host memory: pack them to the host in one copy

    def __init__(self, actors: dict[int, Any], timeout_s: float = 60.0, connect_timeout_s: float = 10.0) -> None:
        super().__init__(actors)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.node_id = ray.get_runtime_context().get_node_id()
        self.addresses: dict[int, dict[str, Any]] = {}
        self.clients: dict[int, ChannelClient] = {}
        self.fallback_until: dict[int, float] = {}  # actor -> monotonic time its calls go by Ray until
        self.counts = {"connects": 0, "fallbacks": 0}  # ChannelTransport makes this its stats dict

    def _client(self, actor_id: int) -> ChannelClient:
        c = self.clients.get(actor_id)
        if c is not None and not c.closed:
            return c
        addr = self.addresses.get(actor_id)
        if addr is None:  # first call (or after a failure with no probe since): ask the actor, bounded
            handle = self.actors.get(actor_id)
            if handle is None:
                raise KeyError(f"no handle for expert actor {actor_id}")
            addr = ExpertHandle(handle, actor_id).channel_address().result(self.connect_timeout_s)
            self.addresses[actor_id] = addr
        c = ChannelClient(addr, local=addr.get("node_id") == self.node_id, timeout_s=self.timeout_s)
        self.clients[actor_id] = c
        self.counts["connects"] += 1
        return c

    def send(self, actor_id: int, layer: int, x_rows: torch.Tensor, batch: ActorBatch):
        if self.fallback_until.get(actor_id, 0.0) > time.monotonic():
            return super().send(actor_id, layer, x_rows, batch)
        try:
            client = self._client(actor_id)
        except ChannelClosed as e:
            # cannot connect (a firewalled port, another network namespace, or the actor just died): this call and
            # the actor's next ones for FALLBACK_S go as Ray tasks through the object store, which either works
            # (slower) or fails the way a dead actor fails on Ray
            self.addresses.pop(actor_id, None)  # possibly stale (a restarted actor listens elsewhere)
            self.fallback_until[actor_id] = time.monotonic() + FALLBACK_S
            self.counts["fallbacks"] += 1
            fallbacks = self.counts["fallbacks"]
            if fallbacks == 1 or fallbacks % 100 == 0:
                log.warning("expert actor %d: its channel cannot be reached (%s); its calls go through Ray's object "
                            "store for %.0f s (fallback %d). Open the expert nodes' TCP ports to the gating nodes, or "
                            "set tensor_transport: object_store", actor_id, e, FALLBACK_S, fallbacks)
            return super().send(actor_id, layer, x_rows, batch)
        except Exception as e:  # noqa: BLE001 - a Ray error of channel_address: classified by fault_of
            return failed_future(e)
        rows, meta = call_buffers(x_rows, batch.pair_rows, batch.slot_ids, batch.weights)
        f = client.call(layer, meta, rows)
        if client.closed:
            self.addresses.pop(actor_id, None)
        return f

    def probe(self, actor_id: int):
        return AddressProbe(ExpertHandle(self.actors[actor_id], actor_id).channel_address().ref, actor_id)

    def fault_of(self, error: BaseException) -> Fault | None:
        if isinstance(error, ChannelClosed):
            return Fault.GONE
        if isinstance(error, RemoteCallError):
            return None  # the actor's own error: re-plan without it for this task
        return super().fault_of(error)

    def _complete(self, futures: list[RefFuture]) -> None:
        super()._complete(futures)
        for f in futures:
            if isinstance(f, AddressProbe) and f.exception() is None:
                self._learn(f.actor_id, f.result())

    def _learn(self, actor_id: int, addr: dict[str, Any]) -> None:
        """A probe's answer: a new address (a restarted actor) replaces the old connection."""
        if self.addresses.get(actor_id) == addr:
            return
        self.forget([actor_id])  # a new process: drop the old connection, try its channel again
        self.addresses[actor_id] = addr

    def forget(self, actor_ids) -> None:
        """Replaced handles: their next send asks the new actor for its address."""
        for a in actor_ids:
            self.addresses.pop(a, None)
            self.fallback_until.pop(a, None)
            old = self.clients.pop(a, None)
            if old is not None:
                old.close()

    def wait_any(self, futures, timeout_s: float) -> None:
        """Block until one of `futures` is done (or timeout_s): channel answers by select over the connections,
        probes (Ray refs) by ray.wait, looked at every few ms while both are open."""
        if not any(not isinstance(f, RefFuture) and not f.done() for f in futures):
            return super().wait_any(futures, timeout_s)
        refs = [f for f in futures if isinstance(f, RefFuture) and not f.done()]
        deadline = time.perf_counter() + max(0.0, timeout_s)
        while True:
            clients = [c for c in self.clients.values() if c.pending and not c.closed]
            remaining = deadline - time.perf_counter()
            wait_readable(clients, min(remaining, _RAY_SLICE_S) if refs else remaining)
            if refs:
                super().wait_any(refs, 0.0)
            if any(f.done() for f in futures) or time.perf_counter() >= deadline or not clients:
                return

    def close(self) -> None:
        self.forget(list(self.clients))


class ChannelTransport(RayTransport):
    """RayTransport whose calls travel over the expert actors' channels (the same failover state machine)."""

    tensor_transport = SOCKET

    def __init__(self, actors: dict[int, Any], table, call_timeout_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(actors, table, call_timeout_s=call_timeout_s,
                         backend=ChannelBackend(dict(actors), timeout_s=call_timeout_s), **kwargs)
        self.stats.update(self.backend.counts)
        self.backend.counts = self.stats  # the backend counts into the stats status() reports

    def set_actors(self, actors: dict[int, Any]) -> None:
        changed = [a for a, h in actors.items() if self.backend.actors.get(a) is not h]
        super().set_actors(actors)
        self.backend.forget(changed)

    def close(self) -> None:
        self.backend.close()
