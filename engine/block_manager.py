"""Pages of every cache pool: free lists, per-sequence page tables, the local prefix cache, byte accounting.

`can_allocate` / `allocate` pairs grow a sequence to hold tokens [start, upto) in every pool: full pools keep
pages from token 0, window pools only from `pool.keep_from(start)` (pages wholly before it are released, so
a sequence holds its window plus the chunk being computed). Pages are reference-counted.

Automatic prefix caching: once a block of B tokens is complete its pages are registered under the block's
hash-chain key (kvstore/keys.py, the KV store's keys): full pools under the key, window pages under
(key, page in block). A page whose last reference goes away stays cached (evictable, LRU) instead of free;
`match_prefix` finds the longest run of leading blocks whose full-pool pages and the window pages a query at
the boundary reads are all cached, and `acquire_prefix` shares them. Cached pages count as free: taking a page
evicts the least recently released one when the free list is empty. Cached pages are never written (a shared
block is complete; a sequence only writes rows after its cached prefix).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from moeray.common.errors import RequestError
from moeray.engine.paged_cache import PagedKVCache, PoolSpec, SeqBlocks, plan_pools
from moeray.engine.sequence import Sequence
from moeray.kvstore.keys import block_key, root_key
from moeray.kvstore.spec import ModelCacheSpec


class KVBudgetError(RequestError):
    """A request can never fit the KV cache."""


@dataclass(slots=True)
class CacheStats:
    lookups: int = 0
    hit_blocks: int = 0
    hit_tokens: int = 0
    queried_tokens: int = 0  # prompt tokens looked up (hit rate = hit_tokens / queried_tokens)
    evicted_pages: int = 0


class _Pool:
    """One pool's pages: free list, reference counts, key <-> page maps, evictable LRU."""

    def __init__(self, spec: PoolSpec, num_pages: int) -> None:
        self.spec, self.num_pages = spec, num_pages
        self.free: deque[int] = deque(range(num_pages))
        self.refs = [0] * num_pages
        self.page_of: dict[object, int] = {}
        self.key_of: dict[int, object] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # ref 0 and keyed: least recently released first

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.lru)

    def take(self, stats: CacheStats) -> int:
        if self.free:
            page = self.free.popleft()
        else:
            page, _ = self.lru.popitem(last=False)
            del self.page_of[self.key_of.pop(page)]
            stats.evicted_pages += 1
        self.refs[page] = 1
        return page

    def share(self, page: int) -> None:
        if self.refs[page] == 0:
            self.lru.pop(page, None)
        self.refs[page] += 1

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        assert self.refs[page] >= 0, page
        if self.refs[page] == 0:
            if page in self.key_of:
                self.lru[page] = None
            else:
                self.free.append(page)

    def register(self, key: object, page: int) -> None:
        if key not in self.page_of and page not in self.key_of:
            self.page_of[key], self.key_of[page] = page, key


class BlockManager:
    def __init__(self, pools: tuple[PoolSpec, ...], num_pages: list[int], block_size: int, itemsize: int = 4,
                 model_id: str = "local", codec: str = "none", prefix_caching: bool = True,
                 budget_field: str = "kv_cache_blocks") -> None:
        assert block_size > 0 and all(n > 0 for n in num_pages)
        self.block_size, self.itemsize = block_size, itemsize
        self.pools = [_Pool(p, n) for p, n in zip(pools, num_pages, strict=True)]
        self.model_id, self.codec, self.prefix_caching = model_id, codec, prefix_caching
        self.budget_field = budget_field
        self.stats = CacheStats()

    # ---- capacity ----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Free blocks of B tokens (cached pages count as free): the scarcest pool's."""
        return min(p.num_free * p.spec.page_tokens // self.block_size for p in self.pools)

    def check_fits(self, num_tokens: int, what: str) -> None:
        """Raise KVBudgetError (naming the budget field and the bytes needed) if a sequence of `num_tokens`
        tokens can never be held, even alone. `what` describes the request. (Window pools are sized to hold at
        least one sequence's window and chunk, see size_pools.)"""
        short = [(p, self._pages_upto(p.spec, 0, num_tokens)) for p in self.pools if not p.spec.window]
        short = [(p, n) for p, n in short if n > p.num_pages]
        if not short:
            return
        need = sum(n * p.spec.page_bytes(self.itemsize) for p, n in short)
        have = sum(p.num_pages * p.spec.page_bytes(self.itemsize) for p, _ in short)
        pools = ", ".join(f"{p.spec.name} needs {n} pages, has {p.num_pages}" for p, n in short)
        raise KVBudgetError(
            f"{what} = {num_tokens} tokens needs {need} bytes of KV cache in pools the budget gives {have} "
            f"bytes ({pools}): lower max_tokens or shorten the prompt, or raise {self.budget_field}")

    def _pages_upto(self, pool: PoolSpec, start: int, upto: int) -> int:
        """Pages pool needs to hold a sequence's tokens [keep_from(start), upto)."""
        pt = pool.page_tokens
        return -(-upto // pt) - pool.keep_from(start) // pt

    def usage(self) -> dict[str, dict[str, int]]:
        """Per pool: bytes held by sequences, cached (evictable), free, and the total."""
        out = {}
        for p in self.pools:
            pb = p.spec.page_bytes(self.itemsize)
            used = p.num_pages - p.num_free
            out[p.spec.name] = {"used_bytes": used * pb, "cached_bytes": len(p.lru) * pb,
                                "free_bytes": len(p.free) * pb, "total_bytes": p.num_pages * pb}
        return out

    def cache_stats(self) -> dict[str, float]:
        """The local prefix cache's counters and hit rate (hit tokens / looked-up prompt tokens)."""
        st = self.stats
        return {"lookups": st.lookups, "hit_blocks": st.hit_blocks, "hit_tokens": st.hit_tokens,
                "queried_tokens": st.queried_tokens, "evicted_pages": st.evicted_pages,
                "hit_rate": st.hit_tokens / st.queried_tokens if st.queried_tokens else 0.0}

    def held_bytes(self, seq: Sequence) -> int:
        """Bytes of pages `seq` holds in all pools (shared pages counted in full)."""
        blocks = self._blocks(seq)
        return sum(blocks.num_held(i) * p.spec.page_bytes(self.itemsize) for i, p in enumerate(self.pools))

    # ---- allocation --------------------------------------------------------------------------------
    def _blocks(self, seq: Sequence) -> SeqBlocks:
        if not isinstance(seq.block_table, SeqBlocks):
            seq.block_table = SeqBlocks([[] for _ in self.pools])
        return seq.block_table

    def _new_pages(self, pool: _Pool, blocks: SeqBlocks, pid: int, start: int, upto: int) -> int:
        needed_from = pool.spec.keep_from(start) // pool.spec.page_tokens
        held_to = blocks.first[pid] + len(blocks.tables[pid])
        return max(0, -(-upto // pool.spec.page_tokens) - max(held_to, needed_from))

    def can_allocate(self, seq: Sequence, upto_tokens: int, start: int | None = None) -> bool:
        """Whether the pages to hold tokens [start, upto_tokens) of `seq` (start: seq.num_computed) are free."""
        start = seq.num_computed if start is None else start
        blocks = self._blocks(seq)
        return all(self._new_pages(p, blocks, pid, start, upto_tokens) <= p.num_free
                   for pid, p in enumerate(self.pools))

    def allocate(self, seq: Sequence, upto_tokens: int, start: int | None = None) -> None:
        """Grow `seq`'s tables to hold tokens [start, upto_tokens), dropping window pages before the window
        (mutates seq). Call can_allocate first."""
        start = seq.num_computed if start is None else start
        blocks = self._blocks(seq)
        for pid, (pool, table) in enumerate(zip(self.pools, blocks.tables, strict=True)):
            need = self._new_pages(pool, blocks, pid, start, upto_tokens)
            assert need <= pool.num_free, (pool.spec.name, need, pool.num_free)
            self._drop_before(blocks, pid, start)
            for _ in range(need):
                table.append(pool.take(self.stats))

    def trim(self, seq: Sequence) -> None:
        """After a step: register newly complete blocks, release window pages no future query reads."""
        blocks = self._blocks(seq)
        self.commit(seq)
        for pid in range(len(self.pools)):
            self._drop_before(blocks, pid, seq.num_computed)

    def _drop_before(self, blocks: SeqBlocks, pid: int, next_pos: int) -> None:
        pool, table = self.pools[pid], blocks.tables[pid]
        if not pool.spec.window:
            return
        needed_from = pool.spec.keep_from(next_pos) // pool.spec.page_tokens
        drop = max(0, min(len(table), needed_from - blocks.first[pid]))
        for page in table[:drop]:
            pool.release(page)
        del table[:drop]
        blocks.first[pid] = max(blocks.first[pid] + drop, needed_from) if not table else blocks.first[pid] + drop

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s pages (complete blocks stay cached); its keys are kept (mutates seq)."""
        blocks = self._blocks(seq)
        self.commit(seq)
        for pid, (pool, table) in enumerate(zip(self.pools, blocks.tables, strict=True)):
            for page in table:
                pool.release(page)
            table.clear()
            blocks.first[pid] = 0
        blocks.num_committed = blocks.store_from = 0

    # ---- the local prefix cache --------------------------------------------------------------------
    def keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain keys of the first `num_blocks` full blocks of `seq` (extended incrementally)."""
        blocks, b = self._blocks(seq), self.block_size
        ids = seq.all_ids
        while len(blocks.keys) < num_blocks:
            i = len(blocks.keys)
            parent = blocks.keys[-1] if blocks.keys else root_key(seq.cache_salt)
            blocks.keys.append(block_key(parent, ids[i * b:(i + 1) * b], self.model_id, self.codec))
        return blocks.keys[:num_blocks]

    def commit(self, seq: Sequence) -> None:
        """Register the pages of `seq`'s blocks completed since the last commit under their keys."""
        if not self.prefix_caching:
            return
        blocks = self._blocks(seq)
        done = seq.num_computed // self.block_size
        if done <= blocks.num_committed:
            return
        keys = self.keys(seq, done)
        for pid, pool in enumerate(self.pools):
            per = self.block_size // pool.spec.page_tokens  # pages per block
            for j in range(blocks.num_committed, done):
                for q in range(per):
                    page = blocks.page(pid, j * per + q)
                    if page >= 0:
                        pool.register(keys[j] if not pool.spec.window else (keys[j], q), page)
        blocks.num_committed = done

    def match_prefix(self, seq: Sequence) -> int:
        """Leading blocks of `seq` the local cache holds whole (leaving >= 1 token to compute)."""
        if not self.prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self.stats.lookups += 1
        self.stats.queried_tokens += max(0, max_blocks * self.block_size)
        if max_blocks <= 0:
            return 0
        keys = self.keys(seq, max_blocks)
        full = [p for p in self.pools if not p.spec.window]
        k = 0
        while k < max_blocks and all(keys[k] in p.page_of for p in full):
            k += 1
        while k > 0 and not self._window_cached(keys, k):
            k -= 1
        return k

    def _window_cached(self, keys: list[bytes], k: int) -> bool:
        return all(self._window_key(p.spec, keys, i) in p.page_of
                   for p in self.pools if p.spec.window for i in self._window_pages(p.spec, k))

    def _window_pages(self, pool: PoolSpec, k: int) -> range:
        """Pages of `pool` a query at the boundary after k blocks reads."""
        end = k * self.block_size
        return range(pool.keep_from(end) // pool.page_tokens, end // pool.page_tokens)

    def _window_key(self, pool: PoolSpec, keys: list[bytes], page: int) -> tuple[bytes, int]:
        per = self.block_size // pool.page_tokens
        return keys[page // per], page % per

    def acquire_prefix(self, seq: Sequence, k: int) -> None:
        """Share the cached pages of `seq`'s first k blocks (from `match_prefix`) into its empty tables."""
        blocks = self._blocks(seq)
        assert all(not t for t in blocks.tables), "acquire_prefix on a sequence that holds pages"
        keys = self.keys(seq, k)
        for pid, (pool, table) in enumerate(zip(self.pools, blocks.tables, strict=True)):
            if pool.spec.window:
                pages = self._window_pages(pool.spec, k)
                blocks.first[pid] = pages.start
                found = [pool.page_of[self._window_key(pool.spec, keys, i)] for i in pages]
            else:
                found = [pool.page_of[key] for key in keys]
            for page in found:
                pool.share(page)
            table.extend(found)
        blocks.num_committed = blocks.store_from = k
        if k:
            self.stats.hit_blocks += k
            self.stats.hit_tokens += k * self.block_size


# ---- sizing the pools ------------------------------------------------------------------------------------
WINDOW_SHARE = 1 / 8  # of kv_cache_bytes the window pools may take beyond what one sequence needs


def size_pools(pools: tuple[PoolSpec, ...], block_size: int, itemsize: int, *, num_blocks: int,
               kv_cache_bytes: int | None, max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Pages per pool. Without a byte budget every pool holds `num_blocks` blocks' worth of tokens (the
    blocks mode). With `kv_cache_bytes` (all pools together): window pools get what `max_num_seqs`
    sequences hold (window + two pages each, plus one step's prefill tokens), capped at WINDOW_SHARE of the
    budget but never below one sequence's need; the full pools split the rest by their bytes per token, so
    they fill up together. Raises ValueError naming kv_cache_bytes when it cannot hold one block."""
    if kv_cache_bytes is None:
        return [num_blocks * block_size // p.page_tokens for p in pools]

    def window_pages(p: PoolSpec, seqs: int) -> int:
        return -(-(seqs * (p.window + 2 * p.page_tokens) + max_num_batched_tokens) // p.page_tokens)

    windows = [p for p in pools if p.window]
    lo = sum(window_pages(p, 1) * p.page_bytes(itemsize) for p in windows)
    hi = sum(window_pages(p, max_num_seqs) * p.page_bytes(itemsize) for p in windows)
    share = min(hi, max(lo, int(kv_cache_bytes * WINDOW_SHARE)))
    full = [p for p in pools if not p.window]
    full_bpt = sum(p.bytes_per_token(itemsize) for p in full)
    rest = kv_cache_bytes - share
    out = []
    for p in pools:
        if p.window:
            n = window_pages(p, 1) + (share - lo) * (window_pages(p, max_num_seqs) - window_pages(p, 1)) // max(
                1, hi - lo)
        else:
            n = int(rest * (p.bytes_per_token(itemsize) / full_bpt) // p.page_bytes(itemsize))
        out.append(n)
    if any(n < 1 for n in out) or rest < 0:
        need = lo + sum(p.page_bytes(itemsize) for p in full)
        raise ValueError(f"kv_cache_bytes={kv_cache_bytes} cannot hold one block of this model's cache with one "
                         f"step's tokens ({need} bytes at least, max_num_batched_tokens={max_num_batched_tokens}): "
                         "raise kv_cache_bytes")
    return out


def build_kv_cache(spec: ModelCacheSpec, config, prefix=None, model_dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[PagedKVCache, BlockManager]:
    """The paged cache (storage on `device`) and its block manager (host bookkeeping) for an EngineConfig-like
    `config` (block_size, num_blocks, kv_cache_bytes, kv_cache_dtype, max_num_seqs, max_num_batched_tokens,
    prefix_caching). Storage defaults to the model's dtype, and reads return it. Keys are the KV store's
    (`prefix`'s model id and codec) when there is one."""
    pools = plan_pools(spec, config.block_size)
    dtype = config.kv_cache_dtype or model_dtype
    pages = size_pools(pools, config.block_size, dtype.itemsize, num_blocks=config.num_blocks,
                       kv_cache_bytes=config.kv_cache_bytes, max_num_seqs=config.max_num_seqs,
                       max_num_batched_tokens=config.max_num_batched_tokens)
    cache = PagedKVCache(spec, pools, pages, config.block_size, dtype=dtype, compute_dtype=model_dtype, device=device)
    key = (prefix.model_id, prefix.codec) if prefix is not None else ("local", "none")
    blocks = BlockManager(pools, pages, config.block_size, dtype.itemsize, *key, prefix_caching=config.prefix_caching,
                          budget_field="kv_cache_bytes" if config.kv_cache_bytes is not None else "kv_cache_blocks")
    return cache, blocks
