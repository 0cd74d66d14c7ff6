"""Random SwiGLU experts quantized in a published format, next to the same experts dequantized (the oracle)."""

import torch

from moeray.experts.quant_formats import (
    dequant_fp8_blocks,
    dequant_mxfp4,
    quantize_fp8_blocks,
    quantize_int8_rows,
    quantize_mxfp4,
)
from moeray.experts.quantized import PackedExpert, PackedWeight


def packed_and_dense_experts(fmt: str, hidden: int, inter: int, num_experts: int, seed: int,
                             block: tuple[int, int] = (32, 32)):
    """fmt mxfp4 | fp8 (block-scaled, `block`) | int8 -> (expert id -> PackedExpert, expert id -> (gate_up
    [2I, D], down [D, I]) dequantized in fp32)."""
    gen = torch.Generator().manual_seed(seed)
    packed, dense = {}, {}
    for e in range(num_experts):
        ws = [torch.randn(inter, hidden, generator=gen) * 0.1, torch.randn(inter, hidden, generator=gen) * 0.1,
              torch.randn(hidden, inter, generator=gen) * 0.1]
        if fmt == "mxfp4":
            pw = [PackedWeight(*quantize_mxfp4(w)) for w in ws]
            deq = [dequant_mxfp4(p.codes, p.scale) for p in pw]
        elif fmt == "fp8":
            pw = [PackedWeight(*quantize_fp8_blocks(w, block)) for w in ws]
            deq = [dequant_fp8_blocks(p.codes, p.scale, block) for p in pw]
        else:
            pw = [PackedWeight(*quantize_int8_rows(w)) for w in ws]
            deq = [p.codes.float() * p.scale[:, None] for p in pw]
        packed[e] = PackedExpert(*pw)
        dense[e] = (torch.cat(deq[:2]), deq[2])
    return packed, dense
