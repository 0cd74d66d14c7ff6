"""models/paged_decode's in-place decode attention against float64 attention over the same bf16 pages, and the
batched attention path choosing it. Runs only on CPUs with AVX512-BF16 (elsewhere it is never used)."""

import pytest
import torch

from moeray.models import paged_decode

needs_kernel = pytest.mark.skipif(not paged_decode.available(), reason="this CPU lacks avx512bf16")


def reference(q, q_rows, k, v, tables, pos, rpp, scale, window):
    """Per sequence in float64: its live keys by page table, GQA by repeat_interleave, softmax attention."""
    outs = []
    g = q.shape[1] // k.shape[1]
    for i in range(q_rows.numel()):
        n = int(pos[i]) + 1
        lo = max(0, n - window) if window else 0
        rows = torch.tensor([int(tables[i, j // rpp]) * rpp + j % rpp for j in range(lo, n)])
        kk = k[rows].double().repeat_interleave(g, 1)
        vv = v[rows].double().repeat_interleave(g, 1)
        s = torch.einsum("hd,nhd->hn", q[q_rows[i]].double(), kk) * scale
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vv).reshape(-1))
    return torch.stack(outs)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,rpp,window", [
    (8, 2, 64, 16, 0),  # G = 4: one dot block of queries
    (6, 2, 32, 8, 0),  # G = 3
    (8, 8, 64, 16, 0),  # G = 1 (MHA)
    (10, 2, 64, 4, 0),  # G = 5: a block and a remainder; one-block pages
    (8, 2, 64, 16, 20),  # sliding window: keys of the last 20 positions only
])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_float64(heads, kv_heads, head_dim, rpp, window, threads):
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(heads * 100 + rpp)
        pages = 40
        k = torch.randn(pages * rpp, kv_heads, head_dim, generator=g).to(torch.bfloat16)
        v = torch.randn(pages * rpp, kv_heads, head_dim, generator=g).to(torch.bfloat16)
        pos = torch.randint(0, 100, (5,), generator=g)
        pos[0] = 0  # a first decode step: one key
        pos[1] = rpp - 1  # a page exactly full
        num = (int(pos.max()) + rpp) // rpp
        tables = torch.stack([torch.randperm(pages, generator=g)[:num] for _ in range(5)])
        q = torch.randn(7, heads, head_dim, generator=g).to(torch.bfloat16)
        q_rows = torch.randperm(7, generator=g)[:5]
        scale = head_dim ** -0.5
        out = paged_decode.decode_attention(q, q_rows, k, v, tables, pos, rpp, scale, window)
        ref = reference(q, q_rows, k, v, tables, pos, rpp, scale, window)
        assert out.dtype == torch.bfloat16 and out.shape == (5, heads * head_dim)
        # bf16 output: within one rounding (2^-8 relative) of the exact attention
        assert ((out.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-3).all()
    finally:
        torch.set_num_threads(1)


def test_shapes_it_takes():
    assert paged_decode.shapes_ok(64, 16) and paged_decode.shapes_ok(128, 4)
    assert not paged_decode.shapes_ok(24, 16)  # head dim not whole 32-element steps
    assert not paged_decode.shapes_ok(64, 6)  # pages not whole 4-row blocks
