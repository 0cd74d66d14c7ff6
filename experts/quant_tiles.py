"""PackedExpertGroup's per-expert paths (experts/quantized.py): for calls the grouped kernel does not take, each
expert hit computed on its rows from its packed weights -- numba's fused GEMV for few rows, decoded tiles and a
library GEMM (oneDNN / MKL) for more, torch's weight-only int8 kernel for int8. A mixin: the group's state
(fmt, block, dtype, device, tile dtype, buffers, kernel args) is PackedExpertGroup's."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moeray.experts import quant_kernels
from moeray.experts.quant_formats import MX_GROUP, e2m1_lut, scale_to_float

if TYPE_CHECKING:
    from moeray.experts.quantized import PackedExpert, PackedWeight

TILE_ELEMS = 1 << 20  # weight elements decoded per tile


class PerExpertPaths:
    """The per-expert compute of PackedExpertGroup (see the module docstring)."""

    def _expert(self, xs: torch.Tensor, ex: PackedExpert) -> torch.Tensor:
        """xs [c, D] -> [c, D]: clamped SwiGLU with every GEMM computed from packed weights."""
        path = self.path(xs.shape[0])
        if path == "tile":
            return self._expert_tiles(xs, ex)
        if path == "gemv":
            return self._expert_gemv(xs, ex)
        return self._linear(self._act(self._linear(xs, ex.w1), self._linear(xs, ex.w3)), ex.w2)

    def _expert_gemv(self, xs: torch.Tensor, ex: PackedExpert) -> torch.Tensor:
        """The fused-GEMV path, in float32 (the kernels' dtype) from the first GEMM to the last: two casts."""
        xf = xs.float()
        gate, up = (quant_kernels.gemv_packed(xf, self.fmt, w.codes, w.scale, self.block, self._kernel_args(w))
                    for w in (ex.w1, ex.w3))
        w2 = ex.w2
        act = self._act(gate, up)
        return quant_kernels.gemv_packed(act, self.fmt, w2.codes, w2.scale, self.block,
                                         self._kernel_args(w2)).to(self.dtype)

    def _expert_tiles(self, xs: torch.Tensor, ex: PackedExpert) -> torch.Tensor:
        """The tile path: rows r0:r1 of w1 and of w3 decoded into one tile [2n, D], one library GEMM for gate and
        up, the activation written into its rows of act [I, c]; then w2 tile by tile. Few rows (c <= the
        small-rows limit): in the W @ x.t() layout MKL / oneDNN run fastest for few rows (W is the GEMM's row-major
        A operand, not reordered per call), transposed once at the end; more rows: x @ W.t(). Where gate/up and
        w2 each fit one tile, all three are decoded before the first GEMM: a decode streams megabytes through the
        cache and the library call after it pays to refetch its own code and state (measured ~50 us per decode ->
        GEMM switch on the AMX Xeon; one switch per expert instead of two, 1.1x at 512 routed tokens)."""
        c, small = xs.shape[0], xs.shape[0] <= self._small_rows
        xt = xs.to(self._tile_dtype)
        act = torch.empty((self.inter, c) if small else (c, self.inter), dtype=self._tile_dtype, device=self.device)
        gate_up = self._tiles(ex.w1, ex.w3)
        down = self._tiles(ex.w2, slot=1)
        if self._tile_rows(self.inter, 2 * self.hidden) == self.inter and self._tile_rows(self.hidden, self.inter) \
                == self.hidden:  # each a single tile, decoded now
            args = [self._kernel_args(w) for w in (ex.w1, ex.w3, ex.w2)]
            if self._numba_decode(self._tile_dtype) and all(a is not None for a in args):
                d, i = self.hidden, self.inter
                t13 = self._buffers(2 * i * d)[0][:2 * i * d].view(2 * i, d)
                t2 = self._buffers(d * i, slot=1)[0][:d * i].view(d, i)
                quant_kernels.decode_expert(self.fmt, tuple(args), t13, t2)  # one call for the three
                gate_up, down = [(0, i, t13)], [(0, d, t2)]
            else:
                gate_up, down = [next(gate_up)], [next(down)]
        for r0, r1, tile in gate_up:
            n = r1 - r0
            if small:
                h = torch.mm(tile, xt.t())  # [2n, c]: gate rows, then up rows
                self._act_into(h[:n], h[n:], act[r0:r1])
            else:
                h = torch.mm(xt, tile.t())  # [c, 2n]
                self._act_into(h[:, :n], h[:, n:], act[:, r0:r1])
        out = torch.empty((self.hidden, c) if small else (c, self.hidden), dtype=self._tile_dtype,
                          device=self.device)
        for r0, r1, tile in down:
            if small:
                torch.mm(tile, act, out=out[r0:r1])
            elif r1 - r0 == self.hidden:
                torch.mm(act, tile.t(), out=out)
            else:
                out[:, r0:r1] = torch.mm(act, tile.t())
        return (out.t() if small else out).to(self.dtype)  # (made row-major by forward's torch.cat)

    def _act_into(self, gate: torch.Tensor, up: torch.Tensor, dst: torch.Tensor) -> None:
        """dst = silu(gate) * up (clamped as `_act`), gate overwritten; all [n, c] views of tile-dtype tensors."""
        if self.swiglu_limit is not None:
            gate.clamp_(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        torch.mul(F.silu(gate, inplace=True), up, out=dst)

    def _act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return F.silu(gate).mul_(up)

    def _linear(self, xs: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        """xs [c, K] @ W.t() for a packed W [N, K] -> [c, N] in the compute dtype, by the path `path(c)` picks."""
        path = self.path(xs.shape[0])
        if path == "int8":
            return torch._weight_int8pack_mm(xs.contiguous(), w.codes, w.scale.to(self.dtype))
        if path == "gemv":
            return quant_kernels.gemv_packed(xs, self.fmt, w.codes, w.scale, self.block).to(self.dtype)
        xt = xs.to(self._tile_dtype)
        out = torch.empty(xs.shape[0], w.codes.shape[0], dtype=self._tile_dtype, device=self.device)
        for r0, r1, tile in self._tiles(w):
            out[:, r0:r1] = torch.mm(xt, tile.t())
        return out.to(self.dtype)

    def _tiles(self, w: PackedWeight, w_b: PackedWeight | None = None, slot: int = 0):
        """(r0, r1, tile), tile after tile, in reused tile buffer `slot` (0 or 1): rows r0:r1 of W decoded
        [r1 - r0, K]; with `w_b` (same shape), rows r0:r1 of W then rows r0:r1 of w_b [2 (r1 - r0), K]."""
        n = w.codes.shape[0]
        k = w.codes.shape[1] * (2 if self.fmt == "mxfp4" else 1)
        parts = 1 if w_b is None else 2
        rows_per_tile = self._tile_rows(n, k * parts)
        tile_buf, idx_buf = self._buffers(parts * rows_per_tile * k, slot)
        for r0 in range(0, n, rows_per_tile):
            r1 = min(n, r0 + rows_per_tile)
            m = r1 - r0
            tile = tile_buf[:parts * m * k].view(parts * m, k)
            self._decode(w, r0, r1, tile[:m], idx_buf)
            if w_b is not None:
                self._decode(w_b, r0, r1, tile[m:], idx_buf)
            yield r0, r1, tile

    def path(self, rows: int) -> str:
        """How a GEMM over `rows` rows of one expert runs: "int8" (torch's weight-only int8 kernel), "gemv"
        (numba's fused decode-and-dot, few rows on CPU) or "tile" (decode a tile into `tile_dtype`, then the
        library GEMM: the decode is paid once for all rows)."""
        if self.fmt == "int8":
            return "int8"
        limit = quant_kernels.FUSED_MAX_ROWS if self._tile_dtype == torch.bfloat16 else quant_kernels.FUSED_MAX_ROWS_F32
        if rows <= limit and self.device.type == "cpu" and quant_kernels.available():
            return "gemv"
        return "tile"

    @property
    def tile_dtype(self) -> torch.dtype:
        """The dtype tiles are decoded into: bfloat16 where the group computes in it and this CPU runs bf16
        GEMMs natively (AVX512-BF16 / AMX, read from torch's cpuinfo at run time), else float32 (an AVX2-only
        CPU runs bf16 matmuls ~400x slower than fp32); off CPU the compute dtype."""
        return self._tile_dtype

    def _tile_rows(self, n: int, k: int) -> int:
        rows = max(1, TILE_ELEMS // k)
        if self.fmt == "fp8":  # whole scale blocks per tile
            bo = self.block[0]
            rows = max(bo, rows // bo * bo)
        return min(n, rows)

    def _buffers(self, numel: int, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoded tile [numel] in the tile dtype, table indices) in buffer `slot`, reused across calls: fresh
        large allocations page-fault on every call (measured 5x slower decode)."""
        slots = getattr(self._local, "bufs", None)
        if slots is None:
            slots = self._local.bufs = [None, None]
        bufs = slots[slot]
        idx_numel = 0 if self._numba_decode(self._tile_dtype) else numel  # the table indices: torch's decode only
        if bufs is None or bufs[0].numel() < numel or bufs[1].numel() < idx_numel:
            bufs = slots[slot] = (torch.empty(numel, dtype=self._tile_dtype, device=self.device),
                                  torch.empty(idx_numel, dtype=torch.int32, device=self.device))
        return bufs

    def _numba_decode(self, dtype: torch.dtype) -> bool:
        return self.device.type == "cpu" and quant_kernels.available() and dtype in (torch.float32, torch.bfloat16)

    def _decode(self, w: PackedWeight, r0: int, r1: int, tile: torch.Tensor, idx_buf: torch.Tensor) -> None:
        """Rows r0:r1 of W, dequantized into tile [r1 - r0, K]: numba's one-pass decode where available (into
        float32, then cast), else code values by one table gather per two stored bytes, then times the scales."""
        rows, k = tile.shape
        if self._numba_decode(tile.dtype):
            quant_kernels.decode_rows(self.fmt, w.codes, w.scale, self.block, r0, r1, tile,
                                      args=self._kernel_args(w))
            return
        codes = w.codes[r0:r1].reshape(-1)
        if codes.numel() % 2:  # an odd number of fp8 codes: no byte pairs (tiny odd shapes only)
            tile.copy_(w.codes[r0:r1])
        else:
            pairs = codes.view(torch.int16)  # two stored bytes per table index
            idx = idx_buf[:pairs.numel()]
            idx.copy_(pairs).bitwise_and_(0xFFFF)
            torch.index_select(self._lut, 0, idx, out=tile.view(-1).view(self._lut.dtype))
        if self.fmt == "mxfp4":
            s = scale_to_float(w.scale[r0:r1]).to(tile.dtype)
            tile.view(rows, k // MX_GROUP, MX_GROUP).mul_(s[:, :, None])
            return
        bo, bi = self.block
        s = scale_to_float(w.scale[r0 // bo: -(-r1 // bo)])  # [tile blocks, ceil(K/bi)]
        s = s.repeat_interleave(bo, 0)[:rows].to(tile.dtype)  # [rows, ceil(K/bi)]
        full = k // bi
        if full:
            tile[:, :full * bi].unflatten(1, (full, bi)).mul_(s[:, :full, None])
        if full * bi < k:
            tile[:, full * bi:].mul_(s[:, full:full + 1])


@functools.cache
def _cpu_bf16_fast() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (AVX512-BF16 or AMX, the flags models/dtypes.py's `auto` reads;
    here from torch's cpuinfo, which also works off Linux). Unknown -> False: float32 tiles are always fast."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p is not None and p() for p in probes)


def _tile_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """See PackedExpertGroup.tile_dtype."""
    if device.type != "cpu":
        return dtype
    return torch.bfloat16 if dtype == torch.bfloat16 and _cpu_bf16_fast() else torch.float32


_ELEM_OF_BYTES = {4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _pair_lut(fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Table: a little-endian pair of stored bytes (as an index 0..65535) -> their decoded values in `dtype`
    (mxfp4: 4 e2m1 values, low nibble first; fp8: 2 e4m3 values), one table element per index."""
    b = torch.arange(256, dtype=torch.uint8)
    per_byte = e2m1_lut(torch.float32) if fmt == "mxfp4" else b.view(torch.float8_e4m3fn).float()[:, None]
    idx = torch.arange(65536)
    vals = torch.cat([per_byte[idx & 255], per_byte[idx >> 8]], dim=1).to(dtype).contiguous()  # [65536, 2 or 4]
    return vals.view(_ELEM_OF_BYTES[vals.shape[1] * vals.element_size()]).reshape(-1)
