"""numba intrinsics the packed-expert kernels (experts/quant_numba.py) need and numba lacks: scalar int32 <->
float32 bit casts (an LLVM bitcast, vectorized like any other op) and a cache prefetch of a 2-D array's element
(LLVM's generic llvm.prefetch: prefetcht0 on x86, a hint that never faults). Imported only where numba is."""

from __future__ import annotations

from llvmlite import ir as _llvm_ir
from numba import types as _nb_types
from numba.extending import intrinsic as _intrinsic

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
            from numba.core import cgutils
            xa, wa, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 4))
            intp = context.get_value_type(_nb_types.intp)
            t0v = context.cast(builder, args[1], signature.args[1], _nb_types.intp)
            n0v = context.cast(builder, args[3], signature.args[3], _nb_types.intp)
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
                xv = [builder.load(builder.bitcast(builder.gep(r, [off]), v32bf.as_pointer()), align=2)
                      for r in xrows]
                wv = [builder.load(builder.bitcast(builder.gep(r, [off]), v32bf.as_pointer()), align=2)
                      for r in wrows]
                for i in range(rx):
                    for j in range(rw):
                        builder.store(builder.call(dp, [builder.load(accs[i][j]), xv[i], wv[j]]), accs[i][j])
            for i in range(rx):
                orow = builder.bitcast(builder.gep(ob, [builder.mul(builder.add(t0v, intp(i)), os0)]),
                                       f32.as_pointer())
                for j in range(rw):
                    total = builder.call(red, [_llvm_ir.Constant(f32, 0.0), builder.load(accs[i][j])],
                                         fastmath=("reassoc",))
                    builder.store(total, builder.gep(orow, [builder.add(n0v, intp(j))]))
            return context.get_dummy_value()
        return _nb_types.void(x, t0, w, n0, out), codegen
    return dot
