"""How the engine reaches the routed experts: `ExpertTransport`. `LocalTransport` runs expert groups in
process; the Ray transport (moeray.actors.transport) calls expert-group actors. Same engine code for both.

A call is split in `submit` (dispatch, start the work) and `wait` (combine) so the engine can compute the
shared expert and other micro-batches' attention while the experts run.
Legend: N = tokens, K = experts per token, D = hidden.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from moeray.common.errors import ExpertUnavailableError
from moeray.experts.group import ExpertGroup
from moeray.router.dispatch import combine, gather_inputs, plan_dispatch
from moeray.router.table import RoutingTable


class ExpertRowsFailed(ExpertUnavailableError):
    """Some rows of a layer could not be computed (no live replica, or no answer in time). `output` [N, D] holds
    every other row's result (zeros for the failed ones); `rows` [F] are the failed layer rows. The engine fails
    only the requests owning them and keeps going."""

    def __init__(self, message: str, output: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__(message)
        self.output, self.rows = output, rows


class ExpertTransport(Protocol):
    overlaps: bool  # does `submit` return before the experts finish (so micro-batches can hide the call)?

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Any:
        """Start the routed experts of `layer` on x [N, D] with ids/weights [N, K]; returns a handle."""

    def wait(self, handle: Any) -> torch.Tensor:
        """The weighted routed-expert output [N, D] of a submitted call; raises ExpertRowsFailed (carrying the
        other rows' output) when some rows could not be computed."""

    def set_table(self, table: RoutingTable) -> None:
        """Use a new routing table from the next call on."""


class ExpertLoad:
    """Per-(layer, expert) routed-pair counts since the last `take()`: the load history EPLB balances.

    `add` only keeps the step's ids; they are counted (one cat and one bincount per layer) every FOLD calls and
    at `take`: three dispatches per MoE layer per step saved at decode sizes, memory bounded by FOLD steps.
    `take` may run on another thread than `add` (the gating actor's status calls): a lock keeps every id counted
    once."""

    FOLD = 64

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self._pending: dict[int, list[torch.Tensor]] = {}
        self._num_experts: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, layer: int, ids: torch.Tensor, num_experts: int) -> None:
        with self._lock:
            pending = self._pending.setdefault(layer, [])
            pending.append(ids)
            self._num_experts[layer] = num_experts
            if len(pending) >= self.FOLD:
                self._fold(layer)

    def _fold(self, layer: int) -> None:
        pending = self._pending.pop(layer, None)
        if not pending:
            return
        ids = torch.cat([p.reshape(-1) for p in pending])
        c = torch.bincount(ids, minlength=self._num_experts[layer])
        cur = self.counts.get(layer)
        self.counts[layer] = c if cur is None else cur + c

    def take(self) -> dict[int, list[int]]:
        with self._lock:
            for layer in list(self._pending):
                self._fold(layer)
            counts, self.counts = self.counts, {}
        return {layer: c.tolist() for layer, c in counts.items()}


class LocalTransport:
    """Expert groups in this process, keyed by actor id as in the routing table."""

    overlaps = False

    def __init__(self, groups: dict[int, ExpertGroup], table: RoutingTable) -> None:
        self.groups, self.table = groups, table
        self.load = ExpertLoad()
        # one group behind every actor id (what a transport-local deployment builds, local_expert_groups): no
        # dispatch plan, one call per layer; it must hold every expert the table routes to
        self._only = next(iter(groups.values())) if len({id(g) for g in groups.values()}) == 1 else None
        self._rows: dict[tuple[int, int], torch.Tensor] = {}  # (N, K) -> pair rows [N * K] (built once per shape)

    def set_table(self, table: RoutingTable) -> None:
        self.table = table

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.load.add(layer, ids, self.table.num_experts)
        if self._only is not None:
            n, k = ids.shape
            rows = self._rows.get((n, k))
            if rows is None or rows.device != x.device:
                rows = self._rows[(n, k)] = torch.arange(n, device=x.device).repeat_interleave(k)  # [N * K]
            return self._only.forward(layer, x, rows, ids.reshape(-1), weights.reshape(-1))
        batches = plan_dispatch(ids, weights, self.table.layer_slots(layer), layer=layer)
        outs = [self.groups[b.actor_id].forward(layer, gather_inputs(x, b), b.pair_rows, b.slot_ids, b.weights)
                for b in batches]
        return combine(x.shape[0], x.shape[1], batches, outs, dtype=x.dtype)  # the serving dtype (fp32: exact)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


def local_expert_groups(table: RoutingTable, make_group: Callable[[], Any],
                        load_into: Callable[[Any, dict[int, list[int]]], None]) -> dict[int, Any]:
    """In one process the table's expert groups are one group holding every slot, registered under each actor
    id (LocalTransport then makes one call per layer). make_group() -> an empty group; load_into(group,
    layer -> expert ids) fills it."""
    slots: dict[int, set[int]] = {}
    for a in table.actor_ids:
        for layer, experts in table.actor_slots(a).items():
            slots.setdefault(layer, set()).update(experts)
    group = make_group()
    load_into(group, {layer: sorted(e) for layer, e in slots.items()})
    return {a: group for a in table.actor_ids}
