"""The engine's side of the KV store: prefix reuse at admission and write-through of completed blocks.

- Keys: a sequence's full blocks are keyed by the hash chain of kvstore/keys.py over prompt + generated ids,
  so equal prefixes share blocks and a resumed sequence finds the blocks of what it already generated. A
  request's `cache_salt` starts its chain from a salted root, so it shares blocks only with the same salt.
- Admission: after the blocks the gating actor's own cache holds (engine/block_manager.py), the longest run
  of following blocks present in the store is fetched and written into the sequence's fresh pages instead of
  being recomputed. At least one token is always left to compute (its logits give the next token). A stored
  block carries every full pool's rows of the block and, of each windowed tensor, the block's last
  min(window - 1, B) rows: what a query at the next block boundary reads (paged_cache.PagedKVCache.block_rows).
- Write-through: after each step, blocks that became complete are encoded with the codec and handed to the
  store client, which writes them asynchronously; at most `max_inflight` writes are pending; beyond that a
  write is dropped (counted), never waited for: the step never blocks on the store.
- Off the step thread (`background=True`, the gating actor): lookups are prefetched when a request is queued
  (one batched `get_many`, which the Ray client splits into one call per shard) and decoded there;
  write-through encoding and puts run on a writer thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from moeray.engine.paged_cache import PagedKVCache
from moeray.engine.sequence import Sequence
from moeray.kvstore.codec import decode_block, encode_block
from moeray.kvstore.errors import CorruptBlockError
from moeray.kvstore.keys import block_key, root_key


class KVStoreClient(Protocol):
    """The store as the engine sees it (a local ShardStore in tests, replicated shard actors on Ray)."""

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """Encoded blocks for the keys, None where missing; may stop at the first miss."""

    def put(self, key: bytes, data: bytes) -> None:
        """Start an asynchronous, replicated write (returns at once)."""

    def num_inflight(self) -> int:
        """Writes started and not yet acknowledged."""


@dataclass(slots=True)
class PrefixStats:
    lookups: int = 0
    hit_blocks: int = 0
    hit_tokens: int = 0
    written_blocks: int = 0
    dropped_writes: int = 0
    corrupt_blocks: int = 0
    prefetched: int = 0  # lookups answered by a prefetch started when the request was queued


@dataclass(slots=True)
class SeqKeys:
    """Per-sequence key chain and how many of its blocks were already written."""

    keys: list[bytes] = field(default_factory=list)
    written: int = 0


class PrefixCache:
    """The KV store from the engine's side. With `background`, store I/O leaves the step thread: `prefetch`
    (called when a request is queued or preempted) fetches and decodes its stored blocks on a reader thread,
    so admission usually finds them ready; write-through copies a completed block's rows on the step thread
    and encodes and puts it on a writer thread, which is the only thread that writes to the client."""

    def __init__(self, client: KVStoreClient, block_size: int, model_id: str, codec: str,
                 max_inflight: int = 64, background: bool = False) -> None:
        self.client, self.block_size = client, block_size
        self.model_id, self.codec, self.max_inflight = model_id, codec, max_inflight
        self.stats = PrefixStats()
        self._keys: dict[str, SeqKeys] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="moeray-kv-read") if background else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="moeray-kv-write") if background else None
        self._prefetched: dict[str, tuple[int, Future]] = {}
        self._lock = threading.Lock()
        self._pending_writes = 0

    def keys_for(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain keys of the first `num_blocks` full blocks of `seq` (extended incrementally)."""
        sk = self._keys.setdefault(seq.request_id, SeqKeys())
        ids, b = seq.all_ids, self.block_size
        while len(sk.keys) < num_blocks:
            i = len(sk.keys)
            parent = sk.keys[-1] if sk.keys else root_key(seq.cache_salt)
            sk.keys.append(block_key(parent, ids[i * b:(i + 1) * b], self.model_id, self.codec))
        return sk.keys[:num_blocks]

    # ---- reads ---------------------------------------------------------------------------------------
    def prefetch(self, seq: Sequence) -> None:
        """Start fetching `seq`'s stored leading blocks off the step thread (no-op without `background`)."""
        n_blocks = (seq.num_tokens - 1) // self.block_size
        if self._reader is None or n_blocks <= 0:
            return
        keys = list(self.keys_for(seq, n_blocks))
        self._prefetched[seq.request_id] = (n_blocks, self._reader.submit(self._fetch, keys))

    def _fetch(self, keys: list[bytes]) -> tuple[list[list[dict]], int]:
        """Get and decode the longest run of stored blocks for `keys` -> (payloads, corrupt blocks met)."""
        payloads = []
        for data in self.client.get_many(keys):
            if data is None:
                break
            try:
                payloads.append(decode_block(data))
            except CorruptBlockError:
                return payloads, 1
        return payloads, 0

    def lookup(self, seq: Sequence, first_block: int = 0) -> list[list[dict]]:
        """The longest run of stored blocks of `seq` from `first_block` on (whole blocks, leaving >= 1 token):
        decoded payloads. Uses the prefetched answer when it covers the same blocks."""
        self.stats.lookups += 1
        n_blocks = (seq.num_tokens - 1) // self.block_size
        ready = self._prefetched.pop(seq.request_id, None)
        if n_blocks <= first_block:
            return []
        if ready is not None and ready[0] == n_blocks:
            payloads, corrupt = ready[1].result()
            payloads = payloads[first_block:]
            self.stats.prefetched += 1
        else:
            payloads, corrupt = self._fetch(self.keys_for(seq, n_blocks)[first_block:])
        self.stats.corrupt_blocks += corrupt
        self.stats.hit_blocks += len(payloads)
        self.stats.hit_tokens += len(payloads) * self.block_size
        return payloads

    def load(self, cache: PagedKVCache, seq: Sequence, payloads: list[list[dict]]) -> None:
        """Write fetched blocks into the sequence's pages after its locally cached ones (mutates the cache)."""
        first = seq.block_table.store_from
        for i, payload in enumerate(payloads):
            cache.write_block(seq.block_table, first + i, payload)
        sk = self._keys.setdefault(seq.request_id, SeqKeys())
        sk.written = max(sk.written, first + len(payloads))

    # ---- writes --------------------------------------------------------------------------------------
    def write_through(self, cache: PagedKVCache, seq: Sequence) -> None:
        """Hand every newly completed block of `seq` to the store (non-blocking, bounded in flight)."""
        done = seq.num_computed // self.block_size
        sk = self._keys.setdefault(seq.request_id, SeqKeys())
        sk.written = max(sk.written, seq.block_table.store_from)  # local hits were stored by their writer
        if done <= sk.written:
            return
        keys = self.keys_for(seq, done)
        for i in range(sk.written, done):
            if self._writer is None:
                self._put(keys[i], cache.read_block(seq.block_table, i))
                continue
            with self._lock:
                full = self._pending_writes >= self.max_inflight
                self._pending_writes += 0 if full else 1
            if full:
                self._count("dropped_writes")
                continue
            self._writer.submit(self._put_async, keys[i], cache.read_block(seq.block_table, i))  # rows copied now
        sk.written = done

    def _put(self, key: bytes, payload: list[dict]) -> None:
        if self.client.num_inflight() >= self.max_inflight:
            self._count("dropped_writes")
            return
        self.client.put(key, encode_block(payload, self.codec))
        self._count("written_blocks")

    def _put_async(self, key: bytes, payload: list[dict]) -> None:
        try:
            self._put(key, payload)
        finally:
            with self._lock:
                self._pending_writes -= 1

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def flush(self) -> None:
        """Wait until every write handed over so far reached the client, then for the client's own in-flight
        writes (`client.flush` where it has one), on the writer thread."""
        flush = getattr(self.client, "flush", None)
        if self._writer is not None:
            self._writer.submit(flush or (lambda: None)).result()
        elif flush is not None:
            flush()

    def forget(self, seq: Sequence) -> None:
        self._keys.pop(seq.request_id, None)
        self._prefetched.pop(seq.request_id, None)


class LocalKVClient:
    """A KVStoreClient over an in-process ShardStore (single process deployments and tests)."""

    def __init__(self, store) -> None:
        self.store = store
        self._lock = threading.Lock()  # ShardStore is not thread-safe; a background PrefixCache reads and writes

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            for k in keys:
                v = self.store.get(k)
                out.append(v)
                if v is None:
                    break
        return out

    def put(self, key: bytes, data: bytes) -> None:
        with self._lock:
            self.store.put(key, data)

    def num_inflight(self) -> int:
        return 0
