"""The packed-expert kernels (experts/quant_kernels.py) against the reference dequantize-then-matmul, and the
choice of path (fused GEMV for few rows, decoded tile + library GEMM for more) in PackedExpertGroup."""

import pytest
import torch
from support.quant_experts import packed_and_dense_experts

from moeray.experts import quant_kernels, quant_tiles, quantized
from moeray.experts.group import ExpertGroup
from moeray.experts.quant_formats import (
    dequant_fp8_blocks,
    dequant_mxfp4,
    quantize_fp8_blocks,
    quantize_mxfp4,
)
from moeray.experts.quantized import PackedExpertGroup

pytestmark = pytest.mark.skipif(not quant_kernels.available(), reason="numba is not installed")

N, K = 72, 96  # rows 72 with 32-row blocks and cols 96 with 40-col blocks: partial fp8 edge blocks both ways


def _weight(fmt: str, scale_fmt: str = "float", seed: int = 0):
    """(codes, scale, block, the dequantized [N, K] float32 reference)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    if fmt == "mxfp4":
        codes, scale = quantize_mxfp4(w)
        return codes, scale, None, dequant_mxfp4(codes, scale)
    codes, scale = quantize_fp8_blocks(w, (32, 40), scale_fmt=scale_fmt)
    return codes, scale, (32, 40), dequant_fp8_blocks(codes, scale, (32, 40))


FORMATS = [("mxfp4", "float"), ("fp8", "float"), ("fp8", "ue8m0")]


@pytest.mark.parametrize("fmt, scale_fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 9, quant_kernels.FUSED_MAX_ROWS_F32])  # 4 rows per pass + rest
@pytest.mark.parametrize("threads", [1, 2])  # the serial kernel, and the prange one
def test_gemv_matches_dequantize_then_matmul(fmt, scale_fmt, rows, threads):
    codes, scale, block, ref = _weight(fmt, scale_fmt)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = quant_kernels.gemv_packed(x, fmt, codes, scale, block)
    finally:
        torch.set_num_threads(prev)
    assert got.dtype == torch.float32 and got.shape == (rows, N)
    assert (got - x @ ref.t()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fmt, scale_fmt", FORMATS)
@pytest.mark.parametrize("r0, r1", [(0, N), (32, 64), (5, 71)])  # whole, block-aligned, and mid-block rows
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_rows_exact_in_float32_and_bfloat16(fmt, scale_fmt, r0, r1, threads):
    codes, scale, block, ref = _weight(fmt, scale_fmt)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        f32 = torch.empty(r1 - r0, K)
        quant_kernels.decode_rows(fmt, codes, scale, block, r0, r1, f32)
        bf16 = torch.empty(r1 - r0, K, dtype=torch.bfloat16)
        quant_kernels.decode_rows(fmt, codes, scale, block, r0, r1, bf16)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(f32, ref[r0:r1])
    assert torch.equal(bf16, ref[r0:r1].to(torch.bfloat16))  # rounded to nearest even, as torch rounds


def test_bfloat16_decode_rounds_like_torch_on_every_e4m3_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    finite = ~codes.float().isnan()
    for s in (1.0, 0.3137, 1.7e-3, 2.0**-20):  # scales whose products need rounding to 8 bits
        scale = torch.tensor([[s]])
        ref = dequant_fp8_blocks(codes, scale, (2, 128))
        out = torch.empty(2, 128, dtype=torch.bfloat16)
        quant_kernels.decode_rows("fp8", codes, scale, (2, 128), 0, 2, out)
        assert torch.equal(out[finite], ref[finite].to(torch.bfloat16)), s
        assert out[~finite].isnan().all()


def test_decode_rows_refuses_other_tile_dtypes():
    codes, scale, block, _ = _weight("mxfp4")
    with pytest.raises(TypeError, match="float16"):
        quant_kernels.decode_rows("mxfp4", codes, scale, block, 0, 4, torch.empty(4, K, dtype=torch.float16))


# ---- path selection --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16_fast, dtype, limit", [
    (True, torch.bfloat16, quant_kernels.FUSED_MAX_ROWS),  # against bf16 tiles (oneDNN)
    (False, torch.bfloat16, quant_kernels.FUSED_MAX_ROWS_F32),  # bf16 slow here: against fp32 tiles (MKL)
    (True, torch.float32, quant_kernels.FUSED_MAX_ROWS_F32),
])
def test_path_by_rows_per_expert(bf16_fast, dtype, limit, monkeypatch):
    monkeypatch.setattr(quant_tiles, "_cpu_bf16_fast", lambda: bf16_fast)
    g = PackedExpertGroup(K, N, dtype=dtype, fmt="mxfp4")
    assert [g.path(r) for r in (1, limit, limit + 1, 512)] == ["gemv", "gemv", "tile", "tile"]
    assert PackedExpertGroup(K, N, fmt="int8").path(1) == "int8"


def test_path_without_numba_is_the_tile(monkeypatch):
    monkeypatch.setattr(quant_kernels, "available", lambda: False)
    assert PackedExpertGroup(K, N, fmt="fp8", block=(32, 32)).path(1) == "tile"


@pytest.mark.parametrize("bf16_fast, dtype, tile", [
    (True, torch.bfloat16, torch.bfloat16),  # AMX / AVX512-BF16: decode into bf16, oneDNN's bf16 GEMM
    (False, torch.bfloat16, torch.float32),  # e.g. an AVX2-only CPU: bf16 matmul is slow there, decode to fp32
    (True, torch.float32, torch.float32),
    (True, torch.float16, torch.float32),
])
def test_tile_dtype_follows_the_cpu(bf16_fast, dtype, tile, monkeypatch):
    monkeypatch.setattr(quant_tiles, "_cpu_bf16_fast", lambda: bf16_fast)
    assert PackedExpertGroup(K, N, dtype=dtype, fmt="mxfp4").tile_dtype == tile


# ---- whole groups on each path, small and large token counts ---------------------------------------------
D, I, E = 96, 64, 4


def _experts(fmt: str, seed: int = 5):
    return packed_and_dense_experts(fmt, D, I, E, seed, block=(32, 40))


def _routing(tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(tokens)]).reshape(-1)
    return x, torch.arange(tokens).repeat_interleave(2), ids, torch.rand(2 * tokens, generator=gen)


class _PathSpy:
    """Counts which path each GEMM of a group took (wrapping the real `path` and the grouped kernel, not
    replacing them): "gemv" / "tile" / "int8" per expert, "grouped" per call of the grouped kernel."""

    def __init__(self, group: PackedExpertGroup, monkeypatch) -> None:
        self.taken: list[str] = []
        real, grouped = group.path, quant_kernels.grouped_mm
        monkeypatch.setattr(group, "path", lambda rows: self.taken.append(real(rows)) or self.taken[-1])
        monkeypatch.setattr(quant_kernels, "grouped_mm",
                            lambda *a, **k: self.taken.append("grouped") or grouped(*a, **k))


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
@pytest.mark.parametrize("tokens, path", [(1, "gemv"), (6, "grouped"), (64, "tile")])  # rows per expert: 1, ~3,
@pytest.mark.parametrize("tile_elems", [1 << 20, 40 * D])  # ~32; one tile per weight, and several (partial last)
def test_group_on_each_path_matches_dequantized_fp32(fmt, tokens, path, tile_elems, monkeypatch):
    """float32 groups, exact against the dequantized experts on every path: the pair loop's fused GEMVs (one
    token), one call of the grouped kernel per GEMM (a few rows per expert; the fused GEMV per expert on CPUs
    where the grouped kernel does not run), decoded tiles (more rows)."""
    if path == "grouped" and not quant_kernels.grouped_available(fmt, torch.float32):
        path = "gemv"
    monkeypatch.setattr(quant_tiles, "TILE_ELEMS", tile_elems)
    packed, dense = _experts(fmt)
    pg = PackedExpertGroup(D, I, swiglu_limit=0.5, fmt=fmt, block=(32, 40))
    ref = ExpertGroup(D, I, swiglu_limit=0.5)
    pg.load(0, packed)
    ref.load(0, dense)
    spy = _PathSpy(pg, monkeypatch)
    x, rows, ids, w = _routing(tokens, seed=tokens)
    diff = (pg.forward(0, x, rows, ids, w) - ref.forward(0, x, rows, ids, w)).abs().max().item()
    assert set(spy.taken) == {path}
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
@pytest.mark.parametrize("tokens", [1, 48, 128])  # rows per expert: gemv; bf16 tiles as W @ x.t(); as x @ W.t()
@pytest.mark.parametrize("tile_elems", [1 << 20, 40 * D])
@pytest.mark.parametrize("numba_kernels", [True, False])  # without numba: torch's table-gather decode
@pytest.mark.parametrize("bf16_fast", [True, False])  # bf16 tiles, or fp32 tiles as on a CPU without bf16 GEMMs
@pytest.mark.parametrize("grouped", [True, False])  # the grouped kernel where it runs, or never (the tiles at 128)
def test_bf16_group_agrees_with_bf16_experts_on_the_dequantized_weights(fmt, tokens, tile_elems, numba_kernels,
                                                                         bf16_fast, grouped, monkeypatch):
    """bf16 serving: the packed group (bf16 tiles where the CPU computes bf16 natively, else fp32; the grouped
    kernel where it runs, or with it off) against ExpertGroup in bf16 holding the dequantized weights; both
    round activations to bf16, so they agree to bf16's precision (2e-2 of the largest output, against the fp32
    experts and against the bf16 ones)."""
    monkeypatch.setattr(quant_tiles, "TILE_ELEMS", tile_elems)
    monkeypatch.setattr(quant_tiles, "_cpu_bf16_fast", lambda: bf16_fast)
    if not numba_kernels:
        monkeypatch.setattr(quant_kernels, "available", lambda: False)
    packed, dense = _experts(fmt)
    pg = PackedExpertGroup(D, I, dtype=torch.bfloat16, fmt=fmt, block=(32, 40))
    assert pg.tile_dtype == (torch.bfloat16 if bf16_fast else torch.float32)
    if not grouped:
        pg._grouped = None
    ref = ExpertGroup(D, I, dtype=torch.bfloat16)
    exact = ExpertGroup(D, I)
    pg.load(0, packed)
    ref.load(0, dense)
    exact.load(0, dense)
    x, rows, ids, w = _routing(tokens, seed=7)
    want = exact.forward(0, x, rows, ids, w)
    got, peer = pg.forward(0, x, rows, ids, w).float(), ref.forward(0, x, rows, ids, w).float()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2e-2 * scale
    assert (got - peer).abs().max().item() <= 2e-2 * scale


def test_mxfp4_bfloat16_decode_at_extreme_scales():
    """Scale bytes whose products leave bf16's normal range (< 2 or > 252) take the table decode; every byte
    either way equals torch's dequantize-then-cast (rows mixing both kinds, so both loops run)."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(4, 2).view(torch.int8)  # [4, 512]: every byte pair
    ref_scales = [[2, 127, 252, 100] * 8, [0, 1, 253, 254] * 8, [126] * 32, [3, 251] * 16]
    scale = torch.tensor(ref_scales, dtype=torch.uint8).view(torch.float8_e8m0fnu)  # [4, 32]
    ref = dequant_mxfp4(codes, scale)
    for r0, r1 in ((0, 4), (0, 1), (2, 4)):  # with and without the out-of-range row
        out = torch.empty(r1 - r0, 1024, dtype=torch.bfloat16)
        quant_kernels.decode_rows("mxfp4", codes, scale, None, r0, r1, out)
        assert torch.equal(out, ref[r0:r1].to(torch.bfloat16)), (r0, r1)


# ---- the vectorized decoders against the table ones they replaced -----------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_fp8_arithmetic_decode_equals_the_table_decode(threads):
    """Every e4m3 code (subnormals, +-0, NaN) at block scales across float32's range -- tiny, ordinary, needing
    rounding, and >= 2^8 (where scale x 2^120 overflows and the kernel takes two multiplies) -- float and e8m0."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(6, 2).view(torch.float8_e4m3fn)  # [6, 512]
    scales = [torch.tensor([[2.0**-100, 0.3137], [1.7e-3, 1.0], [300.0, 2.0**40]]),
              torch.tensor([[1, 100], [127, 130], [200, 254]], dtype=torch.uint8).view(torch.float8_e8m0fnu)]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for scale in scales:
            ref = dequant_fp8_blocks(codes, scale, (2, 256))
            for dtype in (torch.float32, torch.bfloat16):
                got, table = torch.empty(6, 512, dtype=dtype), torch.empty(6, 512, dtype=dtype)
                quant_kernels.decode_rows("fp8", codes, scale, (2, 256), 0, 6, got)
                quant_kernels.decode_rows("fp8", codes, scale, (2, 256), 0, 6, table, kernel="table")
                nan = ref.isnan()
                assert torch.equal(got[~nan], table[~nan]) and torch.equal(got[~nan], ref[~nan].to(dtype)), dtype
                assert got[nan].isnan().all() and table[nan].isnan().all()
    finally:
        torch.set_num_threads(prev)


def test_fp8_decode_takes_the_table_where_denormals_are_flushed(monkeypatch):
    """With denormals-are-zero the arithmetic decode would zero e4m3's subnormals; the table decode runs."""
    assert quant_kernels.denormals_kept()  # this test process does not flush them
    codes, scale, block, ref = _weight("fp8")
    called = []
    for parallel in (False, True):
        table = quant_kernels._KERNELS[("fp8", parallel)]["bf16_table"]
        monkeypatch.setitem(quant_kernels._KERNELS[("fp8", parallel)], "bf16_table",
                            lambda *a, table=table: called.append(1) or table(*a))
    monkeypatch.setattr(quant_kernels, "denormals_kept", lambda: False)
    out = torch.empty(N, K, dtype=torch.bfloat16)
    quant_kernels.decode_rows("fp8", codes, scale, block, 0, N, out)
    assert called and torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("threads", [1, 2])
def test_mxfp4_vectorized_decode_equals_the_table_decode(threads):
    """Every byte under every e8m0 scale byte 0..254 (rows with bytes outside 2..252 are redone by the table)."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(255, 2).view(torch.int8)  # [255, 512]
    scale = torch.arange(255, dtype=torch.uint8)[:, None].repeat(1, 32)  # row r: scale byte r
    scale[7, 5] = 1  # one out-of-range group in an otherwise in-range row
    scale = scale.view(torch.float8_e8m0fnu)
    ref = dequant_mxfp4(codes, scale).to(torch.bfloat16)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, table = torch.empty(255, 1024, dtype=torch.bfloat16), torch.empty(255, 1024, dtype=torch.bfloat16)
        quant_kernels.decode_rows("mxfp4", codes, scale, None, 0, 255, got)
        quant_kernels.decode_rows("mxfp4", codes, scale, None, 0, 255, table, kernel="table")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(got, table) and torch.equal(got, ref)


def test_decode_rows_refuses_unknown_kernels():
    codes, scale, block, _ = _weight("mxfp4")
    with pytest.raises(ValueError, match="kernel"):
        quant_kernels.decode_rows("mxfp4", codes, scale, block, 0, 4, torch.empty(4, K), kernel="fast")


def test_gemv_at_extreme_scales_matches_dequantize_then_matmul():
    """The GEMVs' fallbacks: MXFP4 rows with a scale byte below 2 (table rows next to integer-decoded ones; above
    252 the products overflow float32 anyway), FP8 bands with a block scale >= 2^8 (the band's table next to
    arithmetic bands)."""
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(2))
    codes = torch.randint(-128, 128, (4, 512), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    scale = torch.tensor([[1, 120] * 16, [127] * 32, [0, 126] * 16, [2, 130] * 16], dtype=torch.uint8)
    scale = scale.view(torch.float8_e8m0fnu)
    ref = dequant_mxfp4(codes, scale)
    got = quant_kernels.gemv_packed(x, "mxfp4", codes, scale, None)
    want = x @ ref.t()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    w8 = (torch.randn(64, 1024, generator=torch.Generator().manual_seed(4)) * 8).to(torch.float8_e4m3fn)
    s8 = torch.tensor([[0.01] * 8, [300.0] + [0.5] * 7])  # band 1 holds a block scale >= 2^8
    ref8 = dequant_fp8_blocks(w8, s8, (32, 128))
    got8 = quant_kernels.gemv_packed(x, "fp8", w8, s8, (32, 128))
    want8 = x @ ref8.t()
    assert torch.allclose(got8, want8, rtol=1e-5, atol=1e-5 * want8.abs().max().item())


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
def test_few_pairs_loop_matches_dequantized_fp32(fmt):
    """<= TINY_PAIRS pairs skip the sort and gather: one row with two experts, two rows with two each."""
    packed, dense = _experts(fmt)
    pg = PackedExpertGroup(D, I, swiglu_limit=0.5, fmt=fmt, block=(32, 40))
    ref = ExpertGroup(D, I, swiglu_limit=0.5)
    pg.load(0, packed)
    ref.load(0, dense)
    for tokens in (1, 2):
        x, rows, ids, w = _routing(tokens, seed=11 + tokens)
        assert rows.numel() <= quantized.TINY_PAIRS
        diff = (pg.forward(0, x, rows, ids, w) - ref.forward(0, x, rows, ids, w)).abs().max().item()
        assert diff <= 1e-5, diff
    with pytest.raises(KeyError, match="not loaded here"):
        pg.forward(0, x[:1], torch.tensor([0]), torch.tensor([E + 3]), torch.tensor([1.0]))


@pytest.mark.parametrize("fmt, scale_fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_expert_equals_decode_rows_of_each_weight(fmt, scale_fmt, dtype):
    """One call for w1, w3 (into one [2I, D] tile) and w2 [D, I] equals three decode_rows (fp8: partial blocks)."""
    d, i, block = 96, 64, (32, 40)
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(i, d, generator=gen), torch.randn(i, d, generator=gen), torch.randn(d, i, generator=gen)]
    packed = [quantize_mxfp4(w) if fmt == "mxfp4" else quantize_fp8_blocks(w, block, scale_fmt=scale_fmt)
              for w in ws]
    block = None if fmt == "mxfp4" else block
    args = tuple(quant_kernels.kernel_args(fmt, c, s, block) for c, s in packed)
    t13, t2 = torch.empty(2 * i, d, dtype=dtype), torch.empty(d, i, dtype=dtype)
    quant_kernels.decode_expert(fmt, args, t13, t2)
    r13, r2 = torch.empty(2 * i, d, dtype=dtype), torch.empty(d, i, dtype=dtype)
    for (c, s), out in zip(packed, (r13[:i], r13[i:], r2), strict=True):
        quant_kernels.decode_rows(fmt, c, s, block, 0, out.shape[0], out)
    assert torch.equal(t13, r13) and torch.equal(t2, r2)
