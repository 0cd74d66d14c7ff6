"""Quantized weight formats as published: decoding and encoding, pure torch.

- `fp8`: float8_e4m3fn weight [O, I] with one scale per (bo x bi) block, scale [ceil(O/bo), ceil(I/bi)]
  (edge blocks are partial, e.g. V3's kv_a_proj_with_mqa with 576 rows). Scales are float32 (V3, V4-Base:
  `weight_scale_inv` -- despite the name it multiplies) or float8_e8m0fnu powers of two (`scale_fmt: ue8m0`).
- `mxfp4`: int8 [O, I/2] holding two e2m1 codes per byte, low nibble first, with one float8_e8m0fnu scale
  per 32 inputs [O, I/32]. e2m1 code -> value: 0, .5, 1, 1.5, 2, 3, 4, 6 and the same negated (bit 3 = sign).
- `int8`: int8 [O, I] with one float32 scale per output row (quantize-on-load only; no hub checkpoint uses it).

Dequantized value = code value x scale. e8m0 byte b is 2^(b - 127); 255 is NaN (OCP MX v1.0). Block sizes are
arguments (from the checkpoint's `weight_block_size`: 128x128 in V3/V4, 32x32 in V4.1), never constants here.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E4M3_MAX = 448.0
MX_GROUP = 32  # inputs per e8m0 scale in MXFP4 (OCP MX)


# ---- decoding --------------------------------------------------------------------------------------------
def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu or uint8 bytes -> float32 2^(b - 127); byte 255 -> NaN."""
    b = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s
    if b.dtype != torch.uint8:
        raise TypeError(f"e8m0 scales must be float8_e8m0fnu or uint8, got {s.dtype}")
    out = torch.ldexp(torch.ones(b.shape), b.to(torch.int32) - 127)
    return out.masked_fill_(b == 255, float("nan"))


def scale_to_float(s: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor (float32 / bf16 / e8m0 / uint8 e8m0 bytes) -> float32."""
    if s.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return e8m0_to_float(s)
    return s.float()


def e2m1_lut(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """byte -> its two e2m1 values [256, 2] (low nibble first), for one-gather unpacking."""
    v = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([v[b & 15], v[b >> 4]], dim=1).to(dtype)


def unpack_e2m1(packed: torch.Tensor, dtype: torch.dtype = torch.float32, lut: torch.Tensor | None = None
                ) -> torch.Tensor:
    """int8/uint8 [..., n/2] -> the e2m1 values [..., n] (low nibble first)."""
    lut = e2m1_lut(dtype) if lut is None else lut
    idx = packed.view(torch.uint8).reshape(-1).to(torch.int32)
    return lut.index_select(0, idx).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequant_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn [O, I] x scale [ceil(O/bo), ceil(I/bi)] -> [O, I] in `dtype` (partial edge blocks)."""
    bo, bi = block
    s = scale_to_float(scale)
    o, i = w.shape
    full = s.repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]
    return (w.float() * full).to(dtype)


def dequant_mxfp4(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [O, I/2] x e8m0 scale [O, I/32] -> [O, I] in `dtype`."""
    vals = unpack_e2m1(w)  # [O, I]
    o, i = vals.shape
    s = scale_to_float(scale)
    return (vals.view(o, i // MX_GROUP, MX_GROUP) * s[:, :, None]).reshape(o, i).to(dtype)


# ---- encoding (quantize-on-load, and the test writers of published layouts) ---------------------------
def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int], scale_fmt: str = "float"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] -> (float8_e4m3fn [O, I], scale [ceil(O/bo), ceil(I/bi)]); scale float32, or e8m0 (power of two,
    rounded up so no block overflows) for `scale_fmt="ue8m0"`. Edge blocks are partial, as on the hub."""
    bo, bi = block
    o, i = w.shape
    nbo, nbi = -(-o // bo), -(-i // bi)
    pad = torch.zeros(nbo * bo, nbi * bi)
    pad[:o, :i] = w.float()
    amax = pad.view(nbo, bo, nbi, bi).abs().amax(dim=(1, 3))  # [nbo, nbi]
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        s = torch.exp2(torch.ceil(torch.log2(s)))
    full = s.repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]
    q = (w.float() / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, (s.to(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else s)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8 0..15) for each value of x (already divided by its scale)."""
    grid = torch.tensor(E2M1_VALUES[:8])
    mag = x.abs().clamp(max=6.0)
    code = (mag[..., None] - grid).abs().argmin(dim=-1).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] (I % 32 == 0) -> (int8 [O, I/2] packed low nibble first, float8_e8m0fnu [O, I/32])."""
    o, i = w.shape
    if i % MX_GROUP:
        raise ValueError(f"MXFP4 needs the input width to be a multiple of {MX_GROUP}, got {i}")
    g = w.float().view(o, i // MX_GROUP, MX_GROUP)
    amax = g.abs().amax(dim=-1)
    # the scale that maps the group's largest magnitude into e2m1's range (<= 6), a power of two
    s = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 6.0))), torch.ones_like(amax))
    codes = e2m1_codes(g / s[..., None]).view(o, i)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    return packed, s.to(torch.float8_e8m0fnu)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[O, I] -> (int8 [O, I], float32 scale [O]): symmetric per output row."""
    amax = w.float().abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (w.float() / s[:, None]).round().clamp(-127, 127).to(torch.int8), s
