"""Expert-call failover, part 2: one call's state (sends, per-actor tasks, the call) and pair planning over the
live replicas (no Ray). The state machine is moeray.engine.failover (which re-exports these names)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from moeray.engine.failover_health import Future
from moeray.router.dispatch import ActorBatch, live_replicas
from moeray.router.table import NoReplicaError


# ---- one call --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Send:
    """One actor call in flight for some of a task's pairs."""

    batch: ActorBatch  # token_ids in layer rows
    pairs: torch.Tensor  # [p] indices into the task's pairs
    future: Future
    sent_at: float
    hedge_at: float  # when to send a copy elsewhere if still unanswered (backs off after each copy)
    hedges: int = 0
    answered_at: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Task:
    """One target actor's share of the layer: pairs (layer row, expert id, weight). Settled when every pair is
    covered by an accepted answer or lost (no replica could compute it)."""

    rows: torch.Tensor  # [P] layer rows of the pairs
    expert_ids: torch.Tensor  # [P]
    weights: torch.Tensor  # [P]
    sends: list[Send]
    first_sent_at: float
    covered: torch.Tensor = None  # [P] bool
    lost: torch.Tensor = None  # [P] bool
    accepted: list[tuple[ActorBatch, torch.Tensor]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # why pairs were lost
    note: str | None = None  # the last fault an attempt met
    faulted: bool = False
    transient_retries: int = 0
    recoveries: int = 0
    hedges: int = 0
    answered_at: float = 0.0
    bad: set[int] = field(default_factory=set)  # actors whose own code failed these pairs
    tried: set[int] = field(default_factory=set)  # actors sent some of these pairs (hedges go elsewhere)
    settled: bool = False  # kept by refresh(): every pair covered or lost
    recheck: bool = False  # some pairs may be in flight nowhere (a send failed or a duplicate was dropped)

    def __post_init__(self) -> None:
        p = self.rows.numel()
        self.covered = torch.zeros(p, dtype=torch.bool)
        self.lost = torch.zeros(p, dtype=torch.bool)

    def refresh(self) -> None:
        self.settled = bool((self.covered | self.lost).all())


@dataclass(slots=True)
class ExpertCall:
    layer: int
    x: torch.Tensor  # [T, D] the layer input (kept for hedges and recoveries)
    tasks: list[Task]
    deadline: float
    submitted_at: float
    failed: list[tuple[torch.Tensor, str]] = field(default_factory=list)  # (layer rows, why) failed at submit


def plan_pairs(rows: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
               layer_slots: Sequence[Sequence[int]], excluded: Collection[int],
               layer: int) -> list[tuple[ActorBatch, torch.Tensor]]:
    """Plan pairs (rows [P] in layer rows, expert_ids [P], weights [P]) over the live replicas: pair p goes to
    replica rows[p] % n of its expert (the rule of router.dispatch). -> (batch, indices of its pairs [p]) per
    actor. Raises NoReplicaError."""
    if rows.numel() == 0:
        return []
    replica_ids, num_live = live_replicas(layer_slots, excluded)  # [E, R], [E]
    n = num_live[expert_ids]
    if bool((n == 0).any()):
        e = int(expert_ids[n == 0][0])
        raise NoReplicaError(layer, e, layer_slots[e])
    actor = replica_ids[expert_ids, rows % n]  # [P]
    order = torch.argsort(actor, stable=True)
    actors, counts = torch.unique_consecutive(actor[order], return_counts=True)
    out = []
    for a, idx in zip(actors.tolist(), torch.split(order, counts.tolist()), strict=True):
        token_ids, pair_rows = torch.unique(rows[idx], sorted=True, return_inverse=True)
        out.append((ActorBatch(a, token_ids, pair_rows, expert_ids[idx], weights[idx]), idx))
    return out


def servable(expert_ids: torch.Tensor, layer_slots: Sequence[Sequence[int]], excluded: Collection[int]) -> torch.Tensor:
    """[P] bool: pairs whose expert has a replica outside `excluded`."""
    _, num_live = live_replicas(layer_slots, excluded)
    return num_live[expert_ids] > 0
