"""KV codecs: each within its documented error bound on GQA / MLA / compressed rows; framing round trip;
corruption and truncation caught."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeray.kvstore.codec import CODEC_NAMES, check_block, decode_block, encode_block, get_codec
from moeray.kvstore.errors import CorruptBlockError
from moeray.kvstore.spec import CacheTensorSpec, LayerCacheSpec, ModelCacheSpec, gqa_spec, mla_spec

B = 16  # tokens per block
V4_LIKE = LayerCacheSpec("v4_compressed", (CacheTensorSpec("kv_comp", (512,), tokens_per_row=4),))
SPEC = ModelCacheSpec((gqa_spec(num_kv_heads=8, head_dim=128), mla_spec(kv_lora_rank=512, rope_dim=64), V4_LIKE))
BF16_HALF_ULP = 2.0**-8  # relative rounding of a value cast to bfloat16


def random_block(spec: ModelCacheSpec, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict]:
    """Gaussian rows with a per-row magnitude spread over 4 decades, like real K/V with outlier tokens."""
    g = torch.Generator().manual_seed(seed)
    block = []
    for layer in spec.layers:
        tensors = {}
        for t in layer.tensors:
            shape = (t.rows_per_block(B), *t.row_shape)
            magnitude = 10 ** (torch.rand((shape[0],) + (1,) * len(t.row_shape), generator=g) * 4 - 2)
            tensors[t.name] = (torch.randn(shape, generator=g) * magnitude).to(dtype)
        block.append(tensors)
    return block


def roundtrip(x: torch.Tensor, codec: str) -> torch.Tensor:
    return decode_block(encode_block([{"x": x}], codec))[0]["x"]


def fp16_bound(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)


def int8_bound(x: torch.Tensor) -> torch.Tensor:
    """max|x| / 254 per row per leading dim, plus the fp16 round-up of the scale and fp32 arithmetic."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    return amax / 254 * (1 + 2.0**-9) + 2.0**-24


def int4_bound(x: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    pad = -x.shape[-1] % group_size
    groups = torch.nn.functional.pad(x.abs(), (0, pad)).reshape(*x.shape[:-1], -1, group_size)
    amax = groups.amax(dim=-1, keepdim=True).expand_as(groups).reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    return amax / 14 * (1 + 2.0**-9) + 2.0**-24


BOUNDS = {"fp16": fp16_bound, "int8": int8_bound, "int4": int4_bound}


def assert_within_bound(x: torch.Tensor, codec: str) -> None:
    xf = x.float()
    err = (roundtrip(x, codec).float() - xf).abs()
    bound = BOUNDS[codec](xf)
    if x.dtype == torch.bfloat16:
        bound = bound + (xf.abs() + bound) * BF16_HALF_ULP
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{codec}: error reaches {worst:.3f} of its bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_codec_is_bit_exact(dtype):
    block = random_block(SPEC, dtype)
    block[0]["k"][0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    out = decode_block(encode_block(block, "none"))
    for layer_in, layer_out in zip(block, out, strict=True):
        for name, x in layer_in.items():
            assert layer_out[name].dtype == dtype
            assert torch.equal(layer_out[name].view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_lossy_codecs_are_within_their_bound_on_every_cached_tensor(codec, dtype):
    for layer in random_block(SPEC, dtype, seed=1):
        for x in layer.values():
            assert_within_bound(x, codec)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    codec=st.sampled_from(["int8", "int4"]),
    rows=st.integers(1, 4),
    heads=st.integers(1, 3),
    dim=st.integers(1, 80),
    log_scale=st.integers(-6, 4),
    seed=st.integers(0, 2**16),
)
def test_quantised_codecs_bound_holds_for_any_shape_and_magnitude(codec, rows, heads, dim, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    assert_within_bound(torch.randn(rows, heads, dim, generator=g) * 10.0**log_scale, codec)


def test_int8_bound_is_per_head():
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(2))
    x[:, 0] *= 1000  # an outlier head must not coarsen its neighbour
    err = (roundtrip(x, "int8") - x).abs()
    assert (err[:, 1] <= int8_bound(x[:, 1:])[:, 0]).all()


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_zero_rows_decode_to_exact_zeros(codec):
    x = torch.zeros(3, 2, 40)
    assert torch.equal(roundtrip(x, codec), x)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_quantised_codecs_are_not_trivially_exact(codec):
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(3))
    assert (roundtrip(x, codec) - x).abs().max() > 0


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_block_round_trip_keeps_layers_names_shapes_and_dtypes(codec):
    block = random_block(SPEC, torch.bfloat16, seed=4)
    out = decode_block(encode_block(block, codec))
    assert [list(layer) for layer in out] == [list(layer) for layer in block]
    for layer_in, layer_out in zip(block, out, strict=True):
        for name, x in layer_in.items():
            assert layer_out[name].shape == x.shape and layer_out[name].dtype == x.dtype


def test_compressed_rows_take_a_quarter_of_the_block():
    check_block(random_block(SPEC), SPEC, B)
    assert random_block(SPEC)[2]["kv_comp"].shape == (B // 4, 512)


def test_check_block_rejects_a_wrong_shape():
    block = random_block(SPEC)
    block[1]["latent"] = block[1]["latent"][:, :256]
    with pytest.raises(ValueError, match="layer 1"):
        check_block(block, SPEC, B)


def test_int4_packs_two_values_per_byte():
    x = torch.randn(16, 8, 128)
    frame_bytes = len(encode_block([{"k": x}], "int4"))
    data_bytes, scale_bytes = x.numel() // 2, x.numel() // 32 * 2
    assert data_bytes + scale_bytes <= frame_bytes <= data_bytes + scale_bytes + 200


def _small_frame() -> bytes:
    return encode_block([{"k": torch.arange(8.0).reshape(2, 4)}, {"latent": torch.ones(2, 3)}], "int8")


def test_every_flipped_byte_is_caught():
    frame = _small_frame()
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises(CorruptBlockError):
            decode_block(bytes(bad))


def test_truncated_or_extended_frames_are_caught():
    frame = _small_frame()
    for n in range(len(frame)):
        with pytest.raises(CorruptBlockError):
            decode_block(frame[:n])
    with pytest.raises(CorruptBlockError):
        decode_block(frame + b"\0")


def test_a_flipped_byte_in_a_large_block_is_caught():
    frame = bytearray(encode_block(random_block(SPEC), "none"))
    frame[len(frame) // 2] ^= 0x80
    with pytest.raises(CorruptBlockError, match="checksum"):
        decode_block(bytes(frame))


def test_unknown_codec_lists_the_valid_ones():
    with pytest.raises(ValueError, match="none, fp16, int8, int4"):
        get_codec("int3")


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_lossy_codecs_reject_non_finite_values_naming_the_tensor(codec):
    x = torch.ones(2, 4)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="'k'"):
        encode_block([{"k": x}], codec)


def test_fp16_rejects_values_out_of_range():
    with pytest.raises(ValueError, match="65504"):
        encode_block([{"k": torch.full((1, 2), 1e6)}], "fp16")


def test_a_well_framed_but_meaningless_header_is_corrupt():
    from moeray.kvstore.frame import pack_frame

    bogus = {"codec": "int3", "params": {}, "layers": [[{"name": "k", "dtype": "float32", "shape": [1], "parts": {}}]]}
    with pytest.raises(CorruptBlockError, match="int3"):
        decode_block(pack_frame(bogus, [b"\0" * 4]))
    outside = {**bogus, "codec": "none"}
    outside["layers"] = [[{"name": "k", "dtype": "float32", "shape": [1], "parts": {"data": [2, 4]}}]]
    with pytest.raises(CorruptBlockError, match="outside the body"):
        decode_block(pack_frame(outside, [b"\0" * 4]))
