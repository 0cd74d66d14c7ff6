"""Dequantize-and-multiply CPU kernels for packed expert weights (numba).

Two kernels per format (mxfp4, fp8), both decoding one row of W at a time through a table held in L1 (256
entries: a byte's two e2m1 values, or its e4m3 value) times the row's block scales:

- `gemv_packed(x, w)`: x [T, K] @ dequant(W).t() for a packed W [N, K], nothing materialized: each row of W is
  decoded once into a K-float buffer (L1) and dotted with every row of x (vectorized, float32 accumulation).
  The decode is paid once per call, the dot products T times, so this serves few rows per expert
  (T <= FUSED_MAX_ROWS, decode); beyond that a library GEMM on a decoded tile is faster.
- `decode_rows(w, r0, r1, out)`: rows r0:r1 of W dequantized into a tile in float32 or bfloat16, for the tile
  path of experts/quantized.py (the tile then goes to oneDNN/MKL). bfloat16 is written directly (no float32
  pass): round-to-nearest-even of the float32 product, as torch's cast does; MXFP4 values (2 significant bits
  times a power of two) are exact in bfloat16.

Decoding is exact (a code value times a power of two, or a float32 scale), so in float32 the results equal
x @ dequant(W).t() up to summation order. One thread: serial kernels (waking a parallel region costs
milliseconds on a busy machine); more: the same loops under prange, over chunks of rows. Without numba,
experts/quantized.py decodes with torch ops.
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

FUSED_MAX_ROWS = 4  # rows of x up to which gemv_packed beats decode-a-tile + GEMM (measured, see the README)
CHUNK_ROWS = 16  # rows of W per parallel work item
_BYTES = torch.arange(256, dtype=torch.uint8)
E8M0_LUT = scale_to_float(_BYTES.view(torch.float8_e8m0fnu)).numpy()
E4M3_LUT = _BYTES.view(torch.float8_e4m3fn).float().numpy()
E2M1_PAIRS = e2m1_lut(torch.float32).numpy()


def available() -> bool:
    return numba is not None


# ---- one row of W -> dst[o, :] in float32 (the only decoders; every kernel below calls one of them) -------
# (2-D arrays and row indices rather than 1-D row views: measured 1.3x faster in numba)
def _mxfp4_row_py(codes, scales, r, e8m0, pairs, dst, o):  # codes [N, K/2] u8, scales [N, K/32] u8
    for g in range(scales.shape[1]):
        s = e8m0[scales[r, g]]
        for j in range(16):
            b = codes[r, g * 16 + j]
            dst[o, g * 32 + 2 * j] = pairs[b, 0] * s
            dst[o, g * 32 + 2 * j + 1] = pairs[b, 1] * s


def _fp8_row_py(codes, scales, r, block, e4m3, dst, o):  # codes [N, K] u8, scales [ceil(N/bo), ceil(K/bi)] f32
    k = codes.shape[1]
    bi = block[1]
    srow = scales[r // block[0]]
    for kb in range(srow.shape[0]):
        s = srow[kb]
        j0 = kb * bi
        j1 = min(k, j0 + bi)
        c = codes[r, j0:j1]
        d = dst[o, j0:j1]
        for j in range(j1 - j0):
            d[j] = e4m3[c[j]] * s


def _to_bf16_py(buf, dst, o):  # float32 buf [1, K] -> bf16 bits dst[o, :] (u16), rounded to nearest even
    bits = buf.view(np.uint32)
    for i in range(buf.shape[1]):
        u = bits[0, i]
        dst[o, i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


# ---- kernels: `row` decodes one row of W in one format; each kernel is built per (format, parallel) -------
def _build(fmt, row, to_bf16, parallel):
    def gemv(x, codes, scales, a, b, out):  # x [T, K] f32 -> out [T, N] f32
        t_rows, k = x.shape
        num_rows = codes.shape[0]
        for ch in prange((num_rows + CHUNK_ROWS - 1) // CHUNK_ROWS):
            buf = np.empty((1, k), np.float32)
            for n in range(ch * CHUNK_ROWS, min(num_rows, ch * CHUNK_ROWS + CHUNK_ROWS)):
                row(codes, scales, n, a, b, buf, 0)
                for t in range(t_rows):
                    acc = np.float32(0.0)
                    for j in range(k):
                        acc += buf[0, j] * x[t, j]
                    out[t, n] = acc

    def decode_f32(r0, r1, codes, scales, a, b, out):  # rows r0:r1 of W -> out [r1 - r0, K] f32
        for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
            for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
                row(codes, scales, r, a, b, out, r - r0)

    def decode_bf16(r0, r1, codes, scales, a, b, out):  # rows r0:r1 of W -> out [r1 - r0, K] bf16 bits (u16)
        for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
            buf = np.empty((1, out.shape[1]), np.float32)
            for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
                row(codes, scales, r, a, b, buf, 0)
                to_bf16(buf, out, r - r0)

    kernels = {}
    for name, fn in (("gemv", gemv), ("f32", decode_f32), ("bf16", decode_bf16)):
        # a distinct name per (format, parallel): numba's on-disk cache is keyed by name and signature only
        fn.__qualname__ = f"{name}_{fmt}_{'parallel' if parallel else 'serial'}"
        kernels[name] = numba.njit(parallel=parallel, fastmath=True, cache=True)(fn)
    return kernels


_KERNELS: dict[tuple[str, bool], dict] = {}
if numba is not None:
    _to_bf16 = numba.njit(fastmath=True, cache=True)(_to_bf16_py)
    _ROWS = {"mxfp4": numba.njit(fastmath=True, cache=True)(_mxfp4_row_py),
             "fp8": numba.njit(fastmath=True, cache=True)(_fp8_row_py)}
    for _fmt, _row in _ROWS.items():
        for _par in (False, True):
            _KERNELS[(_fmt, _par)] = _build(_fmt, _row, _to_bf16, _par)


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
