"""Routed experts held packed (FP8 blocks, MXFP4, int8 rows) and computed from the packed weights.

`PackedExpertGroup` has ExpertGroup's interface (load / unload / slots / loaded / nbytes / forward) but holds
each expert as published: w1 (gate) [I, D], w3 (up) [I, D], w2 (down) [D, I] codes plus their scales, so an
expert actor's bytes are the checkpoint's bytes. The compute, per expert hit:

- `fp8`, `mxfp4` in bf16 on a CPU with AVX512-BF16, no expert with more than GROUPED_MAX_ROWS rows: every
  expert hit in one call of a grouped kernel per GEMM (quant_kernels.grouped_mm: W decoded 4 rows at a time
  into an L1 buffer of bf16 bits, vdpbf16ps dots), as ExpertGroup's grouped bf16 path -- no Python loop over
  the experts. MXFP4 in float32 (and in bf16 where the CPU lacks bf16 GEMMs), up to FUSED_MAX_ROWS_F32 rows
  per expert, the same one call per GEMM with the fused GEMV's exact float32 dots (CPUs with AVX512-BW; 2.3x
  the per-expert GEMVs at 16 routed tokens, 2.74 vs 6.34 ms, same machine and sizes as below). The layer's slots are
  stacked for it at load, one [S, ...] tensor per weight (`_set`).
  Measured on a 2-core Zen 5 EPYC, D=1024, I=512, top-2 of 64, one thread (bench/experts.py --packed, six
  runs): MXFP4 1.6-1.7x / FP8 1.1-1.2x the tokens/s of the bf16 experts at 16 routed tokens, where the
  per-expert loop ran 0.59x / 0.74x; 1.4-1.5x / 1.1-1.3x at 512 (was 0.66x / 0.61x).
- `fp8`, `mxfp4`, few rows per expert (decode, small batches: `path(c)` == "gemv"): numba's fused GEMV decodes
  each row of W once into an L1 buffer and dots it with every row of x -- the packed weights are read once,
  nothing is materialized (experts/quant_kernels.py).
- `fp8`, `mxfp4`, more rows ("tile"): the weight is decoded tile by tile (TILE_ELEMS elements) straight into a
  reused buffer in `tile_dtype` (bf16 where the group computes in bf16 and the CPU does bf16 GEMMs natively,
  else fp32; numba's decoders, or without numba one table gather per two stored bytes, then the scales) and the
  library GEMM runs on each tile (oneDNN / MKL) -- the decode is paid once for all the rows. Gate and up rows
  share a tile and one GEMM; up to a few dozen rows the expert stays in the W @ x.t() layout those libraries
  run fastest, transposed once at the end.
- a few pairs (<= TINY_PAIRS, B = 1 decode): a loop over the pairs, nothing sorted or gathered -- also where the
  grouped kernel runs: through it, one token measured slower with the weights out of cache (2-core Zen 5, top-2
  of 64, D=1024 I=512: FP8 1.01 vs 0.73 ms a call after a 128 MiB copy; bench/experts.py --packed 1.37x vs
  1.68x the bf16 experts), though faster with them in cache (0.25 vs 0.52 ms).
- `int8`: torch's weight-only int8 kernel (`torch._weight_int8pack_mm`, per-row scales): no decode at all.

Every decode is exact (a code value times its scale), so in float32 the result equals the dequantized model's
up to summation order. torch has no fused FP8/FP4 CPU GEMM (its CPU `_scaled_mm` quantizes the activations too,
which the 1e-4 protocol forbids); torchao's MX inference GEMMs are cuBLAS/CUTLASS (CUDA; elsewhere it emulates
by dequantizing); kt-kernel's CPU backends take FP8, BF16 or INT4 (not MXFP4) for whole MoE layers in their own
thread pool, not per-slot groups loaded and unloaded at run time (not tried). See the README ("Serving DeepSeek
from the hub files") for the measured cost.

Legend: M = rows sent, P = (row, expert) pairs, D = hidden, I = expert intermediate, c = rows of one expert.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moeray.experts import bf16_numba, quant_kernels
from moeray.experts.group import SMALL_ROWS, SMALL_ROWS_REDUCED, TINY_PAIRS, pair_loop
from moeray.experts.quant_formats import MX_GROUP, e2m1_lut, scale_to_float

FORMATS = ("fp8", "mxfp4", "int8")
WEIGHTS = ("w1", "w3", "w2")
TILE_ELEMS = 1 << 20  # weight elements decoded per tile
# bf16 rows: the grouped kernel while no expert has more rows than this (beyond, the tiles). Measured on a 2-core
# Zen 5 EPYC, one thread, top-2 of 64, D=1024 I=512, grouped vs tiles: max 46 rows (1024 tokens) MXFP4 27.8 vs
# 40.6 ms, FP8 27.4 vs 47.4; max 93 (2048) 49.9 vs 54.8, 47.4 vs 64.5; max 161 (4096) 91.4 vs 86.8, 90.3 vs 92.0
GROUPED_MAX_ROWS = 128


@dataclass(slots=True)
class PackedWeight:
    """One [O, I] projection as stored: codes (fp8 [O, I] | int8 [O, I/2] packed e2m1 | int8 [O, I]) + scale
    (fp8: [ceil(O/bo), ceil(I/bi)] float32 or e8m0; mxfp4: e8m0 [O, I/32]; int8: float32 [O])."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def to(self, device: torch.device) -> PackedWeight:
        return PackedWeight(self.codes.to(device), self.scale.to(device))


@dataclass(slots=True)
class PackedExpert:
    """One routed expert: gate w1 [I, D], up w3 [I, D], down w2 [D, I], each packed."""

    w1: PackedWeight
    w3: PackedWeight
    w2: PackedWeight

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.w3.nbytes + self.w2.nbytes


class PackedExpertGroup:
    """SwiGLU experts for a set of slots, held packed in `fmt` ("fp8" with `block` = (bo, bi), "mxfp4", "int8")
    on `device`, computed in `dtype`."""

    def __init__(self, hidden: int, inter: int, swiglu_limit: float | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                 fmt: str, block: tuple[int, int] | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"packed expert format {fmt!r} is not one of {FORMATS}")
        if fmt == "fp8" and block is None:
            raise ValueError("fp8 experts need the checkpoint's weight_block_size")
        self.hidden, self.inter, self.swiglu_limit = hidden, inter, swiglu_limit
        self.dtype, self.device, self.fmt, self.block = dtype, torch.device(device), fmt, block
        self._layers: dict[int, dict[int, PackedExpert]] = {}
        self._tile_dtype = _tile_dtype(self.dtype, self.device)
        self._small_rows = SMALL_ROWS if self._tile_dtype == torch.float32 else SMALL_ROWS_REDUCED
        self._lut = _pair_lut(fmt, self._tile_dtype).to(self.device) if fmt != "int8" else None
        self._local = threading.local()  # per-thread decode buffers (local transports may call from threads)
        # id(PackedWeight) -> (the weight, quant_kernels.kernel_args of it): numpy views, built once per slot
        self._kargs: dict[int, tuple[PackedWeight, tuple]] = {}
        # layer -> (expert id -> stack index, kernel_args of the stacked w1, w3, w2, which stack indices the
        # grouped kernel can compute [S] bool): what the grouped kernel takes
        self._stacks: dict[int, tuple[dict[int, int], tuple[tuple, tuple, tuple], np.ndarray]] = {}
        # decode-sized calls take the grouped kernel (quant_kernels.grouped_mm) where it runs: its rows' dtype
        self._grouped = self._grouped_rows_dtype()

    def _grouped_rows_dtype(self) -> torch.dtype | None:
        """The dtype the grouped kernel takes the rows in for this group, None where it does not run: the tile
        dtype (bf16 where the group computes in bf16 and the CPU does natively, else float32), on CPU, where
        quant_kernels.grouped_available says the kernel runs for it (bf16 also needs whole dot blocks)."""
        rows = self._tile_dtype
        if self.fmt == "int8" or self.device.type != "cpu" or not quant_kernels.grouped_available(self.fmt, rows):
            return None
        if rows == torch.bfloat16 and not (bf16_numba.shapes_ok(self.inter, self.hidden)
                                           and bf16_numba.shapes_ok(self.hidden, self.inter)):
            return None
        return rows

    # ---- slots ---------------------------------------------------------------------------------------
    def load(self, layer: int, experts: dict[int, PackedExpert]) -> None:
        """Add slots: expert id -> PackedExpert. Replaces a slot already loaded. The layer is restacked (`_set`)."""
        for e, ex in experts.items():
            self._check(layer, e, ex)
        held = dict(self._layers.get(layer, {}))
        held.update({e: PackedExpert(*(getattr(ex, n).to(self.device) for n in WEIGHTS)) for e, ex in experts.items()})
        self._set(layer, held)

    def unload(self, layer: int, expert_ids: list[int]) -> None:
        """Drop slots (for rebalancing and draining). Unknown ids raise KeyError naming them."""
        cur = self._layers.get(layer, {})
        missing = [e for e in expert_ids if e not in cur]
        if missing:
            raise KeyError(f"layer {layer}: experts {missing} are not loaded here (loaded: {sorted(cur)})")
        gone = set(expert_ids)
        self._set(layer, {e: ex for e, ex in cur.items() if e not in gone})

    def _check(self, layer: int, e: int, ex: PackedExpert) -> None:
        """ValueError naming the weight whose codes or scales do not have this group's shapes."""
        d, i = self.hidden, self.inter
        for name, w, shape in (("w1", ex.w1, (i, d)), ("w3", ex.w3, (i, d)), ("w2", ex.w2, (d, i))):
            if tuple(w.codes.shape) != self._codes_shape(shape):
                raise ValueError(f"layer {layer} expert {e} {name}: packed {self.fmt} codes of shape "
                                 f"{tuple(w.codes.shape)}, expected {self._codes_shape(shape)}")
            if tuple(w.scale.shape) != self._scale_shape(shape):
                raise ValueError(f"layer {layer} expert {e} {name}: {self.fmt} scales of shape "
                                 f"{tuple(w.scale.shape)}, expected {self._scale_shape(shape)} (block {self.block})")

    def _set(self, layer: int, held: dict[int, PackedExpert]) -> None:
        """The layer's slots become `held`, restacked: each of w1, w3, w2 as one codes tensor [S, ...] and one
        scales tensor [S, ...] over the slots in id order, every slot holding views of them. So the grouped
        kernels reach every slot from one call, and the bytes held stay the checkpoint's (the copies the slots
        came in are dropped). ValueError, before anything changes, where the slots' codes or scales differ in
        dtype (they could not be stacked)."""
        for name in WEIGHTS:
            kinds = {(getattr(ex, name).codes.dtype, getattr(ex, name).scale.dtype) for ex in held.values()}
            if len(kinds) > 1:
                raise ValueError(f"layer {layer} {name}: the experts' (codes, scales) dtypes differ: "
                                 f"{sorted(map(str, kinds))}; pack every expert of a layer alike")
        for ex in self._layers.pop(layer, {}).values():
            self._forget(ex)
        self._stacks.pop(layer, None)
        if not held:
            return
        ids = sorted(held)
        stacks = {n: PackedWeight(torch.stack([getattr(held[e], n).codes for e in ids]),
                                  torch.stack([getattr(held[e], n).scale for e in ids])) for n in WEIGHTS}
        self._layers[layer] = {e: PackedExpert(*(PackedWeight(stacks[n].codes[s], stacks[n].scale[s])
                                                 for n in WEIGHTS)) for s, e in enumerate(ids)}
        if self.fmt == "int8" or not self._numba_decode(torch.float32):
            return
        args = tuple(quant_kernels.kernel_args(self.fmt, stacks[n].codes, stacks[n].scale, self.block)
                     for n in WEIGHTS)
        self._stacks[layer] = ({e: s for s, e in enumerate(ids)}, args, self._grouped_slots(args))
        for ex in self._layers[layer].values():
            for w in (ex.w1, ex.w3, ex.w2):
                self._kargs[id(w)] = (w, quant_kernels.kernel_args(self.fmt, w.codes, w.scale, self.block))

    def _grouped_slots(self, args: tuple[tuple, tuple, tuple]) -> np.ndarray:
        """[S] bool: which stacked slots the grouped kernel can compute: all, but for MXFP4 only slots whose
        scale bytes all keep bf16 products normal (quant_kernels.mxfp4_scales_in_range: every checkpoint's)."""
        slots = args[0][0].shape[0]
        if self.fmt != "mxfp4":
            return np.ones(slots, dtype=bool)
        return np.array([all(quant_kernels.mxfp4_scales_in_range(a[1][s]) for a in args) for s in range(slots)])

    def _forget(self, ex: PackedExpert) -> None:
        for w in (ex.w1, ex.w3, ex.w2):
            self._kargs.pop(id(w), None)

    def _kernel_args(self, w: PackedWeight) -> tuple | None:
        held = self._kargs.get(id(w))
        return held[1] if held is not None and held[0] is w else None

    def slots(self, layer: int) -> dict[int, int]:
        return {e: s for s, e in enumerate(sorted(self._layers.get(layer, {})))}

    def loaded(self) -> dict[int, list[int]]:
        return {layer: sorted(m) for layer, m in self._layers.items() if m}

    def nbytes(self) -> int:
        """Bytes held: the packed codes and scales of every slot (decode buffers are transient, not counted)."""
        return sum(ex.nbytes for m in self._layers.values() for ex in m.values())

    def packed(self, layer: int, expert: int) -> PackedExpert:
        """The packed weights of one slot (what a move to another actor would carry): copies, since the slot holds
        views of the layer's stacks and pickling a view carries its whole storage (every slot of the layer)."""
        ex = self._layers[layer][expert]
        return PackedExpert(*(PackedWeight(w.codes.clone(), w.scale.clone()) for w in (ex.w1, ex.w3, ex.w2)))

    def _codes_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[0], shape[1] // 2) if self.fmt == "mxfp4" else shape

    def _scale_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        """The stored scales' shape for a weight of `shape` [O, I]: mxfp4 [O, I/32]; fp8 one per block; int8 [O]."""
        if self.fmt == "mxfp4":
            return (shape[0], shape[1] // MX_GROUP)
        if self.fmt == "fp8":
            return (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))
        return (shape[0],)

    # ---- compute -------------------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [M, D]; pairs (pair_rows [P], expert_ids [P], weights [P]) -> out [M, D] in `out_dtype` (default
        x's) on x's device: out[m] = sum over pairs p with pair_rows[p] == m of weights[p] * expert(x[m])."""
        held = self._layers.get(layer)
        if not held:
            raise KeyError(f"layer {layer} has no experts loaded here (loaded layers: {sorted(self._layers)})")
        xs = x.to(self.device, self.dtype)
        if 0 < pair_rows.numel() <= TINY_PAIRS:  # B = 1 decode: the pair loop ExpertGroup uses
            out = pair_loop(layer, held, xs, pair_rows, expert_ids, weights, self.hidden,
                            lambda xr, e: self._expert(xr, held[e]))
            return out.to(x.device, out_dtype or x.dtype)
        out = torch.zeros(xs.shape[0], self.hidden, dtype=self.dtype, device=self.device)
        if pair_rows.numel() == 0:
            return out.to(x.device, out_dtype or x.dtype)
        ids = expert_ids.to(self.device)
        missing = sorted(set(torch.unique(ids).tolist()) - set(held))
        if missing:
            raise KeyError(f"layer {layer}: experts {missing} are not loaded here (loaded: {sorted(held)})")
        order = torch.argsort(ids, stable=True)
        uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
        rows_sorted = pair_rows.to(self.device)[order]
        stack = self._stacks.get(layer)  # (read once: a load from another thread replaces it)
        slots = self._grouped_call(stack, uniq, counts)
        if slots is not None:
            out = self._grouped_mm(stack, xs, rows_sorted, weights.to(self.device)[order], slots, counts.numpy())
            return out.to(x.device, out_dtype or x.dtype)
        w_sorted = weights.to(self.device, self.dtype)[order]
        xs_sorted = xs.index_select(0, rows_sorted)  # [P, D], pairs grouped by expert
        ys, start = [], 0
        for e, c in zip(uniq.tolist(), counts.tolist()):
            ys.append(self._expert(xs_sorted[start:start + c], held[e]))  # [c, D]
            start += c
        y = ys[0].contiguous() if len(ys) == 1 else torch.cat(ys)  # [P, D]
        # one weighted scatter for all the pairs (index_add_ per expert measured 130 us each in bf16)
        out.index_add_(0, rows_sorted, y.mul_(w_sorted[:, None]))
        return out.to(x.device, out_dtype or x.dtype)

    def _grouped_call(self, stack: tuple | None, ids: torch.Tensor, counts: torch.Tensor) -> np.ndarray | None:
        """The indices in `stack` (the layer's `_stacks` entry) of the experts hit (ids, in order) where this call
        takes the grouped kernel, else
        None. It does where the kernel runs for this group (`_grouped`), no expert has more rows than the limit
        (bf16 rows: GROUPED_MAX_ROWS; float32: the fused GEMV's FUSED_MAX_ROWS_F32, the same arithmetic), every
        expert hit is one the kernel can compute
        (`_grouped_slots`), and for fp8 only where this thread keeps denormals (its exact decode needs them)."""
        limit = GROUPED_MAX_ROWS if self._grouped == torch.bfloat16 else quant_kernels.FUSED_MAX_ROWS_F32
        if not self._grouped or int(counts.max()) > limit or stack is None:
            return None
        if self.fmt == "fp8" and not quant_kernels.denormals_kept():
            return None
        index, _, ok = stack
        slots = np.array([index[e] for e in ids.tolist()], dtype=np.int64)
        return slots if ok[slots].all() else None

    def _grouped_mm(self, stack: tuple, xs: torch.Tensor, rows_sorted: torch.Tensor, w_sorted: torch.Tensor,
                    slots: np.ndarray, counts: np.ndarray) -> torch.Tensor:
        """Every expert hit, each on its own rows, in three calls of the grouped kernel (w1 and w3 into the two
        halves of h [P, 2I], w2 after the activation): ExpertGroup._grouped_mm over the packed stacks, float32
        sums, activation and weighted scatter. bf16 rows: x and the activation rounded to bf16 for the GEMMs, the
        output once at the end (the tile path rounds h to bf16 too: one rounding fewer here); float32 rows:
        exact up to summation order. -> [M, D] in the group's dtype."""
        a1, a3, a2 = stack[1]
        starts = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        x = xs.index_select(0, rows_sorted).to(self._grouped)  # [P, D], pairs grouped by expert
        p, i = x.shape[0], self.inter
        h = np.empty((p, 2 * i), dtype=np.float32)
        quant_kernels.grouped_mm(self.fmt, x, starts, slots, a1, h, 0)
        quant_kernels.grouped_mm(self.fmt, x, starts, slots, a3, h, i)
        ht = torch.from_numpy(h)
        act = self._act(ht[:, :i], ht[:, i:]).to(self._grouped)  # [P, I]
        y = np.empty((p, self.hidden), dtype=np.float32)
        quant_kernels.grouped_mm(self.fmt, act, starts, slots, a2, y, 0)
        out = torch.zeros(xs.shape[0], self.hidden, dtype=torch.float32, device=self.device)
        out.index_add_(0, rows_sorted, torch.from_numpy(y).mul_(w_sorted.float()[:, None]))
        return out.to(self.dtype)

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
