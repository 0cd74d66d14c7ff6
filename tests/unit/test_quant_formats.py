"""The published quantized formats against their tables, the config's quantization keys, and the packed experts
against the same experts dequantized."""

import math

import pytest
import torch
from support.quant_experts import packed_and_dense_experts

from moeray.common.errors import ConfigError
from moeray.experts import quant_kernels, quant_tiles
from moeray.experts.group import ExpertGroup
from moeray.experts.quant_formats import (
    dequant_fp8_blocks,
    dequant_mxfp4,
    e8m0_to_float,
    quantize_fp8_blocks,
    quantize_mxfp4,
    unpack_e2m1,
)
from moeray.experts.quantized import PackedExpert, PackedExpertGroup, PackedWeight
from moeray.models.quant import CheckpointQuant, parse_quantization

# OCP MX v1.0 FP4 (E2M1): sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; written out, not computed
E2M1_TABLE = {0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0,
              0b0111: 6.0, 0b1000: -0.0, 0b1001: -0.5, 0b1010: -1.0, 0b1011: -1.5, 0b1100: -2.0, 0b1101: -3.0,
              0b1110: -4.0, 0b1111: -6.0}


def test_every_e2m1_code_low_nibble_first():
    for lo in range(16):
        for hi in range(16):
            byte = torch.tensor([[lo | (hi << 4)]], dtype=torch.uint8).view(torch.int8)
            got = unpack_e2m1(byte)[0].tolist()
            assert got == [E2M1_TABLE[lo], E2M1_TABLE[hi]], (lo, hi)
            assert math.copysign(1, got[0]) == math.copysign(1, E2M1_TABLE[lo])  # -0.0 keeps its sign


def test_every_e8m0_byte():
    b = torch.arange(256, dtype=torch.uint8)
    got = e8m0_to_float(b.view(torch.float8_e8m0fnu))
    for byte in range(255):
        assert got[byte].item() == math.ldexp(1.0, byte - 127), byte
    assert math.isnan(got[255].item())
    # torch's own e8m0 type agrees on every finite byte
    assert torch.equal(got[:255], b[:255].view(torch.float8_e8m0fnu).float())


def test_fp8_block_dequant_partial_edge_blocks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576 // 8, 40, generator=g)  # 72 rows, 40 cols with 32x32 blocks: partial in both dims
    q, s = quantize_fp8_blocks(w, (32, 32))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32
    d = dequant_fp8_blocks(q, s, (32, 32))
    for r in range(72):
        for c in (0, 31, 32, 39):
            assert d[r, c].item() == (q[r, c].float() * s[r // 32, c // 32]).item()  # one fp32 product
    assert (d - w).abs().max() <= w.abs().max() / 8  # e4m3: 3 mantissa bits


def test_ue8m0_fp8_scales_are_powers_of_two():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    q, s = quantize_fp8_blocks(w, (32, 32), scale_fmt="ue8m0")
    assert s.dtype == torch.float8_e8m0fnu
    f = s.float()
    assert torch.equal(torch.exp2(torch.log2(f).round()), f)
    assert (dequant_fp8_blocks(q, s, (32, 32)) - w).abs().max() <= w.abs().max() / 8


def test_mxfp4_layout_and_round_trip():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    codes, s = quantize_mxfp4(w)
    assert codes.dtype == torch.int8 and codes.shape == (8, 32)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (8, 2)
    d = dequant_mxfp4(codes, s)
    # every dequantized value is a code value times its group's scale
    vals = (d.view(8, 2, 32) / s.float()[:, :, None]).reshape(-1).tolist()
    assert set(vals) <= set(E2M1_TABLE.values())
    # values already on the grid come back exactly
    grid = torch.tensor(list(E2M1_TABLE.values()) * 4).view(2, 32)
    c2, s2 = quantize_mxfp4(grid)
    assert torch.equal(dequant_mxfp4(c2, s2), grid)


@pytest.mark.parametrize("qc, key, value", [
    ({"quant_method": "awq", "weight_block_size": [128, 128]}, "quantization_config.quant_method", "awq"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "quantization_config.fmt", "e5m2"),
    ({"quant_method": "fp8", "weight_block_size": None}, "quantization_config.weight_block_size", "None"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "e4m3"}, "quantization_config.scale_fmt",
     "e4m3"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "nvfp4"},
     "quantization_config.expert_dtype", "nvfp4"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "quantization_config.activation_scheme", "static"),
])
def test_unknown_quantization_settings_name_key_and_value(qc, key, value):
    with pytest.raises(ConfigError) as e:
        parse_quantization({"quantization_config": qc})
    assert key in str(e.value) and value in str(e.value)


def test_expert_dtype_top_level_and_inside_quant_config():
    base = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"}
    v4 = parse_quantization({"quantization_config": base, "expert_dtype": "fp4"})
    v41 = parse_quantization({"quantization_config": dict(base, expert_dtype="fp4")})
    assert v4 == v41 == CheckpointQuant("fp8", (32, 32), "ue8m0", "mxfp4")
    assert parse_quantization({"quantization_config": dict(base, weight_block_size=[128, 128])}).experts == "fp8"
    assert parse_quantization({}) == CheckpointQuant()
    with pytest.raises(ConfigError, match="expert_dtype: 'fp2'"):
        parse_quantization({"quantization_config": base, "expert_dtype": "fp2"})



def test_expert_dtype_as_transformers_saves_a_v4_config():
    """transformers' DeepseekV4Config copies a top-level expert_dtype into quantization_config (V4.1's place),
    keeping both: the same value twice is accepted."""
    from transformers import DeepseekV4Config

    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32], "scale_fmt": "ue8m0",
          "activation_scheme": "dynamic"}
    saved = DeepseekV4Config(num_hidden_layers=2, expert_dtype="fp4", quantization_config=qc).to_dict()
    assert saved["quantization_config"]["expert_dtype"] == "fp4"
    assert parse_quantization(saved) == CheckpointQuant("fp8", (32, 32), "ue8m0", "mxfp4")


# ---- packed experts vs the same experts dequantized -----------------------------------------------------
D, I, E = 96, 64, 4


def _packed_experts(fmt: str, block=(32, 32)):
    return packed_and_dense_experts(fmt, D, I, E, 3, block=block)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4", "int8"])
@pytest.mark.parametrize("tile_elems", [1 << 20, 40 * D])  # one tile, and several (with a partial last one)
@pytest.mark.parametrize("numba_kernels", [True, False])  # fused/one-pass numba kernels, or torch ops only
def test_packed_group_matches_dequantized_group(fmt, tile_elems, numba_kernels, monkeypatch):
    monkeypatch.setattr(quant_tiles, "TILE_ELEMS", tile_elems)
    if not numba_kernels:
        monkeypatch.setattr(quant_kernels, "available", lambda: False)
    packed, dense = _packed_experts(fmt, block=(24, 40))  # blocks that split neither D nor I evenly
    pg = PackedExpertGroup(D, I, swiglu_limit=0.5, fmt=fmt, block=(24, 40))
    ref = ExpertGroup(D, I, swiglu_limit=0.5)
    pg.load(1, packed)
    ref.load(1, dense)
    g = torch.Generator().manual_seed(4)
    for tokens in (1, 3, 17):
        x = torch.randn(tokens, D, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)]).reshape(-1)
        rows = torch.arange(tokens).repeat_interleave(2)
        w = torch.rand(2 * tokens, generator=g)
        diff = (pg.forward(1, x, rows, ids, w) - ref.forward(1, x, rows, ids, w)).abs().max().item()
        assert diff <= 1e-5, (fmt, tokens, diff)


def test_packed_group_holds_packed_bytes_and_unloads():
    packed, _ = _packed_experts("mxfp4")
    pg = PackedExpertGroup(D, I, fmt="mxfp4")
    pg.load(0, packed)
    stored = sum(ex.nbytes for ex in packed.values())
    assert pg.nbytes() == stored == E * 3 * D * I * (0.5 + 1 / 32)  # 4.25 bits per weight
    pg.unload(0, [1, 2])
    assert pg.loaded() == {0: [0, 3]}
    with pytest.raises(KeyError, match=r"\[2\]"):
        pg.forward(0, torch.zeros(1, D), torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="w1"):
        pg.load(0, {5: PackedExpert(PackedWeight(torch.zeros(I, D, dtype=torch.int8), torch.zeros(I, 3)),
                                    packed[0].w3, packed[0].w2)})
