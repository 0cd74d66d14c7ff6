"""The paged KV cache: one pool per cached tensor kind, each with its own row rate and page size.

A pool groups the cached tensors (of every layer) that share `tokens_per_row` and `window`:

    full/1      K/V, MLA latents                       page = block_size tokens, every page kept
    full/m      V4 compressed and indexer rows (1/m)   page = block_size tokens = block_size / m rows
    window/W    V4 sliding-window K=V, GQA windows     small pages; pages a future query cannot read are freed
    window/2m   V4 compressor inputs of the open window

A sequence holds one page table per pool (`SeqBlocks.tables`; a window pool's table starts at page
`SeqBlocks.first[P]`, the pages before it dropped). Row r of a tensor in pool P lives at storage row
`table[P][r // rpp - first[P]] * rpp + r % rpp` (rpp = rows per page). Storage is
in the cache dtype (float32 / bfloat16 / fp8_e4m3, the latter held as raw bytes); reads return the compute
dtype, so the `none` codec sees exactly what is stored. Attention modules see a `LayerCache` (`write` /
`read`), so the same model code runs over this cache and over the reference's contiguous one.

Storage lives on the engine's torch `device` (the gating actor's placement: cpu, cuda, npu); page tables are
built on the host from the block manager's lists and move to the device once per step (models/paged_attention.py)
or per index computed here. Block payloads for the KV store (`read_block` / `write_block`) are host tensors.

Legend: B = block_size, P = pool, rpp = rows per page, S = sequences, L = longest context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeray.kvstore.spec import CacheTensorSpec, ModelCacheSpec

HOST = torch.device("cpu")  # page tables and index arithmetic: host tensors, said explicitly (a default device never
# moves them)
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def cache_dtype(name: str) -> torch.dtype | None:
    """ServeConfig.kv_cache_dtype -> the storage dtype; None for `auto` (the model's serving dtype)."""
    if name == "auto":
        return None
    if name not in CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not one of auto, {', '.join(CACHE_DTYPES)}")
    return CACHE_DTYPES[name]


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The tensors (layer_id, spec) that share a row rate and a window, paged by `page_tokens` tokens."""

    tokens_per_row: int
    window: int  # 0: every row is kept; else only rows a future query can read
    page_tokens: int
    tensors: tuple[tuple[int, CacheTensorSpec], ...]

    def __post_init__(self) -> None:
        assert self.page_tokens % self.tokens_per_row == 0, self

    @property
    def name(self) -> str:
        return f"window/{self.window}" if self.window else f"full/{self.tokens_per_row}"

    @property
    def rows_per_page(self) -> int:
        return self.page_tokens // self.tokens_per_row

    def page_bytes(self, itemsize: int) -> int:
        return self.rows_per_page * sum(t.row_numel() for _, t in self.tensors) * itemsize

    def bytes_per_token(self, itemsize: int) -> float:
        return self.page_bytes(itemsize) / self.page_tokens

    def keep_from(self, next_pos: int) -> int:
        """The first token position a query at `next_pos` or later can read (0 for full pools)."""
        return max(0, next_pos - self.window + 1) if self.window else 0


def window_page_tokens(block_size: int, window: int, tokens_per_row: int) -> int:
    """Pages of about window / 16 tokens (>= one row, dividing the block): a window holds at most one partial
    page beyond what a query reads, and a block boundary is always a page boundary."""
    target = max(tokens_per_row, window // 16)
    return max(d for d in range(tokens_per_row, block_size + 1, tokens_per_row)
               if block_size % d == 0 and d <= target)


def plan_pools(spec: ModelCacheSpec, block_size: int) -> tuple[PoolSpec, ...]:
    """Group every layer's cached tensors into pools by (tokens_per_row, window), full pools first."""
    spec.check_block_size(block_size)
    groups: dict[tuple[int, int], list[tuple[int, CacheTensorSpec]]] = {}
    for layer_id, layer in enumerate(spec.layers):
        for t in layer.tensors:
            groups.setdefault((t.tokens_per_row, t.window), []).append((layer_id, t))
    pools = []
    for (tpr, window), tensors in sorted(groups.items(), key=lambda kv: (kv[0][1] > 0, kv[0])):
        page = window_page_tokens(block_size, window, tpr) if window else block_size
        pools.append(PoolSpec(tpr, window, page, tuple(tensors)))
    return tuple(pools)


@dataclass(slots=True)
class SeqBlocks:
    """One sequence's pages: a table per pool, starting at page `first[pool]` (window pools drop the pages
    before it), and its block keys so far."""

    tables: list[list[int]]
    first: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    num_committed: int = 0  # leading full blocks registered with the local prefix cache
    store_from: int = 0  # blocks before this came from the local cache (not re-written to the KV store)

    def __post_init__(self) -> None:
        if not self.first:
            self.first = [0] * len(self.tables)

    def num_held(self, pool_id: int) -> int:
        return len(self.tables[pool_id])

    def page(self, pool_id: int, i: int) -> int:
        """The page holding page index i of the sequence in `pool_id`, -1 if dropped or not allocated."""
        j = i - self.first[pool_id]
        table = self.tables[pool_id]
        return table[j] if 0 <= j < len(table) else -1


class PagedKVCache:
    def __init__(self, spec: ModelCacheSpec, pools: tuple[PoolSpec, ...], num_pages: list[int], block_size: int,
                 dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.spec, self.pools, self.num_pages, self.block_size = spec, pools, list(num_pages), block_size
        self.dtype, self.compute_dtype = dtype, compute_dtype
        self.device = torch.device(device)
        self._raw = dtype.itemsize == 1  # fp8: stored as bytes (CPU index ops have no fp8 kernels)
        self.batched_decode_calls = 0
        self.storage: list[dict[str, torch.Tensor]] = [{} for _ in spec.layers]  # layer -> name -> rows
        self.pool_of: list[dict[str, int]] = [{} for _ in spec.layers]
        for pid, (pool, n) in enumerate(zip(pools, num_pages, strict=True)):
            for layer_id, t in pool.tensors:
                rows = (n * pool.rows_per_page, *t.row_shape)
                self.storage[layer_id][t.name] = torch.zeros(rows, dtype=torch.uint8 if self._raw else dtype,
                                                             device=self.device)
                self.pool_of[layer_id][t.name] = pid

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def nbytes(self) -> int:
        return sum(p.nbytes for layer in self.storage for p in layer.values())

    def view(self, blocks: SeqBlocks) -> SeqCacheView:
        return SeqCacheView(self, blocks)

    # ---- storage dtype -------------------------------------------------------------------------------
    # (a `.to` to the dtype a tensor already has returns it, but still costs a dispatch: twice per layer per step)
    def _to_store(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype != self.dtype:
            rows = rows.to(self.dtype)
        return rows.view(torch.uint8) if self._raw else rows

    def _from_store(self, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._raw:
            rows = rows.view(self.dtype)
        dtype = dtype or self.compute_dtype
        return rows if rows.dtype == dtype else rows.to(dtype)

    def index(self, table: torch.Tensor, first: int, pool: PoolSpec, start_row: int, end_row: int) -> torch.Tensor:
        """Storage rows of a sequence's rows [start_row, end_row) in `pool` ([n] long, on the cache's device),
        computed where `table` (starting at page index `first`) is: a device table costs no copy."""
        rpp = pool.rows_per_page
        if end_row > (first + table.numel()) * rpp:
            raise AssertionError(f"{pool.name} row {end_row - 1} beyond the {first + table.numel()} allocated pages")
        if start_row < first * rpp and end_row > start_row:
            raise AssertionError(f"{pool.name} rows {start_row}..{end_row - 1} reach a dropped window page")
        r = torch.arange(start_row, end_row, device=table.device)
        rows = table[r // rpp - first] * rpp + r % rpp
        return rows if rows.device == self.device else rows.to(self.device)

    # ---- block payloads for the KV store ------------------------------------------------------------
    def block_rows(self, pool: PoolSpec, block: int) -> tuple[int, int]:
        """Rows of block `block` a stored block carries for `pool`: all of them for a full pool; for a window
        pool the last min(window - 1, B) (what a query at the next block boundary reads besides its own row)."""
        b, tpr = self.block_size, pool.tokens_per_row
        lo = block * b if not pool.window else (block + 1) * b - min(max(pool.window - 1, 1), b)
        return lo // tpr, (block + 1) * b // tpr

    def read_block(self, blocks: SeqBlocks, block: int) -> list[dict[str, torch.Tensor]]:
        """Every layer's rows of one block of a sequence: layer -> name -> [R, *row_shape] (host copies, cache
        dtype: what the KV store's codecs read). All of them cross to the host as one byte buffer (one copy, not
        one per layer and tensor); the tensors are views of it."""
        tables = [torch.tensor(t, dtype=torch.long, device=HOST) for t in blocks.tables]
        parts, where = [], []
        for layer_id, layer in enumerate(self.storage):
            for name, store in layer.items():
                pid = self.pool_of[layer_id][name]
                pool = self.pools[pid]
                idx = self.index(tables[pid], blocks.first[pid], pool, *self.block_rows(pool, block))
                rows = store.index_select(0, idx)  # [R, *row_shape] in the storage dtype
                parts.append(rows.reshape(-1).view(torch.uint8))
                where.append((layer_id, name, rows.shape))
        flat = torch.cat(parts).to(HOST) if parts else torch.empty(0, dtype=torch.uint8, device=HOST)
        out: list[dict[str, torch.Tensor]] = [{} for _ in self.storage]
        off = 0
        for (layer_id, name, shape), part in zip(where, parts, strict=True):
            out[layer_id][name] = flat[off:off + part.numel()].view(self.dtype).view(shape)
            off += part.numel()
        return out

    def write_block(self, blocks: SeqBlocks, block: int, payload: list[dict[str, torch.Tensor]]) -> None:
        """Fill one block of a sequence from a payload shaped like `read_block`'s (host tensors; mutates the pools).
        Window rows the sequence no longer holds (before its window) are skipped. The rows cross to the device as
        one byte buffer."""
        tables = [torch.tensor(t, dtype=torch.long, device=HOST) for t in blocks.tables]
        parts, where = [], []
        for layer_id, (layer, rows) in enumerate(zip(self.storage, payload, strict=True)):
            for name in layer:
                pid = self.pool_of[layer_id][name]
                pool, table, first = self.pools[pid], tables[pid], blocks.first[pid]
                lo, hi = self.block_rows(pool, block)
                held = max(lo, first * pool.rows_per_page)
                if held < hi:
                    r = self._to_store(rows[name][held - lo:])  # [n, *row_shape] storage dtype, on the host
                    parts.append(r.contiguous().reshape(-1).view(torch.uint8))
                    where.append((layer_id, name, r.shape, r.dtype, self.index(table, first, pool, held, hi)))
        if not parts:
            return
        flat = torch.cat(parts).to(self.device)
        off = 0
        for (layer_id, name, shape, dtype, idx), part in zip(where, parts, strict=True):
            rows = flat[off:off + part.numel()].view(dtype).view(shape)
            self.storage[layer_id][name].index_copy_(0, idx, rows)
            off += part.numel()


class SeqCacheView:
    """One sequence's cache (all layers) through its page tables. `batch` is the pool a batch of views can
    share for batched decode (attention modules look for it; other caches have none)."""

    def __init__(self, cache: PagedKVCache, blocks: SeqBlocks) -> None:
        self.cache = cache
        self.batch = cache
        self.tables = [torch.tensor(t, dtype=torch.long, device=HOST) for t in blocks.tables]
        self.first = list(blocks.first)
        self._device_tables: dict[int, torch.Tensor] = {}

    def device_table(self, pid: int) -> torch.Tensor:
        """Pool `pid`'s page table on the cache's device, copied once per view (per step) for the per-sequence
        path's index arithmetic, not once per layer and tensor."""
        t = self._device_tables.get(pid)
        if t is None:
            t = self._device_tables[pid] = self.tables[pid].to(self.cache.device)
        return t

    def layer(self, layer_id: int) -> _LayerView:
        return _LayerView(self, layer_id)


class _LayerView:
    __slots__ = ("seq", "layer_id")

    def __init__(self, seq: SeqCacheView, layer_id: int) -> None:
        self.seq, self.layer_id = seq, layer_id

    def _index(self, name: str, start_row: int, end_row: int) -> torch.Tensor:
        c = self.seq.cache
        pid = c.pool_of[self.layer_id][name]
        return c.index(self.seq.device_table(pid), self.seq.first[pid], c.pools[pid], start_row, end_row)

    def write(self, name: str, start_row: int, rows: torch.Tensor) -> None:
        c = self.seq.cache
        c.storage[self.layer_id][name].index_copy_(0, self._index(name, start_row, start_row + rows.shape[0]),
                                                   c._to_store(rows))

    def read(self, name: str, start_row: int, end_row: int) -> torch.Tensor:
        c = self.seq.cache
        return c._from_store(c.storage[self.layer_id][name].index_select(0, self._index(name, start_row, end_row)))
