"""Routed experts as a group of (layer, expert) slots, computed with one GEMM pair per expert hit.

An ExpertGroup holds the SwiGLU weights of any subset of slots. `forward` takes the rows an actor was sent
and the (row, expert, weight) pairs to compute, and returns the weighted sum per row. Tokens are gathered
per expert with index ops: the only Python loop is over the experts hit in this call.

Per expert hit with c rows, the GEMMs take the form MKL runs fastest on CPU: `x @ W.t()` in general, but
`(W @ x.t()).t()` for c <= SMALL_ROWS, which MKL runs up to 2x faster (measured: D=1024, I=512, c = 2 or 3,
fp32, one thread). Decode batches mostly give an expert one to three rows. Both forms compute the same dot
products; the summation order inside MKL may differ (last-bit differences).

Legend: M = rows sent, P = (row, expert) pairs, D = hidden, I = expert intermediate, S = slots in a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_ROWS = 3  # up to this many rows per expert, compute W @ x.t() (see the module docstring)


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
        return sum(gu.nbytes + dn.nbytes for _, gu, dn in self._layers.values())

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
        out = self._forward(layer, x.to(self.device, self.dtype), pair_rows.to(self.device),
                            expert_ids.to(self.device), weights.to(self.device))
        return out.to(x.device, out_dtype)

    def _forward(self, layer: int, xs: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """`forward` with every input on the group's device, xs in its dtype -> [M, D] in its dtype."""
        _, gu, dn = self._layers[layer]
        out = torch.zeros(xs.shape[0], self.hidden, dtype=self.dtype, device=self.device)
        if pair_rows.numel() == 0:
            return out
        slots = self._slot_index(layer, expert_ids)  # [P]
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=gu.shape[0]).tolist()
        rows_sorted, w_sorted = pair_rows[order], weights[order].to(self.dtype)
        start = 0
        for s, c in enumerate(counts):
            if c == 0:
                continue
            rows = rows_sorted[start:start + c]
            y = self._expert(xs.index_select(0, rows), gu[s], dn[s])  # [c, D]
            out.index_add_(0, rows, y.mul_(w_sorted[start:start + c, None]))
            start += c
        return out

    def _expert(self, xs: torch.Tensor, gu: torch.Tensor, dn: torch.Tensor) -> torch.Tensor:
        """One SwiGLU expert on its rows: xs [c, D], gate_up [2I, D], down [D, I] -> [c, D] (a new tensor)."""
        small = xs.shape[0] <= SMALL_ROWS
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
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo >= 0 and hi < table.numel():
            slots = table[expert_ids]
            if int(slots.min()) >= 0:
                return slots
        held = sorted(self._layers[layer][0])
        bad = sorted({int(e) for e in expert_ids.tolist() if not 0 <= e < table.numel() or table[e] < 0})
        raise KeyError(f"layer {layer}: experts {bad} are not loaded here (loaded: {held})")
