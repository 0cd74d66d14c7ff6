"""numba intrinsics the packed-expert kernels (experts/quant_numba.py) need and numba lacks: scalar int32 <->
float32 bit casts (an LLVM bitcast, vectorized like any other op) and a cache prefetch of a 2-D array's element
(LLVM's generic llvm.prefetch: prefetcht0 on x86, a hint that never faults). Imported only where numba is."""

from __future__ import annotations

from llvmlite import ir as _llvm_ir
from numba import types as _nb_types
from numba.extending import intrinsic as _intrinsic


def source_tag(*files: str) -> str:
    """A digest of this file and `files` (other modules whose inlined helpers a kernel uses), for the names of the
    kernels that use these intrinsics: numba's on-disk cache is invalidated by a change to the kernel's own file
    only, so a changed intrinsic or helper would otherwise keep serving the code compiled from the old one."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha1()
    for f in (__file__, *files):
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:10]


PREFETCH_LOCALITY = 3  # llvm.prefetch locality: 3 = all cache levels (0, non-temporal, measured 1.2x slower)


def intrinsics():
    """-> (as_f32(int32), as_i32(float32), prefetch(array, row, col)), usable inside njit functions."""
    @_intrinsic
    def as_f32(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.FloatType())
        return _nb_types.float32(_nb_types.int32), codegen

    @_intrinsic
    def as_i32(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], _llvm_ir.IntType(32))
        return _nb_types.int32(_nb_types.float32), codegen

    @_intrinsic
    def prefetch(typingctx, arr, row, col):
        def codegen(context, builder, signature, args):
            from numba.core import cgutils
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            idx = [context.cast(builder, v, t, _nb_types.intp) for v, t in zip(args[1:], signature.args[1:])]
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
            i8p, i32 = _llvm_ir.IntType(8).as_pointer(), _llvm_ir.IntType(32)
            fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=_llvm_ir.FunctionType(
                _llvm_ir.VoidType(), [i8p, i32, i32, i32]))
            # read, locality 3 (all cache levels), data cache
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(PREFETCH_LOCALITY), i32(1)])
            return context.get_dummy_value()
        return _nb_types.void(arr, row, col), codegen
    return as_f32, as_i32, prefetch


class _BFloat(_llvm_ir.Type):
    """LLVM's bfloat type, which llvmlite's IR builder does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


BF16_DOT_K = 32  # bf16 elements per vector step of the dot block (one 512-bit register)


def bf16_dot_block(rx: int, rw: int):
    """An intrinsic dot(x, t0, w, n0, out): out[t0 + i, n0 + j] = sum_k x[t0 + i, k] * w[n0 + j, k] for i < rx,
    j < rw, with x [T, K] and w [N, K] bf16 bits (uint16, rows contiguous, K a multiple of BF16_DOT_K) and out
    float32. AVX512-BF16's vdpbf16ps: 32 products per instruction summed pairwise into 16 float32 lanes (the
    instruction rounds to nearest even and treats denormal inputs as zero), rx x rw vector accumulators kept in
    registers, each reduced once at the end. Only for CPUs with avx512bf16 (bf16_dot_available checks): LLVM
    cannot lower the instruction for others."""
    @_intrinsic
    def dot(typingctx, x, t0, w, n0, out):
        def codegen(context, builder, signature, args):
            _dot_codegen(context, builder, signature, args, rx, rw, out_col=3)
            return context.get_dummy_value()
        return _nb_types.void(x, t0, w, n0, out), codegen
    return dot


def bf16_dot_block_to(rx: int, rw: int):
    """bf16_dot_block with the output column apart from W's row: an intrinsic dot(x, t0, w, n0, out, o0):
    out[t0 + i, o0 + j] = sum_k x[t0 + i, k] * w[n0 + j, k]. For W rows decoded into a small buffer (the packed
    experts' grouped kernels in experts/quant_numba.py: 4 rows decoded at a time, n0 = 0, written to column o0)."""
    @_intrinsic
    def dot(typingctx, x, t0, w, n0, out, o0):
        def codegen(context, builder, signature, args):
            _dot_codegen(context, builder, signature, args, rx, rw, out_col=5)
            return context.get_dummy_value()
        return _nb_types.void(x, t0, w, n0, out, o0), codegen
    return dot


def _dot_codegen(context, builder, signature, args, rx: int, rw: int, out_col: int) -> None:
    """The dot block's LLVM IR (see bf16_dot_block): args (x, t0, w, n0, out[, o0]); the output column of W row
    n0 + j is args[out_col] + j."""
    from numba.core import cgutils
    xa, wa, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 4))
    intp = context.get_value_type(_nb_types.intp)
    t0v, n0v, o0v = (context.cast(builder, args[i], signature.args[i], _nb_types.intp) for i in (1, 3, out_col))
    k = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
    xs0, ws0, os0 = (cgutils.unpack_tuple(builder, a.strides, 2)[0] for a in (xa, wa, oa))
    i8p, f32 = _llvm_ir.IntType(8).as_pointer(), _llvm_ir.FloatType()
    v16f, v32bf = _llvm_ir.VectorType(f32, 16), _llvm_ir.VectorType(_BFloat(), BF16_DOT_K)
    xb, wb, ob = (builder.bitcast(a.data, i8p) for a in (xa, wa, oa))
    xrows = [builder.gep(xb, [builder.mul(builder.add(t0v, intp(i)), xs0)]) for i in range(rx)]
    wrows = [builder.gep(wb, [builder.mul(builder.add(n0v, intp(j)), ws0)]) for j in range(rw)]
    dp = builder.module.declare_intrinsic("llvm.x86.avx512bf16.dpbf16ps.512",
                                          fnty=_llvm_ir.FunctionType(v16f, [v16f, v32bf, v32bf]))
    red = builder.module.declare_intrinsic("llvm.vector.reduce.fadd.v16f32",
                                           fnty=_llvm_ir.FunctionType(f32, [f32, v16f]))
    zero = _llvm_ir.Constant(v16f, [0.0] * 16)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(rw)] for _ in range(rx)]
    with cgutils.for_range(builder, builder.udiv(k, intp(BF16_DOT_K))) as loop:
        off = builder.mul(loop.index, intp(2 * BF16_DOT_K))  # bytes
        xv = [builder.load(builder.bitcast(builder.gep(r, [off]), v32bf.as_pointer()), align=2) for r in xrows]
        wv = [builder.load(builder.bitcast(builder.gep(r, [off]), v32bf.as_pointer()), align=2) for r in wrows]
        for i in range(rx):
            for j in range(rw):
                builder.store(builder.call(dp, [builder.load(accs[i][j]), xv[i], wv[j]]), accs[i][j])
    for i in range(rx):
        orow = builder.bitcast(builder.gep(ob, [builder.mul(builder.add(t0v, intp(i)), os0)]), f32.as_pointer())
        if rw == 4:  # the four sums of a row at once: one shuffle tree, one 4-float store
            dst = builder.bitcast(builder.gep(orow, [o0v]), _llvm_ir.VectorType(f32, 4).as_pointer())
            builder.store(_sum4(builder, [builder.load(a) for a in accs[i]]), dst, align=4)
            continue
        for j in range(rw):
            total = builder.call(red, [_llvm_ir.Constant(f32, 0.0), builder.load(accs[i][j])],
                                 fastmath=("reassoc",))
            builder.store(total, builder.gep(orow, [builder.add(o0v, intp(j))]))


def _sum4(builder, vs):
    """Four <16 x float> -> <4 x float> of their lane sums by a shuffle tree: halves added (16 -> 8 lanes), then
    pairs of vectors interleaved and added twice, then once more -- 14 shuffles and 7 adds for the four sums,
    against four separate reductions' ~32. Measured on the 2-core Zen 5, alternating old and new: the grouped bf16
    kernel's GEMM at 16 rows per expert 1.33 -> 1.02-1.13 ms per layer; the engine's expert time per B=64 step
    10.5-11.2 -> 7.3-8.6 ms."""
    i32 = _llvm_ir.IntType(32)

    def shuf(a, b, idx):
        return builder.shuffle_vector(a, b, _llvm_ir.Constant(_llvm_ir.VectorType(i32, len(idx)), idx))

    s8 = [builder.fadd(shuf(v, v, list(range(8))), shuf(v, v, list(range(8, 16)))) for v in vs]
    ab, cd = (builder.fadd(shuf(x, y, [0, 1, 2, 3, 8, 9, 10, 11]), shuf(x, y, [4, 5, 6, 7, 12, 13, 14, 15]))
              for x, y in ((s8[0], s8[1]), (s8[2], s8[3])))
    e = builder.fadd(shuf(ab, cd, [0, 1, 4, 5, 8, 9, 12, 13]), shuf(ab, cd, [2, 3, 6, 7, 10, 11, 14, 15]))
    return builder.fadd(shuf(e, e, [0, 2, 4, 6]), shuf(e, e, [1, 3, 5, 7]))


# bf16 bits of the e2m1 values (codes 0..15, low 3 bits the magnitude 0, .5, 1, 1.5, 2, 3, 4, 6; bit 3 the sign)
E2M1_BF16 = [0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0]
E2M1_BF16 = E2M1_BF16 + [0x8000 | v for v in E2M1_BF16]
MX_GROUP_BYTES = 16  # stored bytes per MXFP4 scale group (32 codes)


def _row_ptr(context, builder, aryty, ary, row):
    """i8* to row `row` (any int type) of a 2-D array."""
    from numba.core import cgutils
    a = context.make_array(aryty)(context, builder, ary)
    stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
    r = context.cast(builder, row[0], row[1], _nb_types.intp)
    return builder.gep(builder.bitcast(a.data, _llvm_ir.IntType(8).as_pointer()), [builder.mul(r, stride)]), a


def _splat(builder, value, n: int):
    vec = _llvm_ir.VectorType(value.type, n)
    one = builder.insert_element(_llvm_ir.Constant(vec, _llvm_ir.Undefined), value, _llvm_ir.IntType(32)(0))
    return builder.shuffle_vector(one, _llvm_ir.Constant(vec, _llvm_ir.Undefined),
                                  _llvm_ir.Constant(_llvm_ir.VectorType(_llvm_ir.IntType(32), n), [0] * n))


def mxfp4_row_bf16():
    """An intrinsic dec(codes, r, scales, out, o): row r of MXFP4 codes [N, K/2] (two e2m1 codes per byte, low
    nibble first) with e8m0 scale bytes [N, K/32] -> bf16 bits in out[o, :K] (uint16). Per 32 codes: the 16 bf16
    values of the codes under that group's scale are one 32-lane table (the e2m1 bf16 bits plus (s - 127) << 7
    on the exponent, zero codes left alone: exact while every product is a normal bf16, scale bytes 2..252 --
    the caller checks), the nibbles interleaved and zero-extended to 16-bit indices, and one vpermw (AVX512-BW)
    looks all 32 up. ~8 vector ops per 32 weights, against ~40 for the same decode in numba's 16-bit lanes."""
    @_intrinsic
    def dec(typingctx, codes, r, scales, out, o):
        def codegen(context, builder, signature, args):
            from numba.core import cgutils
            i8, i16, i32 = _llvm_ir.IntType(8), _llvm_ir.IntType(16), _llvm_ir.IntType(32)
            v16i8, v32i16 = _llvm_ir.VectorType(i8, 16), _llvm_ir.VectorType(i16, 32)
            intp = context.get_value_type(_nb_types.intp)
            crow, _ = _row_ptr(context, builder, signature.args[0], args[0], (args[1], signature.args[1]))
            srow, sa = _row_ptr(context, builder, signature.args[2], args[2], (args[1], signature.args[1]))
            orow, _ = _row_ptr(context, builder, signature.args[3], args[3], (args[4], signature.args[4]))
            groups = cgutils.unpack_tuple(builder, sa.shape, 2)[1]
            perm = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.hi.512",
                                                    fnty=_llvm_ir.FunctionType(v32i16, [v32i16, v32i16]))
            table = _llvm_ir.Constant(v32i16, E2M1_BF16 * 2)
            nonzero = _llvm_ir.Constant(v32i16, [0 if v & 0x7FFF == 0 else 0xFFFF for v in E2M1_BF16 * 2])
            interleave = _llvm_ir.Constant(_llvm_ir.VectorType(i32, 32), [i // 2 + 16 * (i % 2) for i in range(32)])
            with cgutils.for_range(builder, groups) as loop:
                g = loop.index
                s = builder.zext(builder.load(builder.gep(srow, [g])), i16)
                adj = builder.sub(builder.shl(s, i16(7)), i16(127 << 7))  # wraps below 127: two's complement
                tab = builder.add(table, builder.and_(_splat(builder, adj, 32), nonzero))
                src = builder.gep(crow, [builder.mul(g, intp(MX_GROUP_BYTES))])
                b = builder.load(builder.bitcast(src, v16i8.as_pointer()), align=1)
                lo = builder.and_(b, _llvm_ir.Constant(v16i8, [15] * 16))
                hi = builder.lshr(b, _llvm_ir.Constant(v16i8, [4] * 16))
                idx = builder.zext(builder.shuffle_vector(lo, hi, interleave), v32i16)
                dst = builder.gep(orow, [builder.mul(g, intp(64))])  # 32 bf16 = 64 bytes
                builder.store(builder.call(perm, [tab, idx]), builder.bitcast(dst, v32i16.as_pointer()), align=2)
            return context.get_dummy_value()
        return _nb_types.void(codes, r, scales, out, o), codegen
    return dec


def fp8_row_bf16_lut():
    """An intrinsic dec(codes, r, tabs, bi, out, o): row r of fp8 e4m3 codes [N, K] -> bf16 bits out[o, :K]
    (uint16) through tabs [ceil(K/bi), 128] (uint16): per block of bi columns (bi and K multiples of 32), the bf16
    bits of the 128 magnitude codes times that block's scale, made by the exact decode (so NaN, subnormal and
    rounding cases are whatever it gives). Per 32 codes: zero-extended to 16-bit lanes, the low 6 bits index two
    vpermi2w lookups (entries 0-63 and 64-127, AVX512-BW), bit 6 selects, bit 7 becomes bit 15 (the sign)."""
    @_intrinsic
    def dec(typingctx, codes, r, tabs, bi, out, o):
        def codegen(context, builder, signature, args):
            from numba.core import cgutils
            i8, i16 = _llvm_ir.IntType(8), _llvm_ir.IntType(16)
            v32i8, v32i16 = _llvm_ir.VectorType(i8, 32), _llvm_ir.VectorType(i16, 32)
            intp = context.get_value_type(_nb_types.intp)
            crow, ca = _row_ptr(context, builder, signature.args[0], args[0], (args[1], signature.args[1]))
            orow, _ = _row_ptr(context, builder, signature.args[4], args[4], (args[5], signature.args[5]))
            ta = context.make_array(signature.args[2])(context, builder, args[2])
            tbase = builder.bitcast(ta.data, i8.as_pointer())
            tstride = cgutils.unpack_tuple(builder, ta.strides, 2)[0]
            biv = context.cast(builder, args[3], signature.args[3], _nb_types.intp)
            k = cgutils.unpack_tuple(builder, ca.shape, 2)[1]
            perm2 = builder.module.declare_intrinsic("llvm.x86.avx512.vpermi2var.hi.512", fnty=_llvm_ir.FunctionType(
                v32i16, [v32i16, v32i16, v32i16]))
            c = [_llvm_ir.Constant(v32i16, [m] * 32) for m in (0x3F, 0x40, 0x80)]
            blocks = builder.udiv(builder.add(k, builder.sub(biv, intp(1))), biv)
            with cgutils.for_range(builder, blocks) as bloop:  # per block: its table in 4 registers
                trow = builder.gep(tbase, [builder.mul(bloop.index, tstride)])
                t = [builder.load(builder.bitcast(builder.gep(trow, [intp(64 * q)]), v32i16.as_pointer()), align=2)
                     for q in range(4)]
                b0 = builder.mul(bloop.index, biv)
                width = builder.sub(builder.select(builder.icmp_unsigned("<", builder.add(b0, biv), k),
                                                   builder.add(b0, biv), k), b0)
                with cgutils.for_range(builder, builder.udiv(width, intp(32))) as loop:
                    j0 = builder.add(b0, builder.mul(loop.index, intp(32)))
                    w = builder.zext(builder.load(builder.bitcast(builder.gep(crow, [j0]), v32i8.as_pointer()),
                                                  align=1), v32i16)
                    idx = builder.and_(w, c[0])
                    low, high = builder.call(perm2, [t[0], idx, t[1]]), builder.call(perm2, [t[2], idx, t[3]])
                    top = builder.icmp_unsigned("!=", builder.and_(w, c[1]), _llvm_ir.Constant(v32i16, [0] * 32))
                    v = builder.or_(builder.select(top, high, low), builder.shl(builder.and_(w, c[2]),
                                                                                 _llvm_ir.Constant(v32i16, [8] * 32)))
                    dst = builder.gep(orow, [builder.mul(j0, intp(2))])
                    builder.store(v, builder.bitcast(dst, v32i16.as_pointer()), align=2)
            return context.get_dummy_value()
        return _nb_types.void(codes, r, tabs, bi, out, o), codegen
    return dec
