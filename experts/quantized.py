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
The per-expert paths below are experts/quant_tiles.py's (a mixin of this group); the grouped kernels are
experts/quant_grouped.py's.
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

import threading
from dataclasses import dataclass

import numpy as np
import torch

from moeray.experts import bf16_numba, quant_kernels
from moeray.experts.group import SMALL_ROWS, SMALL_ROWS_REDUCED, TINY_PAIRS, pair_loop
from moeray.experts.quant_formats import MX_GROUP
from moeray.experts.quant_tiles import PerExpertPaths, _pair_lut, _tile_dtype

FORMATS = ("fp8", "mxfp4", "int8")
WEIGHTS = ("w1", "w3", "w2")
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


class PackedExpertGroup(PerExpertPaths):
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
