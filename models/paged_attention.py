"""Attention of a whole flattened batch over the paged cache, prepared once per step for every layer.

The first layer that sees a step's `SeqBatch` builds a `PagedBatch`: the new tokens' positions [N] and, per
cache pool, the storage row each new token is written to [N] and each sequence's page table padded to [S, P].
Sequences split in two groups, decode (one new token) and prefill chunks (several), each attended with one
SDPA: queries [S, n] (padding repeats a sequence's last query), keys = whole pages gathered with one
index_select per cached tensor [S, P * page, ...], mask [S, n, L] (causal, optional sliding window). Compared
with the per-sequence path this is O(1) tensor ops per layer instead of O(S), and identical math (masked keys
weigh exactly zero), so float32 agrees with the reference within MKL's last-bit differences.

Needs the engine's PagedKVCache (`storage`, `pool_of`, `pools`, per-view page `tables`); any other cache
(the reference's contiguous one) takes the per-sequence path.

Legend: N = new tokens, S = sequences in a group, n = queries per sequence (padded), P = pages, L = P * page
rows, H = heads, Hkv = KV heads, Dh = head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moeray.models import paged_decode


@dataclass(slots=True)
class QueryGroup:
    """Sequences attended together. q_rows [S, n] index the flattened batch; out_rows [M] are the batch rows of
    the valid queries, in order of q_rows.reshape(-1)[valid]; None when the group is the whole batch in order."""

    seq_ids: torch.Tensor  # [S] into the batch's sequences
    q_rows: torch.Tensor  # [S, n]
    q_pos: torch.Tensor  # [S, n] position of each query
    valid: torch.Tensor | None  # [S * n] bool, None when every query is real (n == 1)
    out_rows: torch.Tensor | None
    context: int  # longest context (positions 0..context-1 are read)
    tables: dict[int, torch.Tensor] = field(default_factory=dict)  # pool id -> [S, P] pages (lazy)
    rows: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)  # (pool id, trim) -> storage rows
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (page rows, window) -> [S,1,n,L]


class PagedBatch:
    """Per-step attention metadata of a batch of SeqChunks over one PagedKVCache (see the module docstring)."""

    def __init__(self, seqs: Sequence[Any], cache: Any, device: torch.device) -> None:
        self.cache, self.device = cache, device
        self.views = [s.cache for s in seqs]
        counts = [s.num_tokens for s in seqs]
        starts = [s.start_pos for s in seqs]
        self.num_tokens = sum(counts)
        self.positions = torch.tensor([p for s, n in zip(starts, counts, strict=True) for p in range(s, s + n)],
                                      dtype=torch.long, device=device)  # [N]
        self._seq_of_token = torch.repeat_interleave(torch.arange(len(seqs), device=device),
                                                     torch.tensor(counts, device=device))  # [N]
        self._tables: dict[int, torch.Tensor] = {}  # pool id -> [S_all, P_all]
        self._write_rows: dict[int, torch.Tensor] = {}  # pool id -> [N]
        self.rope: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}  # Rotary.key -> cos, sin [N, R]
        self._in_place_ok: dict[int, bool] = {}  # layer -> decode attention by models/paged_decode
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        decode = [i for i, n in enumerate(counts) if n == 1]
        prefill = [i for i, n in enumerate(counts) if n > 1]
        self.groups = [self._group(ids, counts, starts, offsets) for ids in (decode, prefill) if ids]

    def _group(self, ids: list[int], counts: list[int], starts: list[int], offsets: list[int]) -> QueryGroup:
        dev = self.device
        n = max(counts[i] for i in ids)
        num = torch.tensor([counts[i] for i in ids], device=dev)  # [S]
        j = torch.minimum(torch.arange(n, device=dev)[None, :], (num - 1)[:, None])  # [S, n]
        q_rows = torch.tensor([offsets[i] for i in ids], device=dev)[:, None] + j
        q_pos = torch.tensor([starts[i] for i in ids], device=dev)[:, None] + j
        valid = None if n == 1 else (torch.arange(n, device=dev)[None, :] < num[:, None]).reshape(-1)
        whole = len(ids) == len(counts) and n == 1
        out_rows = None if whole else (q_rows.reshape(-1) if valid is None else q_rows.reshape(-1)[valid])
        context = max(starts[i] + counts[i] for i in ids)
        return QueryGroup(torch.tensor(ids, device=dev), q_rows, q_pos, valid, out_rows, context)

    # ---- per pool, built at the first layer that uses the pool --------------------------------------------
    def tables(self, pid: int) -> torch.Tensor:
        """Every sequence's page table of pool `pid`, padded with page 0 (masked out) -> [S_all, P_all]."""
        t = self._tables.get(pid)
        if t is None:
            rows = [v.tables[pid] for v in self.views]
            t = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).clamp_(min=0).to(self.device)
            self._tables[pid] = t
        return t

    def write_rows(self, pid: int) -> torch.Tensor:
        """Storage row of every new token in pool `pid` -> [N]."""
        rows = self._write_rows.get(pid)
        if rows is None:
            rpp = self.cache.pools[pid].rows_per_page
            pages = self.tables(pid)[self._seq_of_token, self.positions // rpp]
            rows = pages * rpp + self.positions % rpp
            self._write_rows[pid] = rows
        return rows

    def group_tables(self, g: QueryGroup, pid: int) -> torch.Tensor:
        t = g.tables.get(pid)
        if t is None:
            rpp = self.cache.pools[pid].rows_per_page
            num_pages = -(-g.context // rpp)
            t = self.tables(pid).index_select(0, g.seq_ids)[:, :num_pages].contiguous()  # [S, P]
            g.tables[pid] = t
        return t

    def mask(self, g: QueryGroup, pid: int, window: int) -> torch.Tensor:
        """True where query (s, i) attends key row l: l <= its position and, with a window, within it."""
        rpp = self.cache.pools[pid].rows_per_page
        key = (rpp, window)
        m = g.masks.get(key)
        if m is None:
            num_keys = self.group_tables(g, pid).shape[1] * rpp
            k = torch.arange(num_keys, device=self.device)[None, None, :]  # [1, 1, L]
            q = g.q_pos[:, :, None]  # [S, n, 1]
            m = k <= q
            if window:
                m &= (q - k) < window
            m = m[:, None]  # [S, 1, n, L]
            g.masks[key] = m
        return m

    # ---- per layer ----------------------------------------------------------------------------------------
    def write(self, layer_id: int, rows: dict[str, torch.Tensor]) -> None:
        """Store the batch's new rows of each cached tensor: name -> [N, *row_shape] (mutates the cache)."""
        c = self.cache
        for name, r in rows.items():
            c.storage[layer_id][name].index_copy_(0, self.write_rows(c.pool_of[layer_id][name]), c._to_store(r))

    def group_rows(self, g: QueryGroup, pid: int, trim: bool = False) -> torch.Tensor:
        """Storage rows of a group's pages in pool `pid`, page after page -> [S * L]; with `trim` (one sequence)
        only its first `context` rows. Built once per step; every layer's gather is then one index_select."""
        key = (pid, trim)
        r = g.rows.get(key)
        if r is None:
            rpp = self.cache.pools[pid].rows_per_page
            t = self.group_tables(g, pid)  # [S, P]
            r = (t[:, :, None] * rpp + torch.arange(rpp, device=t.device)).reshape(-1)  # [S * P * rpp]
            if trim:
                assert t.shape[0] == 1, "trim is for a group of one sequence"
                r = r[:g.context]
            g.rows[key] = r
        return r

    def gather(self, layer_id: int, name: str, g: QueryGroup, trim: bool = False) -> torch.Tensor:
        """A group's context rows of tensor `name` -> [S, L, *row_shape] in the compute dtype: whole pages (L =
        P * page rows), or with `trim` (one sequence) exactly its `context` rows."""
        c = self.cache
        store = c.storage[layer_id][name]
        rows = store.index_select(0, self.group_rows(g, c.pool_of[layer_id][name], trim))  # [S * L, ...]
        return c._from_store(rows).view(g.q_rows.shape[0], -1, *store.shape[1:])

    def attend_gqa(self, layer_id: int, q: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        """q [N, H, Dh] (roped; K/V already written) -> [N, H * Dh], one SDPA per group."""
        c = self.cache
        pid = c.pool_of[layer_id]["k"]
        out = None if len(self.groups) == 1 and self.groups[0].out_rows is None else q.new_empty(
            q.shape[0], q.shape[1] * q.shape[2])
        for g in self.groups:
            decode = g.q_rows.shape[1] == 1
            if decode and self._in_place(layer_id, q):  # bf16 decode: the pages read where they lie
                o = paged_decode.decode_attention(q, g.q_rows, c.storage[layer_id]["k"], c.storage[layer_id]["v"],
                                                  self.group_tables(g, pid), g.q_pos, c.pools[pid].rows_per_page,
                                                  scale, window)
            else:
                o = self._sdpa(layer_id, q, g, pid, scale, window)
            if decode and hasattr(c, "batched_decode_calls"):
                c.batched_decode_calls += 1
            if out is None:
                return o
            out.index_copy_(0, g.out_rows, o if g.valid is None else o[g.valid])
        return out

    def _sdpa(self, layer_id: int, q: torch.Tensor, g: QueryGroup, pid: int, scale: float, window: int
              ) -> torch.Tensor:
        """One group by SDPA over its gathered pages -> [S * n, H * Dh]."""
        trim = g.q_rows.shape == (1, 1) and not window  # one decode query sees exactly its `context` rows
        k, v = self.gather(layer_id, "k", g, trim), self.gather(layer_id, "v", g, trim)  # [S, L, Hkv, Dh]
        mask = None if trim else self.mask(g, pid, window)
        if g.q_rows.shape[1] == 1:
            return _decode_sdpa(q, g.q_rows, k, v, mask, scale)
        qg = q[g.q_rows]  # [S, n, H, Dh]
        o = F.scaled_dot_product_attention(qg.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=True)  # [S, H, n, Dh]
        return o.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[2])  # [S * n, H * Dh]

    def _in_place(self, layer_id: int, q: torch.Tensor) -> bool:
        """Whether decode attention of this layer takes models/paged_decode's kernel: bf16 queries and a bf16
        cache (no codec) on a CPU that has AVX512-BF16, shapes that suit it."""
        ok = self._in_place_ok.get(layer_id)
        if ok is None:
            c = self.cache
            store = c.storage[layer_id]["k"]
            pid = c.pool_of[layer_id]["k"]
            ok = (q.dtype == torch.bfloat16 and store.dtype == torch.bfloat16 and c.compute_dtype == torch.bfloat16
                  and store.device.type == "cpu" and store.dim() == 3 and paged_decode.available()
                  and paged_decode.shapes_ok(store.shape[2], c.pools[pid].rows_per_page))
            self._in_place_ok[layer_id] = ok
        return ok


def _decode_sdpa(q: torch.Tensor, q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """One query per sequence: q [N, H, Dh] (rows q_rows [S, 1]), k/v [S, L, Hkv, Dh], mask [S, 1, 1, L] or None
    -> [S, H * Dh]. The G = H / Hkv query heads sharing a KV head attend as one block of G queries (none of them
    causal to another: they share a position), so SDPA runs S * Hkv problems of G rows instead of S * H of one
    row and reads each KV head once (1.24x the enable_gqa form for B = 64 in bf16 on AMX with 2 threads, no change
    with one; 1.04-1.12x per whole decode step). Query head h
    uses KV head h // G, as in transformers' repeat_kv; the same dot products, summed in another order."""
    s, hkv = k.shape[0], k.shape[2]
    h, dh = q.shape[1], q.shape[2]
    qd = q.index_select(0, q_rows.view(-1)).view(s, hkv, h // hkv, dh)  # [S, Hkv, G, Dh]
    o = F.scaled_dot_product_attention(qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.reshape(s, h * dh)  # [S, Hkv, G, Dh] -> [S, H * Dh]


def paged_batch(seqs: Sequence[Any], device: torch.device) -> PagedBatch | None:
    """The step's PagedBatch (built once, kept on a SeqBatch), or None when the chunks do not share one paged
    cache that supports it (then attention runs per sequence)."""
    meta = getattr(seqs, "meta", None)
    if meta is not None:
        return meta
    cache = getattr(seqs[0].cache, "batch", None)
    if cache is None or not hasattr(cache, "storage") or any(getattr(s.cache, "batch", None) is not cache
                                                              for s in seqs):
        return None
    meta = PagedBatch(seqs, cache, device)
    if hasattr(seqs, "meta"):
        seqs.meta = meta
    return meta
