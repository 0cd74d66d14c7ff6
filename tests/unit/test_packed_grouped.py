"""The grouped kernels over packed MXFP4 / FP8 experts (quant_kernels.grouped_mm) and PackedExpertGroup's grouped
path: the bf16 kernel's decode against decode_rows' bf16 tiles bit for bit, its sums against float64 sums of the
same bf16 values, the float32 kernel exact against float64; the groups against their per-expert paths, the
dequantized experts and a float64 reference; the stacked slots through load / unload / packed(). The bf16
kernel tests run only on CPUs with AVX512-BF16 and AVX512-BW, the float32 MXFP4 ones with AVX512-BW (elsewhere
the kernels are never used, which the tests of the paths check)."""

import numba
import numpy as np
import pytest
import torch
from support.quant_experts import packed_and_dense_experts

from moeray.experts import quant_grouped, quant_kernels
from moeray.experts.group import ExpertGroup
from moeray.experts.quant_formats import dequant_fp8_blocks, dequant_mxfp4, quantize_fp8_blocks, quantize_mxfp4
from moeray.experts.quantized import GROUPED_MAX_ROWS, PackedExpert, PackedExpertGroup, PackedWeight

needs_kernel = pytest.mark.skipif(not quant_kernels.grouped_available("mxfp4", torch.bfloat16),
                                  reason="this CPU lacks avx512bf16 / avx512bw (or numba)")

# (fmt, block, scale_fmt): fp8 blocks on the lookup path (bo % 4 == 0, bi % 32 == 0) and on the row-decode one
# (bi = 48, bo = 6), all with partial edge blocks on [N, K] = [72, 160]; float32 and e8m0 scales
CASES = [("mxfp4", None, "float"),
         ("fp8", (32, 64), "float"), ("fp8", (32, 64), "ue8m0"),
         ("fp8", (24, 48), "float"), ("fp8", (6, 32), "ue8m0")]
N, K = 72, 160


def _stacked(fmt, block, scale_fmt, slots=3, seed=0):
    """(kernel_args of the stacked weights [S, N, K], the dequantized float32 weights [S, N, K])."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(N, K, generator=gen) * 0.05 for _ in range(slots)]
    if fmt == "mxfp4":
        packed = [quantize_mxfp4(w) for w in ws]
        ref = [dequant_mxfp4(*p) for p in packed]
    else:
        packed = [quantize_fp8_blocks(w, block, scale_fmt=scale_fmt) for w in ws]
        ref = [dequant_fp8_blocks(*p, block) for p in packed]
    codes, scales = torch.stack([p[0] for p in packed]), torch.stack([p[1] for p in packed])
    return quant_kernels.kernel_args(fmt, codes, scales, block), torch.stack(ref)


def _groups(counts, slots):
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return starts, np.array(slots, dtype=np.int64)


def _grouped_into_wide_output(fmt, args, dtype, threads):
    """The kernel on groups of 1-9 rows (every remainder of the 4-row dot block), slots out of order and one used
    twice, into columns 8: of a wider output -> (x, starts, slots, out[:, 8:]); the columns before untouched."""
    starts, slots = _groups([1, 4, 3, 9, 2, 5, 7, 6], [2, 0, 1, 2, 0, 1, 0, 2])
    x = torch.randn(int(starts[-1]), K, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = np.full((x.shape[0], N + 8), -7.0, dtype=np.float32)
    torch.set_num_threads(threads)
    try:
        quant_kernels.grouped_mm(fmt, x, starts, slots, args, out, 8)
    finally:
        torch.set_num_threads(1)
    assert (out[:, :8] == -7.0).all()  # the columns before col0 untouched
    return x, starts, slots, torch.from_numpy(out[:, 8:]).double()


@needs_kernel
@pytest.mark.parametrize("fmt, block, scale_fmt", CASES)
@pytest.mark.parametrize("threads", [1, 2])  # the serial kernel, and the prange one
def test_grouped_kernel_equals_the_exact_sums(fmt, block, scale_fmt, threads):
    """Within float32 summation error of the float64 sums of the bf16 products (x and the dequantized weights
    rounded to bf16, as the tile path's GEMM takes them)."""
    args, ref = _stacked(fmt, block, scale_fmt)
    x, starts, slots, got = _grouped_into_wide_output(fmt, args, torch.bfloat16, threads)
    for g, s in enumerate(slots):
        rows = slice(starts[g], starts[g + 1])
        want = x[rows].double() @ ref[s].to(torch.bfloat16).double().t()
        assert torch.allclose(got[rows], want, rtol=1e-5, atol=1e-5), f"group {g}"


@pytest.mark.skipif(not quant_kernels.grouped_available("mxfp4", torch.float32), reason="this CPU lacks avx512bw")
@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_float32_mxfp4_kernel_is_exact(threads):
    """The float32 MXFP4 kernel on the same groups: within float32 summation error (1e-5) of x @ dequant(W).t()
    in float64 -- no rounding of x or W."""
    args, ref = _stacked("mxfp4", None, "float")
    x, starts, slots, got = _grouped_into_wide_output("mxfp4", args, torch.float32, threads)
    for g, s in enumerate(slots):
        rows = slice(starts[g], starts[g + 1])
        want = x[rows].double() @ ref[s].double().t()
        assert (got[rows] - want).abs().max().item() <= 1e-5, f"group {g}"


def _decoded_by_kernel(fmt, codes, scale, block):
    """W [n, k] as the grouped kernel computes with it: identity rows of x pick out each column (one product,
    exact; the weights must be finite: 0 x inf is NaN)."""
    n = codes.shape[0]
    k = codes.shape[1] * (2 if fmt == "mxfp4" else 1)
    args = quant_kernels.kernel_args(fmt, codes[None], scale[None], block)
    out = np.empty((k, n), dtype=np.float32)
    starts, slots = _groups([k], [0])
    quant_kernels.grouped_mm(fmt, torch.eye(k, dtype=torch.bfloat16), starts, slots, args, out)
    return torch.from_numpy(out).t()


@numba.njit
def _decode_rows_as_the_kernel(tables, decode_row, codes, scales, a, b, out):  # the kernel's decode loop, no dots
    tabs = np.empty((scales.shape[1], 128), np.uint16)
    for n in range(0, codes.shape[0], quant_grouped.DOT_ROWS):
        tables(scales, n, 0, a, tabs)
        for j in range(quant_grouped.DOT_ROWS):
            decode_row(codes, scales, n + j, a, b, tabs, out, n + j)


def _decoded_bits(fmt, codes, scale, block):
    """W [n, k] as bf16, decoded by the grouped kernel's own decoders for this format and block (NaN included)."""
    args = quant_kernels.kernel_args(fmt, codes, scale, block)
    lut = fmt == "mxfp4" or (block[0] % quant_grouped.DOT_ROWS == 0 and block[1] % 32 == 0)
    fns = {"mxfp4": (quant_grouped._no_tables, quant_grouped._mxfp4_row_vec)}.get(fmt) or (
        (quant_grouped._fp8_band_tables, quant_grouped._fp8_row_lut) if lut
        else (quant_grouped._no_tables, quant_grouped._fp8_row_arith_grouped))
    out = np.empty((codes.shape[0], codes.shape[1] * (2 if fmt == "mxfp4" else 1)), dtype=np.uint16)
    _decode_rows_as_the_kernel(*fns, *args, out)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)


def _as_the_dot_reads(tile: torch.Tensor) -> torch.Tensor:
    """bf16 tile -> float32 as vdpbf16ps reads it: denormal inputs as zero."""
    t = tile.float()
    return torch.where(t.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(t), t)


SCALES = {"float": [2.0**-130, 0.3137, 1.7e-3, 300.0, 2.0**40, 1.0, 5e-5, 2.0**-3],
          "ue8m0": [1, 100, 127, 130, 200, 254, 2, 90]}


@needs_kernel
@pytest.mark.parametrize("block", [(4, 128), (4, 96), (8, 80), (6, 64)])  # lookup (96: a partial edge block);
@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])  # row decode (80 % 32, 6 % 4 != 0)
def test_fp8_decode_equals_the_bf16_tile_on_every_code(block, scale_fmt):
    """Every e4m3 code (subnormals, +-0, NaN) under block scales across float32's range -- tiny (bf16 subnormal
    products), ordinary ones needing rounding, >= 2^8, overflowing -- float32 and e8m0: the grouped kernel's
    decoders equal decode_rows' bf16 tile bit for bit; through the whole kernel (finite codes and scales),
    equal as the dot reads them (denormals as zero)."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.stack([torch.randperm(256, generator=gen) for _ in range(24)]).to(torch.uint8)
    codes = codes.view(torch.float8_e4m3fn)  # [24, 256]: every code in every row
    nbo, nbi = -(-24 // block[0]), -(-256 // block[1])
    vals = (SCALES[scale_fmt] * 4)[:nbo * nbi]
    scale = torch.tensor(vals).reshape(nbo, nbi)
    scale = scale.to(torch.uint8).view(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else scale.float()
    tile = torch.empty(24, 256, dtype=torch.bfloat16)
    quant_kernels.decode_rows("fp8", codes, scale, block, 0, 24, tile)
    got = _decoded_bits("fp8", codes, scale, block)
    assert torch.equal(got.view(torch.int16), tile.view(torch.int16))
    finite = codes.view(torch.uint8) & 0x7F != 0x7F
    small = torch.tensor([min(v, 2.0**40) if scale_fmt == "float" else min(v, 200) for v in vals])
    small = small.reshape(nbo, nbi)
    small = small.to(torch.uint8).view(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else small.float()
    codes = torch.where(finite, codes.view(torch.uint8), 0).view(torch.float8_e4m3fn)
    quant_kernels.decode_rows("fp8", codes, small, block, 0, 24, tile)
    assert torch.equal(_decoded_by_kernel("fp8", codes, small, block), _as_the_dot_reads(tile))


@needs_kernel
def test_mxfp4_decode_equals_the_bf16_tile_on_every_byte_and_scale():
    """Every byte under every e8m0 scale byte the kernel takes (2..252, row r: byte r + 2): its decoder equals
    decode_rows' bf16 tile bit for bit, and so does the whole kernel as the dot reads it."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(252, 1).view(torch.int8)  # [252, 256]: 512 codes a row
    scale = torch.cat([torch.arange(2, 253), torch.tensor([127])]).to(torch.uint8)[:, None].repeat(1, 16)
    scale[5, 3], scale[9, 0] = 2, 252  # the extremes next to others in one row
    scale = scale.view(torch.float8_e8m0fnu)
    tile = torch.empty(252, 512, dtype=torch.bfloat16)
    quant_kernels.decode_rows("mxfp4", codes, scale, None, 0, 252, tile)
    assert torch.equal(_decoded_bits("mxfp4", codes, scale, None).view(torch.int16), tile.view(torch.int16))
    assert torch.equal(_decoded_by_kernel("mxfp4", codes, scale, None), _as_the_dot_reads(tile))


# ---- PackedExpertGroup's grouped path ----------------------------------------------------------------------
D, I, E = 128, 96, 6


def _group_pair(fmt, block, scale_fmt="float", seed=5):
    packed, dense = packed_and_dense_experts(fmt, D, I, E, seed, block=block or (32, 32))
    if fmt == "fp8" and scale_fmt == "ue8m0":  # re-pack the same dequantized weights with e8m0 scales
        packed = {e: PackedExpert(*(PackedWeight(*quantize_fp8_blocks(w, block, scale_fmt="ue8m0"))
                                    for w in (gu[:I], gu[I:], dn))) for e, (gu, dn) in dense.items()}
        dense = {e: (torch.cat([dequant_fp8_blocks(ex.w1.codes, ex.w1.scale, block),
                                dequant_fp8_blocks(ex.w3.codes, ex.w3.scale, block)]),
                     dequant_fp8_blocks(ex.w2.codes, ex.w2.scale, block)) for e, ex in packed.items()}
    pg = PackedExpertGroup(D, I, swiglu_limit=0.7, dtype=torch.bfloat16, fmt=fmt, block=block)
    pg.load(0, packed)
    return pg, packed, dense


def _routing(counts, seed):
    """Pairs giving expert e counts[e] rows (one row per pair, rows shuffled) -> x, pair_rows, ids, weights."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    x = torch.randn(ids.numel(), D, generator=gen)
    return x, torch.arange(ids.numel()), ids, torch.rand(ids.numel(), generator=gen)


def _reference(dense, x, rows, ids, w, limit):
    """float64 SwiGLU of the dequantized weights, with the kernel path's bf16 roundings (x, W, the activation)."""
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for p in range(ids.numel()):
        gu, dn = dense[int(ids[p])]
        h = bf(x[rows[p]]) @ bf(gu).t()
        gate, up = h[:I].clamp(max=limit), h[I:].clamp(min=-limit, max=limit)
        out[rows[p]] += w[p].double() * (bf(torch.nn.functional.silu(gate) * up) @ bf(dn).t())
    return out


class _Spy:
    """Counts the grouped kernel's calls (wrapping the real one)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = quant_kernels.grouped_mm

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(quant_kernels, "grouped_mm", spy)


@needs_kernel
@pytest.mark.parametrize("fmt, block, scale_fmt", [("mxfp4", None, "float"), ("fp8", (32, 64), "float"),
                                                    ("fp8", (32, 64), "ue8m0"), ("fp8", (24, 40), "float")])
@pytest.mark.parametrize("counts", [[1, 2, 3, 4, 5, 0], [6, 7, 9, 0, 1, 2], [GROUPED_MAX_ROWS, 3, 0, 0, 1, 8]])
def test_group_grouped_path_against_its_other_paths_and_float64(fmt, block, scale_fmt, counts, monkeypatch):
    """Experts with 1..9 and GROUPED_MAX_ROWS rows (and none): one call per GEMM (three), output within bf16's
    output rounding of the float64 reference with the same roundings, and within bf16 precision of the same
    group's per-expert paths (gemv / tile) and of ExpertGroup in bf16 on the dequantized weights."""
    pg, _, dense = _group_pair(fmt, block, scale_fmt)
    x, rows, ids, w = _routing(counts, seed=sum(counts))
    spy = _Spy(monkeypatch)
    got = pg.forward(0, x, rows, ids, w)
    assert spy.calls == 3 and got.dtype == x.dtype  # (computed in bf16, returned in x's dtype)
    want = _reference(dense, x, rows, ids, w, 0.7)
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 1e-2 * scale
    monkeypatch.setattr(pg, "_grouped", False)
    other = pg.forward(0, x, rows, ids, w)
    assert spy.calls == 3  # the per-expert paths this time
    peer = ExpertGroup(D, I, swiglu_limit=0.7, dtype=torch.bfloat16)
    peer.load(0, dense)
    for ref in (other, peer.forward(0, x, rows, ids, w)):
        assert (got.double() - ref.double()).abs().max().item() <= 2e-2 * scale


@pytest.mark.skipif(not quant_kernels.grouped_available("mxfp4", torch.float32), reason="this CPU lacks avx512bw")
@pytest.mark.parametrize("counts", [[1, 2, 3, 4, 5, 0], [quant_kernels.FUSED_MAX_ROWS_F32, 7, 9, 0, 1, 2]])
def test_float32_mxfp4_group_grouped_path_is_exact(counts, monkeypatch):
    """float32 MXFP4 groups take the grouped kernel too (up to FUSED_MAX_ROWS_F32 rows per expert): three calls,
    exact against the fp32 ExpertGroup on the dequantized weights (1e-5, as every fp32 packed path); float32 FP8
    groups keep the per-expert GEMV (also exact)."""
    packed, dense = packed_and_dense_experts("mxfp4", D, I, E, 5)
    pg = PackedExpertGroup(D, I, swiglu_limit=0.7, fmt="mxfp4")
    ref = ExpertGroup(D, I, swiglu_limit=0.7)
    pg.load(0, packed)
    ref.load(0, dense)
    x, rows, ids, w = _routing(counts, seed=sum(counts))
    spy = _Spy(monkeypatch)
    diff = (pg.forward(0, x, rows, ids, w) - ref.forward(0, x, rows, ids, w)).abs().max().item()
    assert spy.calls == 3 and diff <= 1e-5, diff
    packed8, dense8 = packed_and_dense_experts("fp8", D, I, E, 5, block=(32, 64))
    pg8 = PackedExpertGroup(D, I, swiglu_limit=0.7, fmt="fp8", block=(32, 64))
    ref8 = ExpertGroup(D, I, swiglu_limit=0.7)
    pg8.load(0, packed8)
    ref8.load(0, dense8)
    diff = (pg8.forward(0, x, rows, ids, w) - ref8.forward(0, x, rows, ids, w)).abs().max().item()
    assert spy.calls == 3 and diff <= 1e-5, diff


@needs_kernel
def test_group_takes_the_grouped_path_only_where_it_should(monkeypatch):
    """More than GROUPED_MAX_ROWS rows on one expert (float32: FUSED_MAX_ROWS_F32), a few pairs (the pair loop),
    an MXFP4 slot with an out-of-range scale byte hit, fp8 where denormals are flushed: the other paths."""
    spy = _Spy(monkeypatch)
    pg, packed, dense = _group_pair("mxfp4", None)
    x, rows, ids, w = _routing([GROUPED_MAX_ROWS + 1, 2, 0, 0, 0, 0], seed=1)
    pg.forward(0, x, rows, ids, w)
    pg.forward(0, x[:1], rows[:2] * 0, torch.tensor([0, 1]), w[:2])
    f32 = PackedExpertGroup(D, I, fmt="mxfp4")  # float32: up to FUSED_MAX_ROWS_F32 rows per expert
    f32.load(0, packed)
    f32.forward(0, *_routing([quant_kernels.FUSED_MAX_ROWS_F32 + 1, 3, 3, 0, 0, 0], seed=2))
    assert spy.calls == 0
    odd = packed[1].w3.scale.view(torch.uint8).clone()
    odd[0, 0] = 1  # products below bf16's normal range: the kernel would not decode them exactly
    pg.load(0, {1: PackedExpert(packed[1].w1, PackedWeight(packed[1].w3.codes, odd.view(torch.float8_e8m0fnu)),
                                packed[1].w2)})
    pg.forward(0, *_routing([3, 3, 3, 0, 0, 0], seed=3))
    assert spy.calls == 0
    pg.forward(0, *_routing([3, 0, 3, 0, 0, 0], seed=3))  # expert 1 not hit: grouped
    assert spy.calls == 3
    fp8, _, _ = _group_pair("fp8", (32, 64))
    monkeypatch.setattr(quant_kernels, "denormals_kept", lambda: False)
    fp8.forward(0, *_routing([3, 3, 3, 0, 0, 0], seed=4))
    assert spy.calls == 3


def test_no_grouped_path_without_the_kernel(monkeypatch):
    """A CPU without avx512bf16 / avx512bw (or an AVX2-only CI machine): the group never takes the kernel."""
    monkeypatch.setattr(quant_kernels, "grouped_available", lambda fmt, dtype: False)
    pg, _, _ = _group_pair("mxfp4", None)
    assert not pg._grouped
    spy = _Spy(monkeypatch)
    pg.forward(0, *_routing([3, 3, 3, 0, 0, 0], seed=1))
    assert spy.calls == 0


# ---- the stacked slots -----------------------------------------------------------------------------------
def test_stacked_slots_hold_the_checkpoint_bytes_and_survive_unload_and_reload():
    """The slots hold views of one stack per weight (bytes held == the packed bytes loaded), packed() gives
    standalone copies equal to what was loaded, and unload / replace restack without changing any result."""
    pg, packed, dense = _group_pair("fp8", (32, 64))
    assert pg.nbytes() == sum(ex.nbytes for ex in packed.values())
    held = [pg._layers[0][e].w1.codes for e in range(E)]
    assert len({t.untyped_storage().data_ptr() for t in held}) == 1  # one stack
    moved = pg.packed(0, 2)
    assert moved.w1.codes.untyped_storage().nbytes() == moved.w1.codes.nbytes  # only its own bytes travel
    for a, b in zip((moved.w1, moved.w3, moved.w2), (packed[2].w1, packed[2].w3, packed[2].w2), strict=True):
        assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)) and torch.equal(a.scale, b.scale)
    x, rows, ids, w = _routing([2, 0, 3, 0, 1, 4], seed=9)
    before = pg.forward(0, x, rows, ids, w)
    pg.unload(0, [1, 3])
    assert pg.loaded() == {0: [0, 2, 4, 5]} and pg.nbytes() == sum(packed[e].nbytes for e in (0, 2, 4, 5))
    assert torch.equal(pg.forward(0, x, rows, ids, w), before)
    pg.load(0, {4: packed[5], 1: packed[1]})  # replace one, add one back
    swapped = ids.clone()
    swapped[ids == 4] = 5
    assert torch.equal(pg.forward(0, x, rows, ids, w), pg.forward(0, x, rows, swapped, w))  # 4 holds 5's now
    pg.load(0, {4: packed[4]})
    assert torch.equal(pg.forward(0, x, rows, ids, w), before)
    pg.unload(0, [0, 1, 2, 4, 5])
    assert pg.loaded() == {} and pg.nbytes() == 0


def test_load_refuses_scales_that_cannot_be_stacked():
    """A scale tensor of the wrong shape, or slots of one layer packed with different scale dtypes: ValueError
    naming the weight, before anything changes."""
    pg, packed, _ = _group_pair("fp8", (32, 64))
    bad = PackedExpert(packed[0].w1, PackedWeight(packed[0].w3.codes, packed[0].w3.scale[:, :1]), packed[0].w2)
    with pytest.raises(ValueError, match="expert 7 w3: fp8 scales of shape"):
        pg.load(0, {7: bad})
    e8m0 = PackedWeight(*quantize_fp8_blocks(torch.randn(I, D) * 0.1, (32, 64), scale_fmt="ue8m0"))
    with pytest.raises(ValueError, match="w1: the experts' .* dtypes differ"):
        pg.load(0, {7: PackedExpert(e8m0, packed[0].w3, packed[0].w2)})
    assert pg.loaded() == {0: list(range(E))} and 7 not in pg.slots(0)
