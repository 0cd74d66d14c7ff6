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
