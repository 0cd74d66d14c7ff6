"""KVShardActor: one shard of the KV-store service (a ShardStore in an actor), and the engine's client that
writes every block to r shards of a hash ring and reads from the first live one.

"No lost block" means no block whose write was acknowledged: a write is acknowledged when all r replicas
stored it. A shard that dies loses its memory; the controller restores the replication factor by copying
from the surviving replicas (`repair`).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import ray

from moeray.actors.handles import RAY_CALL_ERRORS, KVShardHandle
from moeray.common.errors import ActorError
from moeray.kvstore.ring import HashRing
from moeray.kvstore.store import ShardStore

MAX_ACKED_KEYS = 100_000  # acknowledged keys remembered (16 bytes each) for tests and repair checks


class KVShardActor:
    def __init__(self, shard_id: str, capacity_bytes: int, spill_dir: str | None = None,
                 spill_capacity_bytes: int | None = None) -> None:
        """`spill_dir`: evicted blocks go to disk there instead of being dropped, and a restarted shard on the
        same node finds them again."""
        self.shard_id = shard_id
        self.store = ShardStore(capacity_bytes, spill_dir=spill_dir, spill_capacity_bytes=spill_capacity_bytes)
        self.started_at = time.time()  # changes when Ray restarts the shard (empty): the controller repairs it

    def put(self, key: bytes, value: bytes) -> bool:
        self.store.put(key, value)
        return True

    def get(self, key: bytes) -> bytes | None:
        return self.store.get(key)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return [self.store.get(k) for k in keys]

    def contains(self, keys: list[bytes]) -> list[bool]:
        return [self.store.contains(k) for k in keys]

    def delete(self, key: bytes) -> bool:
        return self.store.delete(key)

    def keys(self) -> list[bytes]:
        return self.store.keys()

    @ray.method(concurrency_group="health")
    def ping(self) -> str:
        return self.shard_id

    def stats(self) -> dict[str, Any]:
        return {"shard_id": self.shard_id, "started_at": self.started_at, **self.store.stats().to_dict(),
                "node_id": ray.get_runtime_context().get_node_id()}


class RayKVClient:
    """The engine's KVStoreClient over shard actors: replicated, non-blocking writes; reads from the first
    live replica. Acknowledged keys (all r copies stored) are counted (`num_acked`) and the latest
    MAX_ACKED_KEYS kept (`acked`) for tests and metrics."""

    def __init__(self, shards: dict[str, Any], replication: int = 2, timeout_s: float = 10.0) -> None:
        self.shards = {sid: KVShardHandle(h, sid) for sid, h in shards.items()}
        self.ring = HashRing(list(shards), replication=replication)
        self.timeout_s = timeout_s
        self._inflight: collections.deque = collections.deque()  # (key, [Reply])
        self.acked: collections.deque[bytes] = collections.deque(maxlen=MAX_ACKED_KEYS)
        self.num_acked = 0
        self.failed_writes = 0

    def set_shards(self, shards: dict[str, Any]) -> None:
        for sid in set(self.shards) - set(shards):
            self.ring.remove_shard(sid)
        for sid in set(shards) - set(self.shards):
            self.ring.add_shard(sid)
        self.shards = {sid: KVShardHandle(h, sid) for sid, h in shards.items()}

    def put(self, key: bytes, data: bytes) -> None:
        ref = ray.put(data)  # one copy in the object store, shared by the r writes
        replies = [self.shards[s].put(key, ref) for s in self.ring.owners(key)]
        self._inflight.append((key, replies))
        self._reap()

    def num_inflight(self) -> int:
        self._reap()
        return len(self._inflight)

    def _reap(self) -> None:
        while self._inflight:
            key, replies = self._inflight[0]
            refs = [r.ref for r in replies]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(ready) < len(refs):
                return
            self._inflight.popleft()
            try:
                for r in replies:
                    r.result(0)
                self.acked.append(key)
                self.num_acked += 1
            except ActorError:
                self.failed_writes += 1

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every in-flight write (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            refs = [r.ref for r in self._inflight[0][1]]
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            self._reap()

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """One batched call per shard, all in flight together; keys a replica lacks (or whose shard is dead) are
        asked of their next replica in one more round. Stops at the first key no replica has."""
        found: dict[bytes, bytes] = {}
        todo = list(dict.fromkeys(keys))
        for replica in range(self.ring.replication):
            by_shard: dict[str, list[bytes]] = {}
            for k in todo:
                owners = self.ring.owners(k)
                if replica < len(owners):
                    by_shard.setdefault(owners[replica], []).append(k)
            replies = {sid: self.shards[sid].get_many(ks) for sid, ks in by_shard.items()}
            todo = []
            for sid, reply in replies.items():
                try:
                    # a future, not ray.get: this runs off the event loop of an async actor
                    values = reply.future().result(timeout=self.timeout_s)
                except RAY_CALL_ERRORS:
                    values = [None] * len(by_shard[sid])
                for k, v in zip(by_shard[sid], values, strict=True):
                    if v is None:
                        todo.append(k)
                    else:
                        found[k] = v
            if not todo:
                break
        out: list[bytes | None] = []
        for k in keys:
            out.append(found.get(k))
            if out[-1] is None:
                break
        return out

    def _get(self, key: bytes) -> bytes | None:
        for sid in self.ring.owners(key):
            try:
                # a future, not ray.get: this runs on the step thread of an async actor
                v = self.shards[sid].get(key).future().result(timeout=self.timeout_s)
            except RAY_CALL_ERRORS:
                continue
            if v is not None:
                return v
        return None
