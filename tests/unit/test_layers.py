"""Building blocks against their textbook forms: rms_norm's two-pass form for large bf16 inputs, and the signed
RoPE tables against rotate_half."""

import pytest
import torch
import torch.nn.functional as F

from moeray.models.config import RopeConfig
from moeray.models.layers import LARGE_NORM, Rotary, rms_norm


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: fp32 statistics, cast back, then the weight."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


@pytest.mark.parametrize("rows", [1, 64, 4 * LARGE_NORM // 512])  # decode sizes and a prefill chunk
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_transformers_in_bf16(rows, with_weight):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, 512, generator=g) * 3).bfloat16()
    w = (torch.rand(512, generator=g) + 0.5).bfloat16() if with_weight else None
    got, want = rms_norm(x, w, 1e-6), hf_rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    # one bf16 rounding apart at most (the order of the fp32 reduction differs)
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)


def test_rms_norm_in_float32_is_f_rms_norm_at_every_size():
    x = torch.randn(4 * LARGE_NORM // 512, 512, generator=torch.Generator().manual_seed(1))
    w = torch.rand(512, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rms_norm(x, w, 1e-6), F.rms_norm(x, (512,), w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_rope_equals_rotate_half(dtype):
    rot = Rotary(RopeConfig(), 64, 2048)
    positions = torch.tensor([0, 1, 7, 300, 2047])
    x = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    cos, sin = rot.cos_sin(positions)
    c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    textbook = x * c + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * s
    assert torch.equal(rot.apply_signed(x, *rot.signed_cos_sin(positions, dtype)), textbook)
    assert torch.equal(rot.apply(x, cos, sin), textbook)


def test_signed_tables_refuse_interleaved_rotary():
    with pytest.raises(ValueError, match="half-split"):
        Rotary(RopeConfig(), 64, 2048, interleave=True).signed_cos_sin(torch.arange(3), torch.float32)
