"""Decode attention over the paged KV cache read in place: a numba kernel for bf16 caches on AVX512-BF16 CPUs.

The library path (models/paged_attention.py) gathers every decode sequence's whole pages into a padded
[S, L, Hkv, Dh] copy of K and of V per layer, then runs one masked SDPA. This kernel reads the pages where they
lie: per (sequence, KV head), the G query heads sharing the KV head take their scores against each page's rows
by vdpbf16ps dot blocks (experts/numba_intrinsics.bf16_dot_block: 4 query rows x 4 key rows), a softmax over the
sequence's live keys (its position and, with a sliding window, the window), and the weighted sum of V rows in
float32 lanes. No copy, no mask tensor, no padding to the longest context. Work items (sequence, KV head) run in
parallel.

Numerics: scores are exact products of the bf16 q and k summed in float32 (as SDPA's bf16 path sums them), exp
by a degree-7 polynomial of 2^f (relative error < 1.3e-6, far below bf16's 4e-3), the output rounded to bf16 once.
bf16 only (float32 deployments keep SDPA and stay exact); used where `available()` (the CPU has AVX512-BF16,
experts/bf16_numba.available) and the shapes suit the dot blocks (head dim a multiple of 32, pages of a
multiple of 4 rows).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moeray.experts import bf16_numba

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - numba is a dependency
    numba, prange = None, range

_LOG2E = 1.0 / math.log(2.0)
# 2^f = e^(f ln 2) on [0, 1) by its Taylor series to degree 7, highest first (Horner): error < 1.3e-6
_EXP2_TAYLOR = tuple(math.log(2.0) ** d / math.factorial(d) for d in range(7, -1, -1))
PARALLEL_MIN_KEYS = 2048  # (sequences x KV heads x longest context) from which the kernel runs on every thread


def available() -> bool:
    return bf16_numba.available()


def shapes_ok(head_dim: int, rows_per_page: int) -> bool:
    from moeray.experts.numba_intrinsics import BF16_DOT_K

    return head_dim % BF16_DOT_K == 0 and rows_per_page % 4 == 0 and head_dim > 0 and rows_per_page > 0


def _exp2_py(t):  # 2^t for t <= 0 (float32), vectorizable: 2^floor(t) by the exponent bits, 2^frac by a polynomial
    t = max(t, np.float32(-126.0))
    n = np.floor(t)
    f = np.float32(t - n)  # [0, 1)
    p = np.float32(_EXP2_TAYLOR[0])
    for c in _EXP2_TAYLOR[1:]:
        p = np.float32(p * f + np.float32(c))
    return np.float32(p * _as_f32(np.int32(np.int32(np.int32(n) + np.int32(127)) << np.int32(23))))


def _decode_kernel(q, k, v, tables, ctx, lo, rpp, scale, out):
    """q [S, Hkv, G, Dh] u16 (bf16 bits), k/v [R, Hkv, Dh] u16, tables [S, P] int64 pages, ctx [S] keys per
    sequence (its position + 1), lo [S] first key (window), rpp rows per page, scale (float32, x log2 e)
    -> out [S, Hkv, G, Dh] u16."""
    s_num, hkv, g_num, dh = q.shape
    max_ctx = 0
    for s in range(s_num):
        max_ctx = max(max_ctx, ctx[s])
    width = (max_ctx + rpp - 1) // rpp * rpp
    for item in prange(s_num * hkv):
        s = item // hkv
        h = item - s * hkv
        n, first = ctx[s], lo[s]
        qh = q[s, h]  # [G, Dh]
        kh = k[:, h, :]  # [R, Dh] (row stride Hkv * Dh)
        scores = np.empty((g_num, width), np.float32)
        for p in range(first // rpp, (n + rpp - 1) // rpp):
            base = tables[s, p] * rpp
            kp = kh[base:base + rpp]
            sp = scores[:, p * rpp:p * rpp + rpp]
            for r in range(0, rpp, 4):
                _dot_rows(qh, kp, r, sp)
        acc = np.zeros((g_num, dh), np.float32)
        for g in range(g_num):
            m = np.float32(-np.inf)
            for j in range(first, n):
                m = max(m, scores[g, j])
            total = np.float32(0.0)
            for j in range(first, n):
                e = _exp2(np.float32((scores[g, j] - m) * scale))
                scores[g, j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(first, n):
                scores[g, j] *= inv
        for j in range(first, n):
            row = tables[s, j // rpp] * rpp + j % rpp
            vr = v[row, h]
            for g in range(g_num):
                w = scores[g, j]
                for d in range(dh):
                    acc[g, d] += w * _as_f32(np.int32(np.int32(vr[d]) << np.int32(16)))
        for g in range(g_num):
            for d in range(dh):  # round to nearest even
                u = _as_i32(acc[g, d])
                out[s, h, g, d] = np.uint16(np.int32(np.int32(u + np.int32(np.int32(0x7FFF) + np.int32(
                    np.int32(u >> np.int32(16)) & np.int32(1)))) >> np.int32(16)))


_KERNELS: dict[bool, object] = {}
if numba is not None:
    from moeray.experts.numba_intrinsics import intrinsics, source_tag

    _as_f32, _as_i32, _ = intrinsics()
    _exp2 = numba.njit(fastmath=True, cache=True, inline="always")(_exp2_py)
    _dot_rows = bf16_numba.dot_rows


def _kernel(parallel: bool):
    if parallel not in _KERNELS:
        fn = _decode_kernel  # a distinct name per variant: numba's cache is keyed by name and signature
        tag = source_tag(bf16_numba.__file__)  # its inlined dot_rows lives there
        fn.__qualname__ = fn.__name__ = f"paged_decode_bf16_{'parallel' if parallel else 'serial'}_{tag}"
        _KERNELS[parallel] = numba.njit(parallel=parallel, fastmath=True, cache=True)(fn)
    return _KERNELS[parallel]


def decode_attention(q: torch.Tensor, q_rows: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor,
                     tables: torch.Tensor, positions: torch.Tensor, rows_per_page: int, scale: float,
                     window: int = 0) -> torch.Tensor:
    """One query per sequence over its pages in place. q [N, H, Dh] bf16 (roped), q_rows [S] its batch rows,
    k_store / v_store [R, Hkv, Dh] bf16 (the cache's rows), tables [S, P] the sequences' pages, positions [S]
    each query's position (it sees keys 0..position, the last `window` of them with a window) -> [S, H * Dh]
    bf16. Query head h uses KV head h // G (G = H / Hkv), as transformers' repeat_kv."""
    s, hkv, dh = q_rows.numel(), k_store.shape[1], q.shape[2]
    g = q.shape[1] // hkv
    qd = q.index_select(0, q_rows.view(-1)).view(s, hkv, g, dh)
    ctx = (positions.view(-1) + 1).numpy()
    lo = np.maximum(ctx - window, 0) if window else np.zeros_like(ctx)
    out = torch.empty(s, hkv, g, dh, dtype=torch.bfloat16)
    # small work (B = 1 decode: microseconds) stays on this thread: waking the pool costs more than it saves
    parallel = s * hkv * int(ctx.max()) >= PARALLEL_MIN_KEYS and bf16_numba.threads() > 1
    _kernel(parallel)(qd.view(torch.uint16).numpy(), k_store.view(torch.uint16).numpy(),
                      v_store.view(torch.uint16).numpy(), tables.numpy(), ctx, lo, rows_per_page,
                      np.float32(scale * _LOG2E), out.view(torch.uint16).numpy())
    return out.view(s, hkv * g * dh)
