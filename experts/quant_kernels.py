"""Dequantize-and-multiply CPU kernels for packed expert weights (numba).

- `gemv_packed(x, w)`: x [T, K] @ dequant(W).t() for a packed W [N, K], nothing materialized: each row of W is
  decoded once into an L1 row buffer and dotted with every row of x (vectorized, float32 accumulation, four rows
  of x per pass). The decode is paid once per call and the dots T times, so this serves few rows per expert
  (T <= FUSED_MAX_ROWS, decode and small prefill batches); beyond that a library GEMM on a decoded tile is faster.
- `decode_rows(w, r0, r1, out)`: rows r0:r1 of W dequantized into a tile in float32 or bfloat16, for the tile
  path of experts/quantized.py (the tile then goes to oneDNN/MKL).
- `grouped_mm(x, starts, slots, w)`: the rows of every expert hit times its W from a layer's stacked packed
  weights, in one call: bf16 rows (CPUs with AVX512-BF16) by a bf16 decode into an L1 buffer and vdpbf16ps
  dots; float32 rows by an exact decode and float32 dots.

The numba kernels themselves (decoders, GEMVs, their design and measured choices) live in
experts/quant_numba.py (the grouped ones in experts/quant_grouped.py); this module picks one per call and passes
numpy views of torch tensors.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from moeray.experts import bf16_numba, quant_grouped
from moeray.experts.quant_grouped import mxfp4_scales_in_range  # noqa: F401 (importing it registers the kernels)
from moeray.experts.quant_numba import (  # noqa: F401
    _KERNELS,
    E2M1_PAIRS,
    E4M3_LUT,
    E8M0_LUT,
    available,
    numba,
)

# rows of x up to which gemv_packed beats decoding a tile + the library GEMM on it (measured on an AMX Xeon, per
# expert of D=1024, I=512): against bf16 tiles (oneDNN) and against float32 tiles (MKL's fp32 GEMM is slower)
FUSED_MAX_ROWS = 10
FUSED_MAX_ROWS_F32 = 16


def _threads() -> int:
    """The kernels' threads (torch's count, capped by numba's pool): bf16_numba.threads, shared by every kernel."""
    return bf16_numba.threads()


def _scale_f32(scale: torch.Tensor) -> np.ndarray:
    """A stored fp8 block-scale tensor as float32 numpy (e8m0 bytes through the 256-entry table: torch's
    conversion is several ops per call)."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return E8M0_LUT[scale.contiguous().view(torch.uint8).numpy()]
    return scale.float().contiguous().numpy()


def _args(fmt: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> tuple:
    c = codes.view(torch.uint8).numpy()
    if fmt == "mxfp4":
        return (c, scale.view(torch.uint8).numpy(), E8M0_LUT, E2M1_PAIRS)
    return (c, _scale_f32(scale), np.array(block, dtype=np.int64), E4M3_LUT)


def denormals_kept() -> bool:
    """Whether this thread's float unit keeps denormal inputs (no DAZ: a library built with -ffast-math, or
    torch.set_flush_denormal(True), can turn it on); the fp8 arithmetic decode needs them, else the table one."""
    tiny = np.array([2.0**-140], dtype=np.float32)  # an array op: numpy's scalar path may not use the FPU's mode
    return bool((tiny * np.float32(2.0**20))[0] == np.float32(2.0**-120))


def kernel_args(fmt: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> tuple:
    """What the kernels take for one packed W: numpy views of its codes and scales (fp8 e8m0 scales as float32,
    a copy of a few floats) and the tables. Callers holding W may keep this and pass it as `args` (building it
    is a few microseconds a call); it shares W's memory, so it is valid while W is."""
    return _args(fmt, codes, scale, block)


def gemv_packed(x: torch.Tensor, fmt: str, codes: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int] | None, args: tuple | None = None) -> torch.Tensor:
    """x [T, K] @ dequant(W).t() -> [T, N] float32 for W packed as `fmt` ("mxfp4" or "fp8"); `scale` as stored
    (mxfp4: e8m0 [N, K/32]; fp8: float32 or e8m0 [ceil(N/bo), ceil(K/bi)]); `args`: kernel_args' for W."""
    kernel = _KERNELS[(fmt, _threads() > 1)]["gemv"]
    xn = (x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()).detach().numpy()
    out = np.empty((xn.shape[0], codes.shape[0]), dtype=np.float32)
    kernel(xn, *(_args(fmt, codes, scale, block) if args is None else args), out)
    return torch.from_numpy(out)


def decode_rows(fmt: str, codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, r0: int,
                r1: int, out: torch.Tensor, kernel: str = "auto", args: tuple | None = None) -> None:
    """Rows r0:r1 of a packed W, dequantized into out [r1 - r0, K] (float32 or bfloat16, contiguous): a code
    value times its scale, the same products as experts/quant_formats' dequantizers (bfloat16: rounded to
    nearest even, as `.to(torch.bfloat16)` rounds). `kernel`: "auto" (bf16: the vectorized integer decode for
    mxfp4, the arithmetic one for fp8 where denormals are kept; fp32: the arithmetic one for fp8, the table for
    mxfp4) or "table" (every weight through a 256-entry table: the first kernels, kept as the reference).
    `args`: kernel_args' for W, if the caller keeps it."""
    if out.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"decode_rows writes float32 or bfloat16 tiles, not {out.dtype}")
    if kernel not in ("auto", "table"):
        raise ValueError(f"decode_rows kernel must be 'auto' or 'table', not {kernel!r}")
    kernels = _KERNELS[(fmt, _threads() > 1)]
    name = "f32" if out.dtype == torch.float32 else "bf16"
    args = _args(fmt, codes, scale, block) if args is None else args
    dst = out.numpy() if out.dtype == torch.float32 else out.view(torch.uint16).numpy()
    if fmt == "fp8" and (kernel == "table" or not denormals_kept()):
        kernels[name + "_table"](r0, r1, *args, dst)
    elif fmt == "fp8":
        kernels[name](r0, r1, *args[:3], dst.view(np.uint32) if name == "f32" else dst)
    else:
        kernels[name + "_table" if kernel == "table" and name == "bf16" else name](r0, r1, *args, dst)


def decode_expert(fmt: str, args: tuple[tuple, tuple, tuple], t13: torch.Tensor, t2: torch.Tensor) -> None:
    """A whole expert in one call: w1 then w3 into t13 [2I, D], w2 into t2 [D, I] (float32 or bfloat16 tiles, the
    same dtype), as `decode_rows` over all rows of each would; `args`: kernel_args of (w1, w3, w2)."""
    if t13.dtype not in (torch.float32, torch.bfloat16) or t2.dtype != t13.dtype:
        raise TypeError(f"decode_expert writes float32 or bfloat16 tiles of one dtype, not {t13.dtype}, {t2.dtype}")
    kernels = _KERNELS[(fmt, _threads() > 1)]
    name = "f32" if t13.dtype == torch.float32 else "bf16"
    d13 = t13.numpy() if name == "f32" else t13.view(torch.uint16).numpy()
    d2 = t2.numpy() if name == "f32" else t2.view(torch.uint16).numpy()
    if fmt == "fp8" and not denormals_kept():
        kernels[name + "_table_x3"](*args, d13, d2)
    elif fmt == "fp8":
        if name == "f32":
            d13, d2 = d13.view(np.uint32), d2.view(np.uint32)
        kernels[name + "_x3"](*(a[:3] for a in args), d13, d2)
    else:
        kernels[name + "_x3"](*args, d13, d2)


@functools.cache
def grouped_available(fmt: str, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm` runs here for `fmt` with rows in `dtype`: bfloat16 rows (MXFP4, FP8) need a CPU with
    avx512bf16 (the dots, experts/bf16_numba.available) and avx512bw (the decoders' vpermw / vpermi2w); float32
    rows, MXFP4 only, avx512bw."""

    if dtype == torch.bfloat16 and fmt in ("mxfp4", "fp8"):
        return bf16_numba.available() and bf16_numba.host_has("avx512bw")
    return dtype == torch.float32 and fmt == "mxfp4" and bf16_numba.host_has("avx512bw")


def grouped_mm(fmt: str, x: torch.Tensor, starts: np.ndarray, slots: np.ndarray, args: tuple, out: np.ndarray,
               col0: int = 0) -> None:
    """Every expert hit in one call: out[p, col0:col0 + N] = x[p] @ dequant(W[slots[g]]).t() for the rows p of
    group g (starts[g]:starts[g + 1]), with x [P, K] and W the stacked packed weights [S, N, K'] whose
    `kernel_args` are `args`; out [P, >= col0 + N] float32 numpy. Needs `grouped_available(fmt, x.dtype)`; MXFP4
    needs `mxfp4_scales_in_range` of the slots' scales, FP8 `denormals_kept()` (the arithmetic decode).
    - x bfloat16: each row of W decoded to bf16 exactly as `decode_rows` decodes bf16 tiles, then dotted with
      vdpbf16ps (float32 sums of the exact bf16 products, as oneDNN's bf16 GEMM sums them); N a multiple of 4, K
      of 32. fp8 blocks of 4k rows and 32k columns (every checkpoint's) decode through per-block lookup tables,
      others row by row.
    - x float32 (MXFP4): each row decoded exactly, float32 dots (the fused GEMV's arithmetic: exact up to
      summation order)."""
    kernels = _KERNELS[(fmt, _threads() > 1)]
    if x.dtype == torch.float32:
        kernels["grouped_f32"](x.contiguous().numpy(), starts, slots, *args, out, col0)
        return
    if x.dtype != torch.bfloat16:
        raise TypeError(f"grouped_mm takes bfloat16 or float32 rows, not {x.dtype}")
    lut = fmt != "fp8" or (args[2][0] % quant_grouped.DOT_ROWS == 0 and args[2][1] % 32 == 0)
    kernel = kernels["grouped_bf16" if lut else "grouped_bf16_arith"]
    kernel(x.contiguous().view(torch.uint16).numpy(), starts, slots, *args, out, col0)

