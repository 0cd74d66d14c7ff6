"""Grouped bf16 GEMMs for the routed experts on CPUs with AVX512-BF16 (numba, vdpbf16ps).

`grouped_mm(x, starts, slots, w)`: for each group g, rows starts[g]:starts[g+1] of x [P, K] times slot
slots[g]'s weight w[s] [N, K] transposed -> out [P, N] float32. One call per GEMM of an MoE layer: every expert
hit, each with only its own rows (no padding to the busiest expert, no Python loop over the experts).

Why a kernel of our own: at decode sizes (a few rows per expert) the expert GEMMs are bound by reading the
weights, and the library paths read them at a fraction of the machine's bandwidth. Measured on a 2-core AMD EPYC
(Zen 5, AVX512-BF16, no AMX), one MoE layer of 16 experts, D = I = 512, bf16, weights out of cache: torch.bmm
(oneDNN) 10-12 GB/s at 2-16 rows per expert, oneDNN with pre-packed weights per expert 13-17 GB/s, this kernel
25-32 GB/s (a plain 2-thread read runs at ~42 GB/s). A float32-FMA numba kernel reached the same bandwidth at
1-4 rows but is compute-bound beyond (50-75 GMAC/s, slower than oneDNN at 16 rows); vdpbf16ps does 32
products per instruction (133 GMAC/s at 16 rows). numba has no vector types, so the dot block is an LLVM
intrinsic (experts/numba_intrinsics.bf16_dot_block): 4 rows of x against 4 rows of W, 16 accumulators in
registers, each reduced once.

The products are the bf16 values' exact products summed in float32 (vdpbf16ps rounds to nearest even and treats
denormal inputs as zero), as oneDNN's bf16 GEMMs sum them; only the summation order differs. Used for bf16 groups
on CPU only, and only where `available()` (the CPU has avx512bf16, and numba compiles for this CPU): LLVM cannot
lower the instruction elsewhere, and float32 deployments never take this path.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - numba is a dependency
    numba, prange = None, range

CHUNK_ROWS = 64  # rows of W per parallel work item (a multiple of the dot block's 4)
BLOCK = 4  # rows of x and of W per dot block


def host_has(*features: str) -> bool:
    """Whether numba compiles for this CPU (no NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override) and the CPU has every
    one of `features` as LLVM reads them (the CPU and the OS)."""
    if numba is None or numba.config.CPU_NAME not in (None, "host") or numba.config.CPU_FEATURES:
        return False
    from llvmlite import binding

    host = binding.get_host_cpu_features().flatten().split(",")
    return all(f"+{f}" in host for f in features)


@functools.cache
def available() -> bool:
    """Whether this process can run the kernel: `host_has("avx512bf16")`, unless MOERAY_BF16_KERNEL=0."""
    return os.environ.get("MOERAY_BF16_KERNEL", "1") != "0" and host_has("avx512bf16")


def shapes_ok(n: int, k: int) -> bool:
    """Whether W [n, k] suits the kernel: whole dot blocks along both."""
    from moeray.experts.numba_intrinsics import BF16_DOT_K

    return n % BLOCK == 0 and k % BF16_DOT_K == 0 and n > 0 and k > 0


def _grouped_kernel(x, starts, slots, w, out):  # x [P, K] u16, starts [G+1], slots [G], w [S, N, K] u16 -> out f32
    n_rows = w.shape[1]
    chunks = (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    for item in prange(slots.shape[0] * chunks):
        g = item // chunks
        c = item - g * chunks
        p0, p1 = starts[g], starts[g + 1]
        if p1 == p0:
            continue
        xg, og, wg = x[p0:p1], out[p0:p1], w[slots[g]]
        for n in range(c * CHUNK_ROWS, min(n_rows, c * CHUNK_ROWS + CHUNK_ROWS), BLOCK):
            dot_rows(xg, wg, n, og)


def _dot_rows_py(x, w, n, out):  # every row of x [T, K] against rows n..n+3 of w -> out[:, n..n+3] (float32)
    rows = x.shape[0]
    t = 0
    while t + BLOCK <= rows:
        _dot4(x, t, w, n, out)
        t += BLOCK
    rest = rows - t
    if rest == 1:
        _dot1(x, t, w, n, out)
    elif rest == 2:
        _dot2(x, t, w, n, out)
    elif rest == 3:
        _dot3(x, t, w, n, out)


_KERNELS: dict[bool, object] = {}
if numba is not None:  # the intrinsics are only declared here; nothing is compiled before the first call
    from moeray.experts.numba_intrinsics import bf16_dot_block, source_tag

    _dot1, _dot2, _dot3, _dot4 = (bf16_dot_block(r, BLOCK) for r in (1, 2, 3, 4))
    # inlined into the kernels that use it (here and models/paged_decode.py)
    dot_rows = numba.njit(fastmath=True, cache=True, inline="always")(_dot_rows_py)


def _kernel(parallel: bool):
    """The kernel, compiled at first use (~2 s; numba's on-disk cache is keyed by the CPU's name and features
    too, so a cache file never serves another CPU)."""
    if parallel not in _KERNELS:
        fn = _grouped_kernel  # a distinct name per variant: numba's cache is keyed by name and signature
        fn.__qualname__ = fn.__name__ = f"bf16_grouped_{'parallel' if parallel else 'serial'}_{source_tag()}"
        _KERNELS[parallel] = numba.njit(parallel=parallel, fastmath=True, cache=True)(fn)
    return _KERNELS[parallel]


def threads() -> int:
    """The kernel's threads: torch's count, capped by numba's pool. (numba's `omp` layer runs on the system's
    libgomp, torch on the one bundled with it: two pools of workers on the same cores. Starting numba's with
    OMP_WAIT_POLICY=PASSIVE, so its workers sleep as soon as a kernel ends, measured the same as the default on
    the 2-core Zen 5, quiet or beside a 1-thread CPU hog: 3 interleaved runs each, within the noise.)"""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if n > 1:
        numba.set_num_threads(n)
    return n


def grouped_mm(x: torch.Tensor, starts: np.ndarray, slots: np.ndarray, w: torch.Tensor) -> torch.Tensor:
    """x [P, K] bf16 (rows grouped), starts [G + 1] int64 (group g: rows starts[g]:starts[g + 1]), slots [G] int64
    (group g's slot in w), w [S, N, K] bf16 -> [P, N] float32 with out[p] = x[p] @ w[slots[g]].t() for p in g.
    Needs `available()` and `shapes_ok(N, K)`; x and w on CPU, contiguous."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise TypeError(f"grouped_mm takes bfloat16 x and w, not {x.dtype} and {w.dtype}")
    out = np.empty((x.shape[0], w.shape[1]), dtype=np.float32)
    _kernel(threads() > 1)(x.contiguous().view(torch.uint16).numpy(), starts, slots,
                           w.view(torch.uint16).numpy(), out)
    return torch.from_numpy(out)
