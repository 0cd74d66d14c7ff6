"""Fused dequantize-and-multiply CPU kernels for packed expert weights (numba).

`gemm_packed(x, w)` computes x [T, K] @ W.t() for a packed W [N, K] without materializing W: each byte of codes
is decoded through a small table (256 entries: a byte's two e2m1 values, or its e4m3 value) held in L1, multiplied
into the running dot product, and each block's partial sum is scaled once. Decoding is exact (a code value times
a power of two, or a float32 scale) and accumulation is float32, so the result equals x @ dequant(W).t() up to
summation order. The decode is redone per row of x, so this pays only for T <= FUSED_MAX_ROWS (its cost grows
linearly with T and meets the tile path of experts/quantized.py at about T = 2 on this project's Xeon).
`decode_rows` is the same decode writing a float32 tile, for that tile path (one pass: 1.8x (FP8) to 4x (MXFP4)
torch's table-gather decode, measured). Without numba, experts/quantized.py decodes with torch ops.
"""

from __future__ import annotations

import numpy as np
import torch

from moeray.experts.quant_formats import e2m1_lut, scale_to_float

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - numba is a dependency; the tile path still works without it
    numba, prange = None, range

FUSED_MAX_ROWS = 2
_BYTES = torch.arange(256, dtype=torch.uint8)
E8M0_LUT = scale_to_float(_BYTES.view(torch.float8_e8m0fnu)).numpy()
E4M3_LUT = _BYTES.view(torch.float8_e4m3fn).float().numpy()
E2M1_PAIRS = e2m1_lut(torch.float32).numpy()


def available() -> bool:
    return numba is not None


def _mxfp4_py(x, codes, scales, e8m0, pairs, out):  # pairs [256, 2]: a byte's (low, high) e2m1 values
    t_rows, k = x.shape
    for n in prange(codes.shape[0]):
        for t in range(t_rows):
            acc = np.float32(0.0)
            for g in range(k // 32):
                part = np.float32(0.0)
                for j in range(16):
                    b = codes[n, g * 16 + j]
                    part += pairs[b, 0] * x[t, g * 32 + 2 * j] + pairs[b, 1] * x[t, g * 32 + 2 * j + 1]
                acc += part * e8m0[scales[n, g]]
            out[t, n] = acc


def _fp8_py(x, codes, scales, bo, bi, e4m3, out):  # e4m3 [256]: a byte's float8_e4m3fn value
    t_rows, k = x.shape
    for n in prange(codes.shape[0]):
        for t in range(t_rows):
            acc = np.float32(0.0)
            for kb in range(scales.shape[1]):
                part = np.float32(0.0)
                for j in range(kb * bi, min(k, kb * bi + bi)):
                    part += e4m3[codes[n, j]] * x[t, j]
                acc += part * scales[n // bo, kb]
            out[t, n] = acc


def _mxfp4_decode_py(codes, scales, e8m0, pairs, out):  # codes [R, K/2] -> out [R, K] float32
    for r in range(codes.shape[0]):
        for g in range(codes.shape[1] // 16):
            s = e8m0[scales[r, g]]
            for j in range(16):
                b = codes[r, g * 16 + j]
                out[r, g * 32 + 2 * j] = pairs[b, 0] * s
                out[r, g * 32 + 2 * j + 1] = pairs[b, 1] * s


def _fp8_decode_py(codes, scales, r0, bo, bi, e4m3, out):  # rows r0.. of W: codes [R, K] -> out [R, K] float32
    k = codes.shape[1]
    for r in range(codes.shape[0]):
        for kb in range(scales.shape[1]):
            s = scales[(r0 + r) // bo, kb]
            for j in range(kb * bi, min(k, kb * bi + bi)):
                out[r, j] = e4m3[codes[r, j]] * s


# one thread: a serial build (waking a parallel region costs milliseconds on a busy machine); more: prange
_KERNELS = {}
if numba is not None:
    for _par in (False, True):
        _KERNELS[("mxfp4", _par)] = numba.njit(parallel=_par, fastmath=True, cache=True)(_mxfp4_py)
        _KERNELS[("fp8", _par)] = numba.njit(parallel=_par, fastmath=True, cache=True)(_fp8_py)
    _DECODE = {"mxfp4": numba.njit(fastmath=True, cache=True)(_mxfp4_decode_py),
               "fp8": numba.njit(fastmath=True, cache=True)(_fp8_decode_py)}


def gemm_packed(x: torch.Tensor, fmt: str, codes: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int] | None) -> torch.Tensor:
    """x [T, K] @ dequant(W).t() -> [T, N] float32 for W packed as `fmt` ("mxfp4" or "fp8"); `scale` as stored
    (mxfp4: e8m0 [N, K/32]; fp8: float32 or e8m0 [ceil(N/bo), ceil(K/bi)])."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads > 1:
        numba.set_num_threads(threads)
    kernel = _KERNELS[(fmt, threads > 1)]
    xn = x.detach().float().contiguous().numpy()
    out = np.empty((xn.shape[0], codes.shape[0]), dtype=np.float32)
    if fmt == "mxfp4":
        kernel(xn, codes.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy(), E8M0_LUT, E2M1_PAIRS, out)
    else:
        kernel(xn, codes.view(torch.uint8).numpy(), scale_to_float(scale).numpy(), block[0], block[1], E4M3_LUT, out)
    return torch.from_numpy(out)


def decode_rows(fmt: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, r0: int,
                r1: int, out: torch.Tensor) -> None:
    """Rows r0:r1 of a packed W, dequantized into out [r1 - r0, K] (float32, contiguous) in one pass (exact:
    a table value times its scale, the same products as experts/quant_formats' dequantizers)."""
    dst = out.numpy()
    if fmt == "mxfp4":
        _DECODE[fmt](codes[r0:r1].view(torch.uint8).numpy(), scale[r0:r1].view(torch.uint8).numpy(), E8M0_LUT,
                     E2M1_PAIRS, dst)
    else:
        _DECODE[fmt](codes[r0:r1].view(torch.uint8).numpy(), scale_to_float(scale).numpy(), r0, block[0], block[1],
                     E4M3_LUT, dst)
