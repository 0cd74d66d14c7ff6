"""Routed experts as a group of (layer, expert) slots, computed with grouped GEMMs.

An ExpertGroup holds the SwiGLU weights of any subset of slots, on its device in its dtype. `forward` takes
the rows an actor was sent and the (row, expert, weight) pairs to compute, and returns the weighted sum per row.
Two ways to compute, chosen per call by the shape of the work (`use_batched`):
- decode-sized calls touching most slots: one bmm pair over every slot of the layer, each slot's rows padded
  to the busiest slot's count (no Python loop; the padding is nearly free since small-row GEMMs are bound by
  reading the weights);
- otherwise (prefill, or few experts hit) a loop over the experts hit, one GEMM pair each.
Per expert with c rows, the GEMMs take the form MKL/oneDNN runs fastest on CPU: `x @ W.t()` in general, but
`(W @ x.t()).t()` for few rows (c <= SMALL_ROWS in fp32, measured up to 2x faster at D=1024, I=512, c = 2 or
3, one thread; c <= SMALL_ROWS_REDUCED in bf16). All forms compute the same dot products; the summation order
inside MKL may differ (last-bit differences).

Legend: M = rows sent, P = (row, expert) pairs, D = hidden, I = expert intermediate, S = slots in a layer.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from moeray.experts import bf16_numba

SMALL_ROWS = 3  # up to this many rows per expert, compute W @ x.t() (see the module docstring)
SMALL_ROWS_REDUCED = 32  # the same in bf16/fp16: oneDNN's W @ x.t() is 1.5-2x x @ W.t() up to ~32 rows
BATCHED_MAX_ROWS = 16  # the all-slots bmm path: at most this many rows per slot hit on average ...
BATCHED_MIN_HIT = 0.75  # ... and at least this fraction of the layer's slots hit (the others' weights are read)
TINY_PAIRS = 4  # up to this many (row, expert) pairs (B = 1 decode): a plain loop over the pairs, nothing sorted
GROUPED_MAX_ROWS = 32  # bf16 on an AVX512-BF16 CPU: the grouped kernel while no expert has more rows than this


@functools.cache
def mkldnn_packing_available() -> bool:
    """Whether this torch can pre-pack bf16 weights for oneDNN on this CPU: a CPU build with mkldnn, and a CPU
    whose bf16 path oneDNN supports (AVX512 BW/VL/DQ or AVX-NE-CONVERT). On an AVX2-only CPU the reorder raises
    ("bf16 path needs the cpu support ..."): bf16 weights stay plain there."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")):
        return False
    supported = getattr(ops, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else True


def use_batched(counts: list[int]) -> bool:
    """Whether one bmm over every slot (padded to the busiest) beats a loop over the slots hit: decode-sized
    calls that touch most slots. The loop stays for big per-expert batches (prefill) and few experts (B = 1)."""
    hit = sum(1 for c in counts if c)
    return len(counts) > 1 and hit >= BATCHED_MIN_HIT * len(counts) and sum(counts) <= BATCHED_MAX_ROWS * hit


def pair_loop(layer: int, held, xs: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor, hidden: int, expert) -> torch.Tensor:
    """A few pairs (<= TINY_PAIRS, B = 1 decode): each pair's expert(x row [1, D], expert id) on its row,
    accumulated in place -> [M, D] in xs's dtype. No sort, bincount or gather: at this size each of those is a
    dispatch costing as much as the arithmetic. Same dot products as the loop over slots; the weight multiplies
    inside the accumulation (last-bit differences). One row sent (every pair on row 0): the first pair's output
    becomes the accumulator, no zeros and no row slices. `held`: the expert ids loaded (KeyError names others)."""
    ids = expert_ids.tolist()
    missing = sorted({e for e in ids if e not in held})
    if missing:
        raise KeyError(f"layer {layer}: experts {missing} are not loaded here (loaded: {sorted(held)})")
    one_row = xs.shape[0] == 1
    rows = [0] * len(ids) if one_row else pair_rows.tolist()
    out = None if one_row else torch.zeros(xs.shape[0], hidden, dtype=xs.dtype, device=xs.device)
    for r, e, w in zip(rows, ids, weights.tolist(), strict=True):
        y = expert(xs if one_row else xs[r:r + 1], e)
        if out is None:
            out = y.mul_(w)
        elif one_row:
            out.add_(y, alpha=w)
        else:
            out[r:r + 1].add_(y, alpha=w)
    return out


class ExpertGroup:
    """SwiGLU experts for a set of slots. Weights: gate_up [2I, D] and down [D, I] per slot, held on `device`
    in `dtype` (the compute dtype; float32 is exact against the reference)."""

    def __init__(self, hidden: int, inter: int, swiglu_limit: float | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.hidden, self.inter = hidden, inter
        self.swiglu_limit = swiglu_limit
        self.dtype = dtype
        self.device = torch.device(device)
        # layer -> (expert id -> slot index, gate_up [S, 2I, D], down [S, D, I])
        self._layers: dict[int, tuple[dict[int, int], torch.Tensor, torch.Tensor]] = {}
        # layer -> expert id -> slot index as a tensor [max id + 1], -1 where not held (built on load, not per call)
        self._slot_tables: dict[int, torch.Tensor] = {}
        # bf16 on CPU: each slot's weights also pre-packed for oneDNN (1.6x the plain GEMV on weights out of
        # cache, measured with AMX), used by the per-expert loop; layer -> slot -> (gate_up, down), built lazily
        self._pack = dtype == torch.bfloat16 and self.device.type == "cpu" and mkldnn_packing_available()
        # bf16 on a CPU with AVX512-BF16: decode-sized calls take experts/bf16_numba's grouped kernel
        self._grouped = (dtype == torch.bfloat16 and self.device.type == "cpu" and bf16_numba.available()
                         and bf16_numba.shapes_ok(2 * inter, hidden) and bf16_numba.shapes_ok(hidden, inter))
        self._packed: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---- slots ---------------------------------------------------------------------------------------
    def load(self, layer: int, experts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add slots: expert id -> (gate_up [2I, D], down [D, I]). Replaces a slot already loaded."""
        cur = dict(self.slots(layer).items()) if layer in self._layers else {}
        weights = {e: self._weights_of(layer, e) for e in cur}
        for e, (gu, dn) in experts.items():
            if gu.shape != (2 * self.inter, self.hidden) or dn.shape != (self.hidden, self.inter):
                raise ValueError(f"layer {layer} expert {e}: expected gate_up {(2 * self.inter, self.hidden)} and "
                                 f"down {(self.hidden, self.inter)}, got {tuple(gu.shape)} and {tuple(dn.shape)}")
            weights[e] = (gu.to(self.device, self.dtype), dn.to(self.device, self.dtype))
        self._set(layer, weights)

    def unload(self, layer: int, expert_ids: list[int]) -> None:
        """Drop slots (for rebalancing and draining). Unknown ids raise KeyError naming them."""
        cur = self.slots(layer)
        missing = [e for e in expert_ids if e not in cur]
        if missing:
            raise KeyError(f"layer {layer}: experts {missing} are not loaded here (loaded: {sorted(cur)})")
        keep = {e: self._weights_of(layer, e) for e in cur if e not in set(expert_ids)}
        self._set(layer, keep)

    def slots(self, layer: int) -> dict[int, int]:
        return self._layers[layer][0] if layer in self._layers else {}

    def loaded(self) -> dict[int, list[int]]:
        """layer -> sorted expert ids held."""
        return {layer: sorted(m) for layer, (m, _, _) in self._layers.items() if m}

    def nbytes(self) -> int:
        """Bytes of expert weights held: the slots, plus the oneDNN-packed copies made so far (bf16 on CPU: a slot
        the per-expert loop has used is held twice, plain for the bmm path and packed for the loop)."""
        packed = sum(a.nbytes + b.nbytes for slots in self._packed.values() for a, b in slots.values())
        return packed + sum(gu.nbytes + dn.nbytes for _, gu, dn in self._layers.values())

    def _weights_of(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        m, gu, dn = self._layers[layer]
        return gu[m[e]], dn[m[e]]

    def _set(self, layer: int, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not weights:
            self._layers.pop(layer, None)
            self._slot_tables.pop(layer, None)
            return
        ids = sorted(weights)
        gu = torch.stack([weights[e][0] for e in ids])
        dn = torch.stack([weights[e][1] for e in ids])
        self._layers[layer] = ({e: i for i, e in enumerate(ids)}, gu, dn)
        table = torch.full((ids[-1] + 1,), -1, dtype=torch.long, device=self.device)
        table[ids] = torch.arange(len(ids), device=self.device)
        self._slot_tables[layer] = table
        self._packed.pop(layer, None)

    # ---- compute -------------------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [M, D] (any dtype, any device); pairs (pair_rows [P] into x, expert_ids [P], weights [P]) -> out
        [M, D] on x's device in `out_dtype` (default: x's dtype) with
        out[m] = sum over pairs p with pair_rows[p] == m of weights[p] * expert_{expert_ids[p]}(x[m]).
        Computed in the group's dtype on its device."""
        if layer not in self._layers:
            raise KeyError(f"layer {layer} has no experts loaded here (loaded layers: {sorted(self._layers)})")
        out_dtype = out_dtype or x.dtype
        if x.device != self.device:  # (moves skipped when they are no-ops: each costs a dispatch at decode sizes)
            pair_rows, expert_ids, weights = pair_rows.to(self.device), expert_ids.to(self.device), weights.to(
                self.device)
        xs = x if x.dtype == self.dtype and x.device == self.device else x.to(self.device, self.dtype)
        out = self._forward(layer, xs, pair_rows, expert_ids, weights)
        return out if out.dtype == out_dtype and out.device == x.device else out.to(x.device, out_dtype)

    def _forward(self, layer: int, xs: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """`forward` with every input on the group's device, xs in its dtype -> [M, D] in its dtype."""
        _, gu, dn = self._layers[layer]
        if 0 < pair_rows.numel() <= TINY_PAIRS:
            return self._tiny(layer, xs, pair_rows, expert_ids, weights)
        out = torch.zeros(xs.shape[0], self.hidden, dtype=self.dtype, device=self.device)
        if pair_rows.numel() == 0:
            return out
        slots = self._slot_index(layer, expert_ids)  # [P]
        order = torch.argsort(slots, stable=True)
        counts_t = torch.bincount(slots, minlength=gu.shape[0])  # [S]
        counts = counts_t.tolist()
        if self._grouped and max(counts) <= GROUPED_MAX_ROWS:
            return self._grouped_mm(xs, pair_rows[order], weights[order], counts, gu, dn)
        rows_sorted, w_sorted = pair_rows[order], weights[order].to(self.dtype)
        if use_batched(counts):
            y = self._batched(xs, rows_sorted, slots[order], counts_t, max(counts), gu, dn)  # [P, D]
            return out.index_add_(0, rows_sorted, y.mul_(w_sorted[:, None]))
        start = 0
        for s, c in enumerate(counts):
            if c == 0:
                continue
            rows = rows_sorted[start:start + c]
            xr = xs.index_select(0, rows)
            y = self._slot_expert(layer, s, xr)
            out.index_add_(0, rows, y.mul_(w_sorted[start:start + c, None]))
            start += c
        return out

    def _tiny(self, layer: int, xs: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
        held = self._layers[layer][0]
        return pair_loop(layer, held, xs, pair_rows, expert_ids, weights, self.hidden,
                         lambda xr, e: self._slot_expert(layer, held[e], xr))

    def _slot_expert(self, layer: int, s: int, xs: torch.Tensor) -> torch.Tensor:
        """Slot s's expert on rows xs [c, D] -> [c, D]: its oneDNN-packed copy (bf16 on CPU) or the plain weights."""
        if self._pack:
            return self._expert_packed(xs, *self._packed_slot(layer, s))
        _, gu, dn = self._layers[layer]
        return self._expert(xs, gu[s], dn[s])

    def _batched(self, xs: torch.Tensor, rows_sorted: torch.Tensor, slots_sorted: torch.Tensor,
                 counts: torch.Tensor, width: int, gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """Every slot of the layer at once: pairs sorted by slot -> outputs [P, D] in that order. Each slot's
        rows are padded to `width` columns: xp [S, D, C]; h = gate_up @ xp [S, 2I, C]; y = down @ act [S, D, C]."""
        num_slots = gu.shape[0]
        first = torch.cumsum(counts, 0) - counts  # [S] first sorted pair of each slot
        col = torch.arange(slots_sorted.numel(), device=xs.device) - first[slots_sorted]  # [P] column in its slot
        xp = xs.new_zeros(num_slots, width, self.hidden)
        xp[slots_sorted, col] = xs.index_select(0, rows_sorted)
        h = torch.bmm(gu, xp.transpose(1, 2))  # [S, 2I, C]
        gate, up = h.split(self.inter, dim=1)
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        act = F.silu(gate).mul_(up)  # [S, I, C]
        y = torch.bmm(dn, act)  # [S, D, C]
        return y.transpose(1, 2)[slots_sorted, col]  # [P, D]

    def _grouped_mm(self, xs: torch.Tensor, rows_sorted: torch.Tensor, w_sorted: torch.Tensor, counts: list[int],
                    gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """Every slot hit, each on its own rows, in two calls of the grouped bf16 kernel (gate/up, then down),
        float32 accumulation and a float32 weighted scatter, rounded to bf16 once at the end."""
        hit = [s for s, c in enumerate(counts) if c]
        starts = np.zeros(len(hit) + 1, dtype=np.int64)
        np.cumsum([counts[s] for s in hit], out=starts[1:])
        slots = np.array(hit, dtype=np.int64)
        h = bf16_numba.grouped_mm(xs.index_select(0, rows_sorted), starts, slots, gu)  # [P, 2I] float32
        gate, up = h.split(self.inter, dim=1)
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        act = F.silu(gate).mul_(up).to(torch.bfloat16)  # [P, I]
        y = bf16_numba.grouped_mm(act, starts, slots, dn)  # [P, D] float32
        out = torch.zeros(xs.shape[0], self.hidden, dtype=torch.float32, device=self.device)
        out.index_add_(0, rows_sorted, y.mul_(w_sorted.float()[:, None]))
        return out.to(self.dtype)

    def _packed_slot(self, layer: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self._packed.setdefault(layer, {})
        w = slots.get(s)
        if w is None:
            _, gu, dn = self._layers[layer]
            w = slots[s] = (torch.ops.mkldnn._reorder_linear_weight(gu[s], 1),
                            torch.ops.mkldnn._reorder_linear_weight(dn[s], 1))
        return w

    def _expert_packed(self, xs: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """`_expert` over pre-packed bf16 weights (oneDNN)."""
        h = torch.ops.mkldnn._linear_pointwise(xs, gu, None, "none", [], "")  # [c, 2I]
        gate, up = h.split(self.inter, dim=-1)
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return torch.ops.mkldnn._linear_pointwise(F.silu(gate).mul_(up), dn, None, "none", [], "")  # [c, D]

    def _expert(self, xs: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """One SwiGLU expert on its rows: xs [c, D], gate_up [2I, D], down [D, I] -> [c, D] (a new tensor)."""
        small = xs.shape[0] <= (SMALL_ROWS if self.dtype == torch.float32 else SMALL_ROWS_REDUCED)
        # small: MKL is fast on W @ (a transposed view); the copies back to row-major keep the next ops fast too
        h = torch.mm(gu, xs.t()).t().contiguous() if small else torch.mm(xs, gu.t())  # [c, 2I]
        gate, up = h.split(self.inter, dim=-1)
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        act = F.silu(gate).mul_(up)  # [c, I], row-major
        return torch.mm(dn, act.t()).t().contiguous() if small else torch.mm(act, dn.t())  # [c, D]

    def _slot_index(self, layer: int, expert_ids: torch.Tensor) -> torch.Tensor:
        """expert_ids [P] -> slot indices [P]; KeyError naming the experts not held here."""
        table = self._slot_tables[layer]
        try:
            slots = table[expert_ids]
        except IndexError:  # an id beyond the highest held
            slots = None
        if slots is not None and not bool(((slots < 0) | (expert_ids < 0)).any()):
            return slots
        held = sorted(self._layers[layer][0])
        bad = sorted({int(e) for e in expert_ids.tolist() if not 0 <= e < table.numel() or table[e] < 0})
        raise KeyError(f"layer {layer}: experts {bad} are not loaded here (loaded: {held})")
