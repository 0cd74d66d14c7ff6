"""The paged KV cache: one pool per (layer, cached tensor), indexed through each sequence's block table.

Pool shape per tensor: [num_blocks * R, *row_shape] with R = rows per block (B // tokens_per_row). Row r
of a sequence lives at pool row `block_table[r // R] * R + r % R`. Attention modules see a `LayerCache`
(`write` / `read`), so the same model code runs over this cache and over the reference's contiguous one.
Windowed tensors keep every block (dropping blocks outside the window is a later memory optimisation).
"""

from __future__ import annotations

import torch

from moeray.kvstore.spec import ModelCacheSpec


class PagedKVCache:
    def __init__(self, spec: ModelCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32):
        spec.check_block_size(block_size)
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        self.batched_decode_calls = 0
        self.pools: list[dict[str, torch.Tensor]] = []
        self.rows_per_block: list[dict[str, int]] = []
        for layer in spec.layers:
            pools, rpb = {}, {}
            for t in layer.tensors:
                r = t.rows_per_block(block_size)
                pools[t.name] = torch.zeros((num_blocks * r, *t.row_shape), dtype=dtype)
                rpb[t.name] = r
            self.pools.append(pools)
            self.rows_per_block.append(rpb)

    def nbytes(self) -> int:
        return sum(p.nbytes for layer in self.pools for p in layer.values())

    def view(self, block_table: list[int]) -> SeqCacheView:
        return SeqCacheView(self, block_table)

    # ---- batched decode (one new token per sequence) -----------------------------------------------------
    def decode_write_gather(self, layer_id: int, views: list[SeqCacheView], positions: torch.Tensor,
                            rows: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Write one new row per sequence and gather every sequence's rows 0..pos, padded (mutates the pools).

        positions [S] (the new tokens' positions); rows: name -> [S, *row_shape] (tokens_per_row 1 tensors)
        -> (name -> [S, L, *row_shape], valid [S, L] bool), L = the longest sequence; padding reads a valid row
        and is masked out by `valid`.
        """
        self.batched_decode_calls += 1
        pools = self.pools[layer_id]
        rpb = {self.rows_per_block[layer_id][n] for n in rows}
        assert rpb == {self.block_size}, "batched decode needs one row per token"
        b = self.block_size
        tables = torch.nn.utils.rnn.pad_sequence([v.blocks for v in views], batch_first=True)  # [S, max blocks]
        s_ids = torch.arange(len(views))
        dst = tables[s_ids, positions // b] * b + positions % b  # [S]
        for name, r in rows.items():
            pools[name].index_copy_(0, dst, r.to(pools[name].dtype))
        lengths = positions + 1
        span = torch.arange(int(lengths.max()))  # [L]
        valid = span[None, :] < lengths[:, None]  # [S, L]
        cols = torch.where(valid, span[None, :], 0)
        src = (tables.gather(1, cols // b) * b + cols % b).reshape(-1)  # [S * L]
        out = {name: pools[name].index_select(0, src).view(*valid.shape, *pools[name].shape[1:]) for name in rows}
        return out, valid

    # ---- block payloads for the KV store ------------------------------------------------------------
    def read_block(self, block_id: int) -> list[dict[str, torch.Tensor]]:
        """Every layer's rows of one block: layer -> name -> [R, *row_shape] (copies)."""
        out = []
        for pools, rpb in zip(self.pools, self.rows_per_block, strict=True):
            out.append({n: p[block_id * rpb[n]:(block_id + 1) * rpb[n]].clone() for n, p in pools.items()})
        return out

    def write_block(self, block_id: int, payload: list[dict[str, torch.Tensor]]) -> None:
        """Fill one block from a payload shaped like `read_block`'s (mutates the pools)."""
        for pools, rpb, layer in zip(self.pools, self.rows_per_block, payload, strict=True):
            for n, p in pools.items():
                p[block_id * rpb[n]:(block_id + 1) * rpb[n]].copy_(layer[n])


class SeqCacheView:
    """One sequence's cache (all layers) through its block table. `batch` is the pool a batch of views can
    share for batched decode (attention modules look for it; other caches have none)."""

    def __init__(self, cache: PagedKVCache, block_table: list[int]) -> None:
        self.cache = cache
        self.batch = cache
        self.blocks = torch.tensor(block_table, dtype=torch.long)

    def layer(self, layer_id: int) -> _LayerView:
        return _LayerView(self, layer_id)

    def rows(self, rpb: int, start: int, end: int) -> torch.Tensor:
        r = torch.arange(start, end)
        nb = self.blocks.numel()
        if end > nb * rpb:
            raise AssertionError(f"cache row {end - 1} beyond the {nb} allocated blocks")
        return self.blocks[r // rpb] * rpb + r % rpb


class _LayerView:
    __slots__ = ("seq", "layer_id")

    def __init__(self, seq: SeqCacheView, layer_id: int) -> None:
        self.seq, self.layer_id = seq, layer_id

    def write(self, name: str, start_row: int, rows: torch.Tensor) -> None:
        c = self.seq.cache
        idx = self.seq.rows(c.rows_per_block[self.layer_id][name], start_row, start_row + rows.shape[0])
        c.pools[self.layer_id][name].index_copy_(0, idx, rows.to(c.pools[self.layer_id][name].dtype))

    def read(self, name: str, start_row: int, end_row: int) -> torch.Tensor:
        c = self.seq.cache
        idx = self.seq.rows(c.rows_per_block[self.layer_id][name], start_row, end_row)
        return c.pools[self.layer_id][name].index_select(0, idx)
