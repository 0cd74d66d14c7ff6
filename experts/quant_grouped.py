"""Grouped GEMMs over packed (MXFP4 / FP8) expert weights: every expert hit in one numba call per GEMM.

For each group g, rows starts[g]:starts[g + 1] of x times slot slots[g] of a layer's stacked packed W, with each
expert computed on only its own rows (experts/quantized.py's decode-sized path; the unquantized bf16 experts'
twin is experts/bf16_numba.py). Work items under prange are (group, GROUP_CHUNK_ROWS rows of W).

- bf16 (AVX512-BF16 and AVX512-BW CPUs): DOT_ROWS rows of W at a time decoded into an L1 buffer of bf16 bits by
  LLVM intrinsics (experts/numba_intrinsics.py): MXFP4 one vpermw per 32 codes (a 32-lane table of the group's
  16 values), FP8 two vpermi2w per 32 codes into per-block tables of the 128 magnitudes x the block scale, the
  tables made by quant_numba's exact row decode; then vdpbf16ps dot blocks. The values are the tile decoders'
  exactly, rounded as they round. Measured on a 2-core Zen 5 EPYC, one thread, a [512, 1024] weight: 11 us
  (MXFP4) and 13 us (FP8) to decode it, against 29 us and 100+ us for the numba-lane decoders.
- float32 MXFP4: each row decoded exactly and dotted in float32 lanes (the fused GEMV's arithmetic).

Importing this module registers its kernels in quant_numba's kernel table (`grouped_bf16`, `grouped_f32`,
`grouped_bf16_arith`); quant_kernels.grouped_mm picks one per call.
"""

from __future__ import annotations

import numpy as np

from moeray.experts.quant_numba import (
    _KERNELS,
    E8M0_BITS_MAX,
    E8M0_BITS_MIN,
    PREFETCH_ROWS,
    _named,
    numba,
    prange,
)

GROUP_CHUNK_ROWS = 64  # rows of W per parallel work item of the grouped kernels (a multiple of DOT_ROWS)
DOT_ROWS = 4  # rows of W the grouped bf16 kernels decode at a time, one dot block (bf16_numba's BLOCK)


def _bf16_dots_py(x, buf, out, col):  # out[:, col + j] = x [T, K] . buf[j] for j < DOT_ROWS (bf16 bits, vdpbf16ps)
    rows = x.shape[0]
    t = 0
    while t + DOT_ROWS <= rows:
        _dot_to4(x, t, buf, 0, out, col)
        t += DOT_ROWS
    rest = rows - t
    if rest == 1:
        _dot_to1(x, t, buf, 0, out, col)
    elif rest == 2:
        _dot_to2(x, t, buf, 0, out, col)
    elif rest == 3:
        _dot_to3(x, t, buf, 0, out, col)


def _no_tables_py(scales, n, n0, a, tabs):  # the decoders that need no per-band tables
    pass


def _mxfp4_row_vec_py(codes, scales, r, a, b, tabs, buf, j):  # row r -> bf16 bits in buf[j]
    _mxfp4_vec(codes, r, scales, buf, j)  # (scale bytes 2..252 only: the caller checks, see mxfp4_scales_in_range)


E4M3_MAGNITUDES = np.arange(128, dtype=np.uint8)  # the codes the fp8 lookup tables are decoded from


def _fp8_tables_py(scales, band, tabs):  # tabs[kb] = the bf16 bits of the 128 magnitude codes x scales[band, kb]
    for kb in range(scales.shape[1]):
        _fp8_row_bf16(E4M3_MAGNITUDES, scales[band, kb:kb + 1], 128, tabs[kb])


def _fp8_band_tables_py(scales, n, n0, block, tabs):  # at the work item's first rows and each band's first
    if n == n0 or n % block[0] == 0:
        _fp8_tables(scales, n // block[0], tabs)


def _fp8_row_lut_py(codes, scales, r, block, e4m3, tabs, buf, j):  # row r -> bf16 bits in buf[j] by the tables
    _fp8_lut(codes, r, tabs, block[1], buf, j)


def _fp8_row_arith_grouped_py(codes, scales, r, block, e4m3, tabs, buf, j):  # row r -> bf16 bits, buf[j]
    _fp8_row_bf16(codes[r], scales[r // block[0]], block[1], buf[j])  # any blocks: the exact decode itself


def mxfp4_scales_in_range(scales: np.ndarray) -> bool:
    """Whether every e8m0 scale byte keeps every e2m1 product a normal bf16 (2..252: every checkpoint's), which
    the grouped MXFP4 kernel needs (its decode has no fallback: a branch to one in the row loop measured 1.6x
    slower)."""
    return bool(((scales >= E8M0_BITS_MIN) & (scales <= E8M0_BITS_MAX)).all())


def _grouped_kernel(item_rows):
    """A grouped GEMM over packed weights: for each group g, rows starts[g]:starts[g + 1] of x [P, K] times slot
    slots[g] of the stacked W [S, N, K'] (codes, scales: kernel_args of the stacks, a and b their tables or
    block), into out[:, col0:col0 + N] (float32). Work items (under prange) are (group, GROUP_CHUNK_ROWS rows of
    W): `item_rows(codes, scales, a, b, x, out, n0, n1, col0)` computes rows n0:n1 of one slot's W against the
    group's rows x into out. Every expert hit in one call, each on its own rows; the packed weights read once."""
    def grouped(x, starts, slots, codes, scales, a, b, out, col0):
        n_rows = codes.shape[1]
        chunks = (n_rows + GROUP_CHUNK_ROWS - 1) // GROUP_CHUNK_ROWS
        for item in prange(slots.shape[0] * chunks):
            g, n0 = item // chunks, (item % chunks) * GROUP_CHUNK_ROWS
            xg, og = x[starts[g]:starts[g + 1]], out[starts[g]:starts[g + 1]]
            if xg.shape[0]:
                item_rows(codes[slots[g]], scales[slots[g]], a, b, xg, og, n0, min(n_rows, n0 + GROUP_CHUNK_ROWS),
                          col0)
    return grouped


def _bf16_rows(tables, decode_row):
    """A work item of the grouped bf16 GEMM (x as bf16 bits): DOT_ROWS rows of W at a time decoded into an L1
    buffer of bf16 bits and dotted with x's rows by vdpbf16ps blocks (experts/numba_intrinsics.
    bf16_dot_block_to). `tables(scales, n, n0, a, tabs)` before rows n.. fills the decoder's per-band tables in
    tabs [scales.shape[-1], 128] uint16 where it has any; `decode_row(codes, scales, r, a, b, tabs, buf, j)`
    writes row r into buf[j]: the tile decoders' exact values, rounded as they round."""
    def rows(codes, scales, a, b, x, out, n0, n1, col0):
        buf = np.empty((DOT_ROWS, x.shape[1]), np.uint16)
        tabs = np.empty((scales.shape[1], 128), np.uint16)
        for n in range(n0, n1, DOT_ROWS):
            tables(scales, n, n0, a, tabs)
            for j in range(DOT_ROWS):
                _prefetch_row(codes, n + j + PREFETCH_ROWS)
                decode_row(codes, scales, n + j, a, b, tabs, buf, j)
            _bf16_dots(x, buf, out, col0 + n)
    return rows


def _mxfp4_f32_rows_py(codes, scales, a, b, x, out, n0, n1, col0):
    # a work item of the grouped float32 MXFP4 GEMM: each row of W decoded exactly (bf16 bits, exact for scale
    # bytes 2..252) and dotted with x's rows by the fused GEMV's float32 dots -- the GEMV's arithmetic with the
    # vpermw decode. (FP8 keeps the per-expert GEMV: a grouped loop over its float32 decode measured 1.7x slower
    # for the whole call, 8.7 vs 5.1 ms at 16 tokens, top-2 of 64, D=1024 I=512, 2-core Zen 5, one thread.)
    row = np.empty((1, x.shape[1]), np.uint16)
    for r in range(n0, n1):
        _prefetch_row(codes, r + PREFETCH_ROWS)
        _mxfp4_vec(codes, r, scales, row, 0)
        _dots_bf16(x, row, col0 + r, out)


def _jit(fn, name: str, parallel: bool, fastmath: bool = True):
    # a distinct name per (kernel, parallel), with a digest of the files whose inlined helpers it uses: numba's
    # on-disk cache checks only this file (numba_intrinsics.source_tag)
    fn.__qualname__ = f"{name}_{'parallel' if parallel else 'serial'}_{_SOURCE_TAG}"
    return numba.njit(parallel=parallel, fastmath=fastmath, cache=True)(fn)


if numba is not None:
    from moeray.experts import quant_numba as _qn
    from moeray.experts.numba_intrinsics import bf16_dot_block_to, fp8_row_bf16_lut, mxfp4_row_bf16, source_tag

    _SOURCE_TAG = source_tag(_qn.__file__)
    _inline = numba.njit(fastmath=True, cache=True, inline="always")
    _inline_exact = numba.njit(fastmath=False, cache=True, inline="always")
    _prefetch_row, _dots_bf16, _fp8_row_bf16 = _qn._prefetch_row, _qn._dots_bf16, _qn._fp8_row_bf16
    # declared here, compiled only where a grouped bf16 kernel is first called (CPUs with avx512bf16)
    _dot_to1, _dot_to2, _dot_to3, _dot_to4 = (bf16_dot_block_to(r, DOT_ROWS) for r in (1, 2, 3, 4))
    _bf16_dots = _inline(_bf16_dots_py)
    _mxfp4_vec, _fp8_lut = mxfp4_row_bf16(), fp8_row_bf16_lut()  # AVX512-BW, the same CPUs
    _mxfp4_row_vec = _inline(_mxfp4_row_vec_py)
    # a call, not inlined: inlined into the kernel's row loop it measured 2x slower (rarely taken, it still cost)
    _fp8_tables = numba.njit(fastmath=False, cache=True)(_named(_fp8_tables_py, "fp8_band_tables"))
    _fp8_band_tables = _inline_exact(_fp8_band_tables_py)
    _no_tables = _inline(_no_tables_py)
    _mxfp4_f32_rows = _inline(_mxfp4_f32_rows_py)
    _fp8_row_lut = _inline_exact(_fp8_row_lut_py)
    _fp8_row_arith_grouped = _inline_exact(_fp8_row_arith_grouped_py)
    _bf16_rows_mxfp4 = _inline(_named(_bf16_rows(_no_tables, _mxfp4_row_vec), "bf16_rows_mxfp4"))
    _bf16_rows_fp8_lut = _inline_exact(_named(_bf16_rows(_fp8_band_tables, _fp8_row_lut), "bf16_rows_fp8_lut"))
    _bf16_rows_fp8 = _inline_exact(_named(_bf16_rows(_no_tables, _fp8_row_arith_grouped), "bf16_rows_fp8"))
    for _par in (False, True):
        _KERNELS[("mxfp4", _par)].update({
            "grouped_bf16": _jit(_grouped_kernel(_bf16_rows_mxfp4), "grouped_bf16_mxfp4", _par),
            "grouped_f32": _jit(_grouped_kernel(_mxfp4_f32_rows), "grouped_f32_mxfp4", _par)})
        _KERNELS[("fp8", _par)].update({
            # blocks of bo x bi with bo a multiple of DOT_ROWS and bi of 32 (every checkpoint's) by the lookup,
            # others by the exact decode
            "grouped_bf16": _jit(_grouped_kernel(_bf16_rows_fp8_lut), "grouped_bf16_fp8_lut", _par, fastmath=False),
            "grouped_bf16_arith": _jit(_grouped_kernel(_bf16_rows_fp8), "grouped_bf16_fp8", _par, fastmath=False)})
