"""Attention kinds over a per-sequence cache: GQA (Mixtral, Qwen-MoE) and MLA (DeepSeek-V3).

An attention module sees one sequence at a time: the new tokens' hidden states, the position of the first
of them, and that sequence's cache for this layer (anything with `write` / `read`, see `LayerCache`). The
same code therefore runs over the contiguous cache of the ReferenceModel and the paged cache of the engine.

Legend: n = new tokens, L = cached + new tokens, D = hidden, H = heads, Hkv = KV heads, Dh = head dim,
r = MLA latent rank, R = rope dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeray.kvstore.spec import LayerCacheSpec, gqa_spec, mla_spec
from moeray.models.config import ModelConfig
from moeray.models.layers import RMSNorm, Rotary, _yarn_mscale, rms_norm
from moeray.models.paged_attention import paged_batch


class LayerCache(Protocol):
    """One sequence's cache for one layer. Rows are indexed from the start of the sequence."""

    def write(self, name: str, start_row: int, rows: torch.Tensor) -> None:
        """Store rows [start_row, start_row + len(rows)) of tensor `name` (mutates the cache)."""

    def read(self, name: str, start_row: int, end_row: int) -> torch.Tensor:
        """Rows [start_row, end_row) of tensor `name` -> [end_row - start_row, *row_shape]."""


def causal_mask(start_pos: int, n: int, key_start: int, key_end: int, window: int,
                device: torch.device | str | None = None) -> torch.Tensor | None:
    """Boolean [n, L] mask (True = attend) for queries at start_pos.. over keys key_start..key_end-1, on `device`."""
    if n == 1 and window == 0:
        return None  # a single query sees every cached key
    q = torch.arange(start_pos, start_pos + n, device=device)[:, None]
    k = torch.arange(key_start, key_end, device=device)[None, :]
    mask = k <= q
    if window:
        mask &= (q - k) < window
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [n, H, Dq], k [L, Hkv, Dq], v [L, Hkv, Dv] -> [n, H * Dv]; KV heads repeat over their query group."""
    n, h = q.shape[0], q.shape[1]
    rep = h // k.shape[1]
    qh = q.transpose(0, 1)  # [H, n, Dq]
    kh = k.transpose(0, 1)  # [Hkv, L, Dq]
    vh = v.transpose(0, 1)
    if rep > 1:
        kh = kh.repeat_interleave(rep, dim=0)
        vh = vh.repeat_interleave(rep, dim=0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)  # [H, n, Dv]
    return out.transpose(0, 1).reshape(n, -1)


class GQAttention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm (Qwen3) and a sliding window."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        d, h, hkv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.h, self.hkv, self.dh = h, hkv, dh
        self.window = cfg.window(layer_id)
        self.q_proj = nn.Linear(d, h * dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, hkv * dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, hkv * dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * dh, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = Rotary(cfg.rope, dh, cfg.max_position_embeddings)
        self.scale = dh**-0.5
        self.qkv_proj: nn.Linear | None = None  # fuse_projections(): q, k and v in one GEMM (serving)

    def cache_spec(self) -> LayerCacheSpec:
        return gqa_spec(self.hkv, self.dh, window=self.window)

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj and v_proj by one linear over their stacked weights (the engine does this once
        at start-up): one GEMM per layer instead of three, the same dot products per output. Idempotent."""
        if self.qkv_proj is not None:
            return
        self.qkv_proj = _stack_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj
        if self.q_norm is not None:  # q and k normalised in one call: per-head weights stacked [H + Hkv, Dh]
            assert self.q_norm.eps == self.k_norm.eps
            self.qk_norm_weight = nn.Parameter(torch.cat([self.q_norm.weight.detach().expand(self.h, self.dh),
                                                          self.k_norm.weight.detach().expand(self.hkv, self.dh)]),
                                               requires_grad=False)

    def forward(self, x: torch.Tensor, start_pos: int, cache: LayerCache) -> torch.Tensor:  # [n, D] -> [n, D]
        q, k, v = self._qkv(x, torch.arange(start_pos, start_pos + x.shape[0], device=x.device))
        return self.o_proj(self._attend_one(q, k, v, start_pos, cache))

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor, rope: dict | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, D], positions [n] -> roped q [n, H, Dh], k [n, Hkv, Dh], v [n, Hkv, Dh]. `rope` memoises
        cos/sin by rotary table across the layers of one step."""
        n = x.shape[0]
        if self.qkv_proj is not None:
            return self._qkv_fused(x, positions, rope)
        q = self.q_proj(x).view(n, self.h, self.dh)
        k = self.k_proj(x).view(n, self.hkv, self.dh)
        v = self.v_proj(x).view(n, self.hkv, self.dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        key = (self.rotary.key, q.dtype)
        cs = None if rope is None else rope.get(key)
        if cs is None:
            cos, sin = self.rotary.cos_sin(positions)
            cs = cos.to(q.dtype), sin.to(q.dtype)
            if rope is not None:
                rope[key] = cs
        cos, sin = cs
        return self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin), v

    def _qkv_fused(self, x: torch.Tensor, positions: torch.Tensor, rope: dict | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_qkv` after fuse_projections: one GEMM, q and k normalised together ([N, H + Hkv, Dh] with stacked
        per-head weights) and rotated together by Rotary.apply_signed (the step's signed tables shared by every
        layer): the same products as `_qkv`'s rotate_half without its negation op."""
        n, h, hkv, dh = x.shape[0], self.h, self.hkv, self.dh
        qkv = self.qkv_proj(x).view(n, h + 2 * hkv, dh)
        qk, v = qkv[:, :h + hkv], qkv[:, h + hkv:]
        if self.q_norm is not None:
            qk = rms_norm(qk, None, self.q_norm.eps) * self.qk_norm_weight
        key = ("signed", self.rotary.key, qk.dtype)
        cs = None if rope is None else rope.get(key)
        if cs is None:
            cs = self.rotary.signed_cos_sin(positions, qk.dtype)  # [N, 1, Dh] each
            if rope is not None:
                rope[key] = cs
        qk = self.rotary.apply_signed(qk, *cs)
        return qk[:, :h], qk[:, h:], v

    def forward_batch(self, x: torch.Tensor, seqs: Sequence[Any], layer_id: int) -> torch.Tensor:
        """The whole flattened batch at once: x [N, D] -> [N, D]. Over the engine's paged cache: projections,
        norms and RoPE over all N tokens, one write of the new K/V, one SDPA per group of sequences (decode,
        prefill; models/paged_attention.py). Any other cache: attention per sequence."""
        meta = paged_batch(seqs, x.device)
        if meta is None or meta.cache.pools[meta.cache.pool_of[layer_id]["k"]].tokens_per_row != 1:
            return self._forward_per_seq(x, seqs, layer_id)
        q, k, v = self._qkv(x, meta.positions, meta.rope)
        meta.write(layer_id, {"k": k, "v": v})
        return self.o_proj(meta.attend_gqa(layer_id, q, self.scale, self.window))

    def _forward_per_seq(self, x: torch.Tensor, seqs: Sequence[Any], layer_id: int) -> torch.Tensor:
        positions = torch.cat([torch.arange(s.start_pos, s.start_pos + s.num_tokens, device=x.device)
                               for s in seqs])  # [N]
        q, k, v = self._qkv(x, positions)
        outs, off = [], 0
        for s in seqs:
            sl = slice(off, off + s.num_tokens)
            outs.append(self._attend_one(q[sl], k[sl], v[sl], s.start_pos, s.cache.layer(layer_id)))
            off += s.num_tokens
        return self.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])

    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                    cache: LayerCache) -> torch.Tensor:
        """One sequence's new rows (roped): write K/V, read the context, attend -> [n, H * Dh]."""
        n = q.shape[0]
        cache.write("k", start_pos, k)
        cache.write("v", start_pos, v)
        end = start_pos + n
        lo = max(0, start_pos - self.window + 1) if self.window else 0
        keys, values = cache.read("k", lo, end), cache.read("v", lo, end)
        return attend(q, keys, values, causal_mask(start_pos, n, lo, end, self.window, q.device), self.scale)


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; caches the normalised latent [r] and the roped shared key [R]."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.h, self.r, self.rope_dim = h, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.nope, self.vdim = cfg.qk_nope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.q_lora = cfg.q_lora_rank is not None
        self.kv_a_proj_with_mqa = nn.Linear(d, self.r + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.r, 1e-6)
        self.kv_b_proj = nn.Linear(self.r, h * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(h * self.vdim, d, bias=cfg.o_bias)
        self.rotary = Rotary(cfg.rope, self.rope_dim, cfg.max_position_embeddings, interleave=cfg.rope_interleave)
        scale = qk**-0.5
        if cfg.rope.type != "default" and cfg.rope.mscale_all_dim:
            m = _yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim)
            scale = scale * m * m
        self.scale = scale
        self.x_proj: nn.Linear | None = None  # fuse_projections(): the query's first projection and kv_a in one GEMM

    def cache_spec(self) -> LayerCacheSpec:
        return mla_spec(self.r, self.rope_dim)

    def fuse_projections(self) -> None:
        """Replace the two projections of x (q_a_proj or q_proj, and kv_a_proj_with_mqa) by one linear over their
        stacked weights (the engine does this once at start-up; same dot products per output). Idempotent."""
        if self.x_proj is not None:
            return
        first = self.q_a_proj if self.q_lora else self.q_proj
        self._x_split = [first.out_features, self.kv_a_proj_with_mqa.out_features]
        self.x_proj = _stack_linears([first, self.kv_a_proj_with_mqa])
        if self.q_lora:
            del self.q_a_proj
        else:
            del self.q_proj
        del self.kv_a_proj_with_mqa

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, D] -> q [n, H, nope + R], normalised latent [n, r], unroped shared key [n, R]."""
        n = x.shape[0]
        if self.x_proj is not None:
            q, kv_a = self.x_proj(x).split(self._x_split, dim=-1)
        else:
            q = self.q_a_proj(x) if self.q_lora else self.q_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        latent, k_rot = kv_a.split([self.r, self.rope_dim], dim=-1)
        return q.view(n, self.h, self.nope + self.rope_dim), self.kv_a_layernorm(latent), k_rot

    def forward(self, x: torch.Tensor, start_pos: int, cache: LayerCache) -> torch.Tensor:  # [n, D] -> [n, D]
        n = x.shape[0]
        q, latent, k_rot = self._project(x)  # [n, H, nope + R], [n, r], [n, R]
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        cos, sin = self.rotary.cos_sin(torch.arange(start_pos, start_pos + n, device=x.device))
        q_rot = self.rotary.apply(q_rot, cos, sin)
        k_rot = self.rotary.apply(k_rot, cos, sin)  # [n, R]
        cache.write("latent", start_pos, latent)
        cache.write("k_rope", start_pos, k_rot)
        end = start_pos + n
        lat_all, krot_all = cache.read("latent", 0, end), cache.read("k_rope", 0, end)  # [L, r], [L, R]
        kv = self.kv_b_proj(lat_all).view(end, self.h, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        k = torch.cat([k_nope, krot_all[:, None, :].expand(end, self.h, self.rope_dim)], dim=-1)
        qf = torch.cat([q_nope, q_rot], dim=-1)
        out = attend(qf, k, v, causal_mask(start_pos, n, 0, end, 0, qf.device), self.scale)
        return self.o_proj(out)

    def forward_batch(self, x: torch.Tensor, seqs: Sequence[Any], layer_id: int) -> torch.Tensor:
        """The flattened batch x [N, D] -> [N, D]. A batch of decode tokens over the engine's paged cache runs
        absorbed (`_decode_absorbed`); anything else attends per sequence, re-expanding the context."""
        meta = paged_batch(seqs, x.device)
        if meta is not None and len(meta.groups) == 1 and meta.groups[0].out_rows is None:
            return self._decode_absorbed(x, meta, layer_id)
        outs, off = [], 0
        for s in seqs:
            outs.append(self.forward(x[off:off + s.num_tokens], s.start_pos, s.cache.layer(layer_id)))
            off += s.num_tokens
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _decode_absorbed(self, x: torch.Tensor, meta: Any, layer_id: int) -> torch.Tensor:
        """One new token per sequence, kv_b_proj absorbed into the query and the output (DeepSeek's decode form):
        scores = (q_nope W_uk) . latent + q_rot . k_rope over the cached latents themselves, out = (P latent) W_uv,
        so the context is never expanded to per-head keys and values. x [S, D] -> [S, D]."""
        n = x.shape[0]
        q, latent, k_rot = self._project(x)  # [S, H, nope + R], [S, r], [S, R]
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        key = (self.rotary.key, q.dtype)
        if key not in meta.rope:
            cos, sin = self.rotary.cos_sin(meta.positions)
            meta.rope[key] = cos.to(q.dtype), sin.to(q.dtype)
        cos, sin = meta.rope[key]
        q_rot, k_rot = self.rotary.apply(q_rot, cos, sin), self.rotary.apply(k_rot, cos, sin)
        meta.write(layer_id, {"latent": latent, "k_rope": k_rot})
        w = self.kv_b_proj.weight.view(self.h, self.nope + self.vdim, self.r)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]  # [H, nope, r], [H, v, r]
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [S, H, r]
        g = meta.groups[0]
        lat, krot = meta.gather(layer_id, "latent", g), meta.gather(layer_id, "k_rope", g)  # [S, L, r], [S, L, R]
        mask = meta.mask(g, meta.cache.pool_of[layer_id]["latent"], 0)  # [S, 1, 1, L]
        qk = torch.cat([q_lat, q_rot], dim=-1)[:, :, None, :]  # [S, H, 1, r + R]
        keys = torch.cat([lat, krot], dim=-1)[:, None]  # [S, 1, L, r + R]
        ctx = F.scaled_dot_product_attention(qk, keys, lat[:, None], attn_mask=mask, scale=self.scale,
                                             enable_gqa=True)  # [S, H, 1, r]
        if hasattr(meta.cache, "batched_decode_calls"):
            meta.cache.batched_decode_calls += 1
        out = torch.bmm(ctx[:, :, 0].transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [S, H, v]
        return self.o_proj(out.reshape(n, self.h * self.vdim))


def _stack_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the concatenation of `linears`' outputs (same input), in their dtype."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    fused = nn.Linear(w.shape[1], w.shape[0], bias=biases[0] is not None, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if biases[0] is not None:
        fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


def build_attention(cfg: ModelConfig, layer_id: int) -> nn.Module:
    if cfg.attention_kind == "gqa":
        return GQAttention(cfg, layer_id)
    if cfg.attention_kind == "mla":
        return MLAttention(cfg, layer_id)
    raise ValueError(f"attention_kind {cfg.attention_kind!r} has no attention module here")
