"""The grouped bf16 expert kernel (experts/bf16_numba.py) against float64 sums of the same bf16 values, and the
bf16 ExpertGroup's kernel path against its library path. Runs only on CPUs with AVX512-BF16 (elsewhere the
kernel is never used, which the last test checks)."""

import numpy as np
import pytest
import torch

from moeray.experts import bf16_numba
from moeray.experts.group import ExpertGroup

needs_kernel = pytest.mark.skipif(not bf16_numba.available(), reason="this CPU lacks avx512bf16")


def bf16(shape, seed, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_mm_equals_the_exact_sums(threads):
    """Groups of 0-9 rows (every remainder of the 4-row block), slots out of order and one slot used twice:
    each output within float32 summation error of the float64 sum of the bf16 products."""
    torch.set_num_threads(threads)
    try:
        counts = [1, 0, 4, 3, 9, 2, 5, 7]
        slots = np.array([2, 0, 1, 3, 2, 4, 0, 1], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        x, w = bf16((starts[-1], 96), 1), bf16((5, 136, 96), 2)
        out = bf16_numba.grouped_mm(x, starts, slots, w)
        assert out.dtype == torch.float32 and out.shape == (starts[-1], 136)
        for g, s in enumerate(slots):
            rows = slice(starts[g], starts[g + 1])
            ref = x[rows].double() @ w[s].double().t()
            assert torch.allclose(out[rows].double(), ref, rtol=1e-5, atol=1e-4), f"group {g}"
    finally:
        torch.set_num_threads(1)


@needs_kernel
def test_grouped_mm_rejects_other_dtypes():
    with pytest.raises(TypeError, match="bfloat16"):
        bf16_numba.grouped_mm(torch.zeros(2, 32), np.array([0, 2]), np.array([0]), bf16((1, 4, 32), 0))


@needs_kernel
@pytest.mark.parametrize("limit", [None, 0.6])
def test_bf16_group_kernel_path_matches_the_library_path(limit, monkeypatch):
    """Decode-sized calls (B = 3 and 16, top-2 of 6) through the kernel against the same group with the kernel
    off (the bmm / per-expert oneDNN paths); both are bf16, so within bf16 rounding of each other."""

    d, i, e = 64, 32, 6
    g = torch.Generator().manual_seed(3)
    w = {k: (torch.randn(2 * i, d, generator=g) * 0.2, torch.randn(d, i, generator=g) * 0.2) for k in range(e)}
    grp = ExpertGroup(d, i, swiglu_limit=limit, dtype=torch.bfloat16)
    grp.load(0, w)
    assert grp._grouped
    for b in (3, 16):
        x = torch.randn(b, d, generator=g).to(torch.bfloat16)
        rows = torch.arange(b).repeat_interleave(2)
        ids = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(b)]).reshape(-1)
        ws = torch.rand(2 * b, generator=g)
        fast = grp.forward(0, x, rows, ids, ws)
        monkeypatch.setattr(grp, "_grouped", False)
        slow = grp.forward(0, x, rows, ids, ws)
        monkeypatch.setattr(grp, "_grouped", True)
        assert fast.dtype == torch.bfloat16 and fast.shape == (b, d)
        assert (fast.float() - slow.float()).abs().max() <= 2e-2 * slow.float().abs().max()


def test_kernel_only_for_bf16_on_cpus_that_have_it(monkeypatch):
    """float32 groups never take it; bf16 groups take it exactly where `available()` and the shapes allow; a
    numba pinned to another CPU (NUMBA_CPU_NAME) turns it off rather than compile an instruction it may lack."""
    import numba

    assert not ExpertGroup(64, 32, dtype=torch.float32)._grouped
    assert ExpertGroup(64, 32, dtype=torch.bfloat16)._grouped == bf16_numba.available()
    assert not ExpertGroup(16, 24, dtype=torch.bfloat16)._grouped  # K = 16: not whole 32-element steps
    bf16_numba.available.cache_clear()
    try:
        monkeypatch.setattr(numba.config, "CPU_NAME", "haswell")
        assert not bf16_numba.available()
    finally:
        monkeypatch.undo()
        bf16_numba.available.cache_clear()
