"""Dequantize-and-multiply CPU kernels for packed expert weights (numba).

- `gemv_packed(x, w)`: x [T, K] @ dequant(W).t() for a packed W [N, K], nothing materialized: each row of W is
  decoded once into a K-float buffer (L1: a 256-entry table of a byte's two e2m1 values, or its e4m3 value, times
  the block scale) and dotted with every row of x (vectorized, float32 accumulation). The decode is paid once
  per call and the dots T times (four rows of x per pass), so this serves few rows per expert (T <= FUSED_MAX_ROWS,
  decode and small prefill batches); beyond that a library GEMM on a decoded tile is faster.
- `decode_rows(w, r0, r1, out)`: rows r0:r1 of W dequantized into a tile in float32 or bfloat16, for the tile
  path of experts/quantized.py (the tile then goes to oneDNN/MKL). bfloat16 is written directly, no float32
  pass: MXFP4 by integer arithmetic on the bf16 bits (value bits plus the scale's exponent, one 32-bit store per
  byte; exact: 2 significant bits times a power of two), FP8 by a table per (band of bo rows, block) of the
  block's 256 scaled values rounded to nearest even, as `.to(torch.bfloat16)` rounds, then one lookup per weight.

Decoding is exact (a code value times a power of two, or a float32 scale), so in float32 the results equal
x @ dequant(W).t() up to summation order. One thread: serial kernels (waking a parallel region costs
milliseconds on a busy machine); more: the same loops under prange, over chunks of rows. Without numba,
experts/quantized.py decodes with torch ops. The decoders take 2-D arrays and row indices rather than 1-D row
views, and the helpers are inlined: both measured 1.2-1.3x faster in numba.
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

# rows of x up to which gemv_packed beats decoding a tile + the library GEMM on it (measured on an AMX Xeon, per
# expert of D=1024, I=512): against bf16 tiles (oneDNN) and against float32 tiles (MKL's fp32 GEMM is slower)
FUSED_MAX_ROWS = 10
FUSED_MAX_ROWS_F32 = 16
CHUNK_ROWS = 16  # rows of W per parallel work item
E8M0_BITS_MIN, E8M0_BITS_MAX = 2, 252  # e8m0 bytes for which every e2m1 value times the scale is a normal bf16
_BYTES = torch.arange(256, dtype=torch.uint8)
E8M0_LUT = scale_to_float(_BYTES.view(torch.float8_e8m0fnu)).numpy()
E4M3_LUT = _BYTES.view(torch.float8_e4m3fn).float().numpy()
E2M1_PAIRS = e2m1_lut(torch.float32).numpy()


def available() -> bool:
    return numba is not None


# ---- helpers (inlined into the kernels) ------------------------------------------------------------------
def _to_bf16_py(buf, dst, o):  # float32 buf [1, n] -> bf16 bits dst[o, :n] (u16), rounded to nearest even
    bits = buf.view(np.uint32)
    for i in range(buf.shape[1]):
        u = bits[0, i]
        dst[o, i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _e2m1_bf16_py(n, adj):  # nibble n, exponent adjust (s - 127) << 7 -> the bf16 bits of value(n) * 2^(s - 127)
    m = n & 7  # magnitude code: 0, .5, 1, 1.5, 2, 3, 4, 6 are bf16 0, 0x3F00, then 0x3F80 + 0x40 steps
    mag = (m << 6) + 0x3F00 if m >= 2 else (0x3F00 if m == 1 else 0)
    mag = mag + adj if m != 0 else 0
    return np.uint16(mag | ((n & 8) << 12))


def _mxfp4_row_py(codes, scales, r, e8m0, pairs, dst, o):  # row r -> f32 dst[o]; codes [N, K/2], scales [N, K/32]
    for g in range(scales.shape[1]):
        s = e8m0[scales[r, g]]
        for j in range(16):
            b = codes[r, g * 16 + j]
            dst[o, g * 32 + 2 * j] = pairs[b, 0] * s
            dst[o, g * 32 + 2 * j + 1] = pairs[b, 1] * s


def _fp8_band_lut_f32_py(scales, band, e4m3, lut):  # lut [ceil(K/bi), 256] f32: each e4m3 value x block scale
    for kb in range(scales.shape[1]):
        sc = scales[band, kb]
        for v in range(256):
            lut[kb, v] = e4m3[v] * sc


def _fp8_band_lut_bf16_py(scales, band, e4m3, lut):  # lut [ceil(K/bi), 256] u16: the same as bf16 bits (RNE)
    tmp = np.empty((1, 256), np.float32)
    for kb in range(scales.shape[1]):
        sc = scales[band, kb]
        for v in range(256):
            tmp[0, v] = e4m3[v] * sc
        _to_bf16(tmp, lut, kb)


# ---- kernels, built per (format, parallel) -----------------------------------------------------------------
def _dots_py(x, buf, n, out):  # out[:, n] = x [T, K] @ buf[0] (f32), four rows of x per pass over buf
    t_rows, k = x.shape
    for t in range(0, t_rows - 3, 4):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for j in range(k):
            v = buf[0, j]
            a0 += v * x[t, j]
            a1 += v * x[t + 1, j]
            a2 += v * x[t + 2, j]
            a3 += v * x[t + 3, j]
        out[t, n], out[t + 1, n], out[t + 2, n], out[t + 3, n] = a0, a1, a2, a3
    for t in range(t_rows - t_rows % 4, t_rows):
        acc = np.float32(0.0)
        for j in range(k):
            acc += buf[0, j] * x[t, j]
        out[t, n] = acc


def _mxfp4_gemv_kernel(x, codes, scales, e8m0, pairs, out):  # x [T, K] f32 -> out [T, N] f32
    num_rows = codes.shape[0]
    for ch in prange((num_rows + CHUNK_ROWS - 1) // CHUNK_ROWS):
        buf = np.empty((1, x.shape[1]), np.float32)
        for n in range(ch * CHUNK_ROWS, min(num_rows, ch * CHUNK_ROWS + CHUNK_ROWS)):
            _mxfp4_row(codes, scales, n, e8m0, pairs, buf, 0)
            _dots(x, buf, n, out)


def _fp8_gemv_kernel(x, codes, scales, block, e4m3, out):  # x [T, K] f32 -> out [T, N] f32, by bands of bo rows
    bo, bi = block[0], block[1]
    num_rows, k = codes.shape
    for band in prange(scales.shape[0]):
        lut = np.empty((scales.shape[1], 256), np.float32)  # the band's blocks' scaled values (as in the tiles)
        _fp8_lut_f32(scales, band, e4m3, lut)
        buf = np.empty((1, k), np.float32)
        for n in range(band * bo, min(num_rows, band * bo + bo)):
            for kb in range(scales.shape[1]):
                j0 = kb * bi
                j1 = min(k, j0 + bi)
                c = codes[n, j0:j1]
                d = buf[0, j0:j1]
                t = lut[kb]
                for j in range(j1 - j0):
                    d[j] = t[c[j]]
            _dots(x, buf, n, out)


def _mxfp4_f32_kernel(r0, r1, codes, scales, e8m0, pairs, out):  # rows r0:r1 of W -> out [r1 - r0, K] f32
    for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
            _mxfp4_row(codes, scales, r, e8m0, pairs, out, r - r0)


def _mxfp4_bf16_kernel(r0, r1, codes, scales, e8m0, pairs, out):  # rows r0:r1 of W -> out [r1 - r0, K] bf16 bits
    fast = True  # integer decode unless a scale byte would leave bf16's normal range (never on the hub)
    for r in range(r0, r1):
        for g in range(scales.shape[1]):
            fast = fast and E8M0_BITS_MIN <= scales[r, g] <= E8M0_BITS_MAX
    pairs_out = out.view(np.uint32)  # one 32-bit store per byte: its two bf16 values (measured 1.2x two stores)
    for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
        buf = np.empty((1, out.shape[1]), np.float32)
        for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
            if not fast:
                _mxfp4_row(codes, scales, r, e8m0, pairs, buf, 0)
                _to_bf16(buf, out, r - r0)
                continue
            for g in range(scales.shape[1]):
                adj = (np.int32(scales[r, g]) - 127) << 7
                for j in range(16):
                    b = np.int32(codes[r, g * 16 + j])
                    pairs_out[r - r0, g * 16 + j] = (np.uint32(_e2m1_bf16(b & 15, adj))
                                                     | (np.uint32(_e2m1_bf16(b >> 4, adj)) << 16))


def _fp8_tile_kernel(lut_fill, lut_dtype):
    def decode(r0, r1, codes, scales, block, e4m3, out):  # rows r0:r1 of W -> out [r1 - r0, K] (f32 or u16)
        bo, bi = block[0], block[1]
        k = codes.shape[1]
        for band in prange(r0 // bo, (r1 - 1) // bo + 1):
            lut = np.empty((scales.shape[1], 256), lut_dtype)
            lut_fill(scales, band, e4m3, lut)
            for r in range(max(r0, band * bo), min(r1, band * bo + bo)):
                for kb in range(scales.shape[1]):
                    j0 = kb * bi
                    j1 = min(k, j0 + bi)
                    c = codes[r, j0:j1]
                    d = out[r - r0, j0:j1]
                    t = lut[kb]
                    for j in range(j1 - j0):
                        d[j] = t[c[j]]
    return decode


def _jit_kernel(fn, name: str, parallel: bool):
    # a distinct name per (kernel, parallel): numba's on-disk cache is keyed by name and signature only
    fn.__qualname__ = f"{name}_{'parallel' if parallel else 'serial'}"
    return numba.njit(parallel=parallel, fastmath=True, cache=True)(fn)


_KERNELS: dict[tuple[str, bool], dict] = {}
if numba is not None:
    _inline = numba.njit(fastmath=True, cache=True, inline="always")
    _to_bf16 = _inline(_to_bf16_py)
    _e2m1_bf16 = _inline(_e2m1_bf16_py)
    _mxfp4_row = _inline(_mxfp4_row_py)
    _dots = _inline(_dots_py)
    _fp8_lut_f32 = _inline(_fp8_band_lut_f32_py)
    _fp8_lut_bf16 = _inline(_fp8_band_lut_bf16_py)
    for _par in (False, True):
        _KERNELS[("mxfp4", _par)] = {
            "gemv": _jit_kernel(_mxfp4_gemv_kernel, "gemv_mxfp4", _par),
            "f32": _jit_kernel(_mxfp4_f32_kernel, "decode_f32_mxfp4", _par),
            "bf16": _jit_kernel(_mxfp4_bf16_kernel, "decode_bf16_mxfp4", _par)}
        _KERNELS[("fp8", _par)] = {
            "gemv": _jit_kernel(_fp8_gemv_kernel, "gemv_fp8", _par),
            "f32": _jit_kernel(_fp8_tile_kernel(_fp8_lut_f32, np.float32), "decode_f32_fp8", _par),
            "bf16": _jit_kernel(_fp8_tile_kernel(_fp8_lut_bf16, np.uint16), "decode_bf16_fp8", _par)}


def _threads() -> int:
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads > 1:
        numba.set_num_threads(threads)
    return threads


def _args(fmt: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> tuple:
    c = codes.view(torch.uint8).numpy()
    if fmt == "mxfp4":
        return (c, scale.view(torch.uint8).numpy(), E8M0_LUT, E2M1_PAIRS)
    return (c, scale_to_float(scale).contiguous().numpy(), np.array(block, dtype=np.int64), E4M3_LUT)


def gemv_packed(x: torch.Tensor, fmt: str, codes: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int] | None) -> torch.Tensor:
    """x [T, K] @ dequant(W).t() -> [T, N] float32 for W packed as `fmt` ("mxfp4" or "fp8"); `scale` as stored
    (mxfp4: e8m0 [N, K/32]; fp8: float32 or e8m0 [ceil(N/bo), ceil(K/bi)])."""
    kernel = _KERNELS[(fmt, _threads() > 1)]["gemv"]
    xn = x.detach().float().contiguous().numpy()
    out = np.empty((xn.shape[0], codes.shape[0]), dtype=np.float32)
    kernel(xn, *_args(fmt, codes, scale, block), out)
    return torch.from_numpy(out)


def decode_rows(fmt: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, r0: int,
                r1: int, out: torch.Tensor) -> None:
    """Rows r0:r1 of a packed W, dequantized into out [r1 - r0, K] (float32 or bfloat16, contiguous): a table
    value times its scale, the same products as experts/quant_formats' dequantizers (bfloat16: rounded to
    nearest even, as `.to(torch.bfloat16)` rounds)."""
    if out.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"decode_rows writes float32 or bfloat16 tiles, not {out.dtype}")
    kernels = _KERNELS[(fmt, _threads() > 1)]
    if out.dtype == torch.float32:
        kernels["f32"](r0, r1, *_args(fmt, codes, scale, block), out.numpy())
    else:
        kernels["bf16"](r0, r1, *_args(fmt, codes, scale, block), out.view(torch.uint16).numpy())
