"""numba kernels behind experts/quant_kernels.py: the per-row decoders, the tile decoders and the fused GEMVs.

The decoders are vectorized arithmetic, no per-weight table lookups (a lookup is a scalar load per weight, or
a gather): MXFP4 as bf16 bits in 16-bit lanes (the e2m1 code's bits plus the scale's exponent: exact, 2
significant bits times a power of two; the GEMV widens them to float32 exactly), FP8 in float32 lanes (the
code's magnitude bits placed at float32's exponent position are its value x 2^-120, times scale x 2^120, then
bf16's round-to-nearest-even in integers, as `.to(torch.bfloat16)` rounds). numba types integer arithmetic as
int64 unless each step is cast back, and 64-bit lanes ran 2.5x slower, so every step is cast. Each prefetches
the codes a few rows ahead (1.4x on weights out of cache). Scales outside the fast range (MXFP4 bytes < 2 or >
252, FP8 block scales >= 2^8, FP8 where the FPU flushes denormals) take the first, table-based kernels, kept for
that and as the reference the tests hold the new ones to (`decode_rows(..., kernel="table")`).

Decoding is exact (a code value times a power of two, or a float32 scale), so in float32 the results equal
x @ dequant(W).t() up to summation order. One thread: serial kernels (waking a parallel region costs
milliseconds on a busy machine); more: the same loops under prange, over chunks of rows. Without numba,
experts/quantized.py decodes with torch ops. The MXFP4 loops index the 2-D arrays by row (measured 1.2-1.3x
faster than 1-D row views); the FP8 ones take 1-D block slices (2-D indexing with a column offset was not
vectorized: 9x slower); the helpers are inlined.

The grouped kernels (every expert hit in one call per GEMM) are in experts/quant_grouped.py.
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

CHUNK_ROWS = 16  # rows of W per parallel work item
PREFETCH_ROWS = 4  # the vectorized decoders prefetch the codes this many rows ahead (1.4x on weights out of cache)
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


def _mxfp4_row_in_range_py(scales, r):  # whether row r's scale bytes keep every value a normal bf16/f32
    fast = True
    for g in range(scales.shape[1]):
        fast &= E8M0_BITS_MIN <= scales[r, g] <= E8M0_BITS_MAX
    return fast


def _mxfp4_row_bf16_py(codes, scales, r, dst, o):  # row r -> bf16 bits in dst[o, :K] (u16), scales in range
    # 16-bit lanes throughout (numba types integer arithmetic as int64 unless every step is cast back: 64-bit
    # lanes measured 2.5x slower); per nibble m = code & 7 the bits are a + 64 (m + min(m, 2)) (0 for m = 0)
    # with a = (s << 7) - 0x100: e2m1's 0.5 (m = 1) is 0x3F00 + (s - 127) << 7, m >= 2 adds 64 per code step.
    u16 = np.uint16
    z, c2, c7, c8, c80 = u16(0), u16(2), u16(7), u16(8), u16(0x80)
    for g in range(scales.shape[1]):
        a = u16(u16(u16(scales[r, g]) << u16(7)) - u16(0x100))
        for j in range(16):
            b = u16(codes[r, g * 16 + j])
            lo = u16(b & c7)
            hi = u16(u16(b >> u16(4)) & c7)
            vl = u16(a + u16(u16(lo + min(lo, c2)) << u16(6)))
            vh = u16(a + u16(u16(hi + min(hi, c2)) << u16(6)))
            vl = vl if lo != z else z
            vh = vh if hi != z else z
            dst[o, g * 32 + 2 * j] = u16(vl | u16(u16(b & c8) << u16(12)))
            dst[o, g * 32 + 2 * j + 1] = u16(vh | u16(u16(b & c80) << u16(8)))


def _fp8_band_small_scales_py(scales, band):  # whether every block scale of the band x 2^120 is finite (< 2^8)
    ok = True
    for kb in range(scales.shape[1]):
        ok &= np.float32(scales[band, kb]) * np.float32(2.0**120) < np.float32(3e38)
    return ok


def _fp8_row_bits_py(codes, scales, band, r, bi, bits):  # row r -> float32 bits (u32 [1, K]); small scales
    # _fp8_arith_kernel's float32 decode: magnitude bits at float32's exponent position x (scale x 2^120)
    k = codes.shape[1]
    c7f, c80 = np.int32(0x7F), np.int32(0x80)
    for kb in range(scales.shape[1]):
        j0 = kb * bi
        n = min(k, j0 + bi) - j0
        c = codes[r, j0:j0 + n]
        d = bits[0, j0:j0 + n]
        sc = np.float32(np.float32(scales[band, kb]) * np.float32(2.0**120))
        for j in range(n):
            b = np.int32(c[j])
            mag = np.int32(b & c7f)
            u = _as_i32(np.float32(_as_f32(np.int32(mag << np.int32(20))) * sc))
            v = np.int32(0x7FC00000) if mag == c7f else u
            d[j] = np.uint32(np.int32(v | np.int32(np.int32(b & c80) << np.int32(24))))


# ---- kernels, built per (format, parallel) -----------------------------------------------------------------
def _dots_kernel(load):
    """out[:, n] = x [T, K] @ row, the row read through load(buf, j) -> float32 (buf [1, K]: float32, or bf16 bits
    widened exactly), four rows of x per pass over it."""
    def dots(x, buf, n, out):
        t_rows, k = x.shape
        for t in range(0, t_rows - 3, 4):
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(k):
                v = load(buf, j)
                a0 += v * x[t, j]
                a1 += v * x[t + 1, j]
                a2 += v * x[t + 2, j]
                a3 += v * x[t + 3, j]
            out[t, n], out[t + 1, n], out[t + 2, n], out[t + 3, n] = a0, a1, a2, a3
        for t in range(t_rows - t_rows % 4, t_rows):
            acc = np.float32(0.0)
            for j in range(k):
                acc += load(buf, j) * x[t, j]
            out[t, n] = acc
    return dots


def _named(fn, name: str):
    fn.__qualname__ = fn.__name__ = name
    return fn


def _load_f32_py(buf, j):
    return buf[0, j]


def _load_bf16_py(buf, j):  # bf16 bits (u16) -> float32, exactly
    return _as_f32(np.int32(np.int32(buf[0, j]) << np.int32(16)))


def _mxfp4_gemv_kernel(x, codes, scales, e8m0, pairs, out):  # x [T, K] f32 -> out [T, N] f32
    num_rows = codes.shape[0]
    for ch in prange((num_rows + CHUNK_ROWS - 1) // CHUNK_ROWS):
        buf = np.empty((1, x.shape[1]), np.float32)
        row = np.empty((1, x.shape[1]), np.uint16)  # bf16 bits: exact for in-range scales, half the bytes
        for n in range(ch * CHUNK_ROWS, min(num_rows, ch * CHUNK_ROWS + CHUNK_ROWS)):
            _prefetch_row(codes, n + PREFETCH_ROWS)
            if _mxfp4_row_in_range(scales, n):
                _mxfp4_row_bf16(codes, scales, n, row, 0)
                _dots_bf16(x, row, n, out)
            else:
                _mxfp4_row(codes, scales, n, e8m0, pairs, buf, 0)
                _dots(x, buf, n, out)


def _fp8_gemv_kernel(x, codes, scales, block, e4m3, out):  # x [T, K] f32 -> out [T, N] f32, by bands of bo rows
    bo, bi = block[0], block[1]
    num_rows, k = codes.shape
    for band in prange(scales.shape[0]):
        buf = np.empty((1, k), np.float32)
        bits = buf.view(np.uint32)
        if _fp8_band_small_scales(scales, band):  # the arithmetic decode (every checkpoint's scales are < 2^8)
            for n in range(band * bo, min(num_rows, band * bo + bo)):
                _prefetch_row(codes, n + PREFETCH_ROWS)
                _fp8_row_bits(codes, scales, band, n, bi, bits)
                _dots(x, buf, n, out)
            continue
        lut = np.empty((scales.shape[1], 256), np.float32)  # the band's blocks' scaled values (as in the tiles)
        _fp8_lut_f32(scales, band, e4m3, lut)
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
    # the row decode of _mxfp4_row_bf16, inlined. Rows with a scale byte that would leave bf16's normal range
    # (never on the hub) are redone by the table afterwards (a branch inside this loop measured 1.35x slower).
    for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
        for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
            _prefetch_row(codes, r + PREFETCH_ROWS)
            _mxfp4_row_bf16(codes, scales, r, out, r - r0)
    buf = np.empty((1, out.shape[1]), np.float32)
    for r in range(r0, r1):
        if not _mxfp4_row_in_range(scales, r):
            _mxfp4_row(codes, scales, r, e8m0, pairs, buf, 0)
            _to_bf16(buf, out, r - r0)


def _mxfp4_bf16_table_kernel(r0, r1, codes, scales, e8m0, pairs, out):  # the same, by the f32 table (reference)
    for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
        buf = np.empty((1, out.shape[1]), np.float32)
        for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
            _mxfp4_row(codes, scales, r, e8m0, pairs, buf, 0)
            _to_bf16(buf, out, r - r0)


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


_FP8_SIGN_MAG = np.int32(np.uint32(0x87F00000).view(np.int32))  # float32 bits 31 (sign) and 26..20 (magnitude)


def _fp8_row_arith(to_bf16):
    """One row of an fp8 W -> bf16 bits (u16) or float32 bits (u32) by arithmetic on 32-bit lanes, no table:
    the code's 7 magnitude bits shifted to a float32's exponent/mantissa position are its value times 2^-120
    (e4m3's subnormals land on float32 subnormals), so one multiply by scale x 2^120 gives value x scale, rounded
    once as `w.float() * scale` rounds (needs no denormals-are-zero; the caller checks). Blocks whose scale
    x 2^120 overflows (scale >= 2^8) take two multiplies (x 2^120: the value, exact; then x scale; compiled
    without fastmath, which would fold them into one). code << 24, arithmetic >> 4 and a mask place the sign at
    bit 31 and the magnitude at 26..20 in three ops (1.1x the separate sign), and rounding carries the sign
    along; NaN codes (0x7F, 0xFF) by a select. 1-D row and block slices: 2-D indexing here is not vectorized.
    row(crow [K] codes, srow [ceil(K/bi)] the float32 scales of the row's band, bi, orow [K] out)."""
    def row(crow, srow, bi, orow):
        k = crow.shape[0]
        c7f, c80 = np.int32(0x7F), np.int32(0x80)
        for kb in range(srow.shape[0]):
            j0 = kb * bi
            n = min(k, j0 + bi) - j0
            c = crow[j0:j0 + n]
            o = orow[j0:j0 + n]
            sc = np.float32(srow[kb])
            pre, post = np.float32(1.0), np.float32(sc * np.float32(2.0**120))
            if not post < np.float32(3e38):  # scale >= 2^8 (or inf/NaN): the code's value, then x scale
                pre, post = np.float32(2.0**120), sc
            else:  # the common block: sign and magnitude placed by two shifts and a mask
                for j in range(n):
                    b = np.int32(c[j])
                    t = np.int32(np.int32(np.int32(b << np.int32(24)) >> np.int32(4)) & _FP8_SIGN_MAG)
                    u = _as_i32(np.float32(_as_f32(t) * post))
                    nan = np.int32(b & c7f) == c7f
                    if to_bf16:  # round to nearest even (the sign rides along in bit 31)
                        v = np.int32(np.int32(u + np.int32(np.int32(0x7FFF) + np.int32(
                            np.int32(u >> np.int32(16)) & np.int32(1)))) >> np.int32(16))
                        o[j] = np.uint16(np.int32(v | np.int32(0x7FC0)) if nan else v)
                    else:
                        o[j] = np.uint32(np.int32(u | np.int32(0x7FC00000)) if nan else u)
                continue
            for j in range(n):
                b = np.int32(c[j])
                mag = np.int32(b & c7f)
                f = np.float32(np.float32(_as_f32(np.int32(mag << np.int32(20))) * pre) * post)
                u = _as_i32(f)
                if to_bf16:  # round to nearest even, then the sign bit 15
                    v = np.int32(np.int32(u + np.int32(np.int32(0x7FFF) + np.int32(np.int32(u >> np.int32(16))
                                                                             & np.int32(1)))) >> np.int32(16))
                    v = np.int32(0x7FC0) if mag == c7f else v
                    o[j] = np.uint16(np.int32(v | np.int32(np.int32(b & c80) << np.int32(8))))
                else:
                    v = np.int32(0x7FC00000) if mag == c7f else u
                    o[j] = np.uint32(np.int32(v | np.int32(np.int32(b & c80) << np.int32(24))))
    return row


def _fp8_arith_kernel(row):
    """rows r0:r1 of an fp8 W -> out (bf16 bits u16 or float32 bits u32), row by row through `row` (an inlined
    _fp8_row_arith)."""
    def decode(r0, r1, codes, scales, block, out):
        bo, bi = block[0], block[1]
        for ch in prange((r1 - r0 + CHUNK_ROWS - 1) // CHUNK_ROWS):
            for r in range(r0 + ch * CHUNK_ROWS, min(r1, r0 + ch * CHUNK_ROWS + CHUNK_ROWS)):
                _prefetch_row(codes, r + PREFETCH_ROWS)
                row(codes[r], scales[r // bo], bi, out[r - r0])
    return decode


def _prefetch_row_py(codes, r):  # the cache lines of row r of a 2-D byte array, if it has one
    if r < codes.shape[0]:
        for q in range(0, codes.shape[1], 64):
            _prefetch(codes, r, q)


def _three_weights_kernel(kern):
    """One call decoding a whole expert: w1 then w3 into the rows of t13, w2 into t2 (each a*: `kern`'s arguments
    for that weight). One dispatch from Python instead of three (each measured ~10 us, more right after a GEMM
    has taken the caches)."""
    def decode3(a1, a3, a2, t13, t2):
        n = a1[0].shape[0]
        kern(0, n, *a1, t13[:n])
        kern(0, n, *a3, t13[n:])
        kern(0, a2[0].shape[0], *a2, t2)
    return decode3


def _jit_kernel(fn, name: str, parallel: bool, fastmath: bool = True):
    # a distinct name per (kernel, parallel): numba's on-disk cache is keyed by name and signature only
    fn.__qualname__ = f"{name}_{'parallel' if parallel else 'serial'}_{_SOURCE_TAG}"  # see source_tag
    return numba.njit(parallel=parallel, fastmath=fastmath, cache=True)(fn)


_KERNELS: dict[tuple[str, bool], dict] = {}
if numba is not None:
    _inline = numba.njit(fastmath=True, cache=True, inline="always")
    _to_bf16 = _inline(_to_bf16_py)
    _e2m1_bf16 = _inline(_e2m1_bf16_py)
    _mxfp4_row = _inline(_mxfp4_row_py)
    _fp8_lut_f32 = _inline(_fp8_band_lut_f32_py)
    _fp8_lut_bf16 = _inline(_fp8_band_lut_bf16_py)
    from moeray.experts.numba_intrinsics import intrinsics, source_tag

    _as_f32, _as_i32, _prefetch = intrinsics()
    _SOURCE_TAG = source_tag()
    # the two dots differ only in their load; distinct names, since numba's cache is keyed by name and signature
    _dots = _inline(_named(_dots_kernel(_inline(_load_f32_py)), "dots_f32"))
    _dots_bf16 = _inline(_named(_dots_kernel(_inline(_load_bf16_py)), "dots_bf16"))
    _prefetch_row = _inline(_prefetch_row_py)
    _mxfp4_row_in_range = _inline(_mxfp4_row_in_range_py)
    _mxfp4_row_bf16 = _inline(_mxfp4_row_bf16_py)
    _fp8_band_small_scales = _inline(_fp8_band_small_scales_py)
    _fp8_row_bits = _inline(_fp8_row_bits_py)
    # no fastmath: it would fold the two multiplies of large-scale blocks into one (overflowing)
    _inline_exact = numba.njit(fastmath=False, cache=True, inline="always")
    _fp8_row_f32 = _inline_exact(_named(_fp8_row_arith(False), "fp8_row_arith_f32"))
    _fp8_row_bf16 = _inline_exact(_named(_fp8_row_arith(True), "fp8_row_arith_bf16"))
    for _par in (False, True):
        _KERNELS[("mxfp4", _par)] = {
            "gemv": _jit_kernel(_mxfp4_gemv_kernel, "gemv_mxfp4_u16lanes", _par),
            "f32": _jit_kernel(_mxfp4_f32_kernel, "decode_f32_mxfp4", _par),
            "bf16": _jit_kernel(_mxfp4_bf16_kernel, "decode_bf16_mxfp4_u16lanes", _par),
            "bf16_table": _jit_kernel(_mxfp4_bf16_table_kernel, "decode_bf16_mxfp4_table", _par)}
        _KERNELS[("fp8", _par)] = {
            "gemv": _jit_kernel(_fp8_gemv_kernel, "gemv_fp8_arith", _par),
            "f32_table": _jit_kernel(_fp8_tile_kernel(_fp8_lut_f32, np.float32), "decode_f32_fp8", _par),
            "bf16_table": _jit_kernel(_fp8_tile_kernel(_fp8_lut_bf16, np.uint16), "decode_bf16_fp8", _par),
            # no fastmath: it would fold the two multiplies of large-scale blocks into one (overflowing)
            "f32": _jit_kernel(_fp8_arith_kernel(_fp8_row_f32), "decode_f32_fp8_arith", _par, fastmath=False),
            "bf16": _jit_kernel(_fp8_arith_kernel(_fp8_row_bf16), "decode_bf16_fp8_arith", _par, fastmath=False)}
        for _fmt in ("mxfp4", "fp8"):
            _KERNELS[(_fmt, _par)].update({
                f"{_name}_x3": _jit_kernel(_three_weights_kernel(_KERNELS[(_fmt, _par)][_name]),
                                           f"decode3_{_name}_{_fmt}", _par)
                for _name in list(_KERNELS[(_fmt, _par)]) if _name != "gemv"})
