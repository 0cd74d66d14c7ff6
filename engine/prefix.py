"""The engine's side of the KV store: prefix reuse at admission and write-through of completed blocks.

- Keys: a sequence's full blocks are keyed by the hash chain of kvstore/keys.py over prompt + generated ids,
  so equal prefixes share blocks and a resumed sequence finds the blocks of what it already generated.
- Admission: after the blocks the gating actor's own cache holds (engine/block_manager.py), the longest run
  of following blocks present in the store is fetched and written into the sequence's fresh pages instead of
  being recomputed. At least one token is always left to compute (its logits give the next token). A stored
  block carries every full pool's rows of the block and, of each windowed tensor, the block's last
  min(window, B) rows: what a query at the next block boundary reads (paged_cache.PagedKVCache.block_rows).
- Write-through: after each step, blocks that became complete are encoded with the codec and handed to the
  store client, which writes them asynchronously; at most `max_inflight` writes are pending; beyond that a
  write is dropped (counted), never waited for: the step never blocks on the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from moeray.engine.paged_cache import PagedKVCache
from moeray.engine.sequence import Sequence
from moeray.kvstore.codec import decode_block, encode_block
from moeray.kvstore.errors import CorruptBlockError
from moeray.kvstore.keys import ROOT_KEY, block_key


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


@dataclass(slots=True)
class SeqKeys:
    """Per-sequence key chain and how many of its blocks were already written."""

    keys: list[bytes] = field(default_factory=list)
    written: int = 0


class PrefixCache:
    def __init__(self, client: KVStoreClient, block_size: int, model_id: str, codec: str,
                 max_inflight: int = 64) -> None:
        self.client, self.block_size = client, block_size
        self.model_id, self.codec, self.max_inflight = model_id, codec, max_inflight
        self.stats = PrefixStats()
        self._keys: dict[str, SeqKeys] = {}

    def keys_for(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain keys of the first `num_blocks` full blocks of `seq` (extended incrementally)."""
        sk = self._keys.setdefault(seq.request_id, SeqKeys())
        ids, b = seq.all_ids, self.block_size
        while len(sk.keys) < num_blocks:
            i = len(sk.keys)
            parent = sk.keys[-1] if sk.keys else ROOT_KEY
            sk.keys.append(block_key(parent, ids[i * b:(i + 1) * b], self.model_id, self.codec))
        return sk.keys[:num_blocks]

    def lookup(self, seq: Sequence, first_block: int = 0) -> list[list[dict]]:
        """Fetch the longest run of stored blocks of `seq` from `first_block` on (whole blocks, leaving >= 1
        token): decoded payloads."""
        self.stats.lookups += 1
        n_blocks = (seq.num_tokens - 1) // self.block_size
        if n_blocks <= first_block:
            return []
        keys = self.keys_for(seq, n_blocks)[first_block:]
        payloads = []
        for data in self.client.get_many(keys):
            if data is None:
                break
            try:
                payloads.append(decode_block(data))
            except CorruptBlockError:
                self.stats.corrupt_blocks += 1
                break
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

    def write_through(self, cache: PagedKVCache, seq: Sequence) -> None:
        """Hand every newly completed block of `seq` to the store (non-blocking, bounded in flight)."""
        done = seq.num_computed // self.block_size
        sk = self._keys.setdefault(seq.request_id, SeqKeys())
        sk.written = max(sk.written, seq.block_table.store_from)  # local hits were stored by their writer
        if done <= sk.written:
            return
        keys = self.keys_for(seq, done)
        for i in range(sk.written, done):
            if self.client.num_inflight() >= self.max_inflight:
                self.stats.dropped_writes += 1
                continue
            self.client.put(keys[i], encode_block(cache.read_block(seq.block_table, i), self.codec))
            self.stats.written_blocks += 1
        sk.written = done

    def forget(self, seq: Sequence) -> None:
        self._keys.pop(seq.request_id, None)


class LocalKVClient:
    """A KVStoreClient over an in-process ShardStore (single process deployments and tests)."""

    def __init__(self, store) -> None:
        self.store = store

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for k in keys:
            v = self.store.get(k)
            out.append(v)
            if v is None:
                break
        return out

    def put(self, key: bytes, data: bytes) -> None:
        self.store.put(key, data)

    def num_inflight(self) -> int:
        return 0
