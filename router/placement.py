"""Expert placement, DeepSeek-EPLB style: replicate hot experts, then pack replicas onto actors evenly.

Every MoE layer has S = E + num_redundant physical slots spread over G actors, S / G per actor. From a
measured load per (layer, expert) — routed token-choices over some window — `rebalance`
1. gives each expert one replica and every redundant slot to the expert with the highest load per replica
   (never more replicas than actors: two copies on one actor would not split anything),
2. packs each layer's replicas onto the G actors, heaviest first, each onto the lightest actor that still has
   room and does not already hold that expert, so that actors carry near-equal load and exactly S / G slots,
3. derives the maps: `phy2log` (expert held by each physical slot), `log2phy` (slots of each expert),
   `logcnt` (replicas per expert); physical slot s lives on actor `actor_ids[s // (S / G)]`.
A routed token-choice of an expert with n replicas is assumed to cost each of them 1/n (dispatch splits an
expert's tokens evenly over its replicas). This is EPLB's global policy: no node-level hierarchy.

Legend: L = MoE layers, E = experts per layer, S = physical slots per layer, G = actors, X = most replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeray.router.table import RoutingTable


@dataclass(frozen=True, slots=True, eq=False)
class Placement:
    """Where every physical replica of every (layer, expert) lives. Tensors are int64 on cpu."""

    phy2log: torch.Tensor  # [L, S] expert held by each physical slot
    log2phy: torch.Tensor  # [L, E, X] physical slots of each expert, ascending, padded with -1
    logcnt: torch.Tensor  # [L, E] replicas per expert (>= 1)
    layer_ids: tuple[int, ...]  # [L] decoder-layer index of each row
    actor_ids: tuple[int, ...]  # [G] actor holding slots [g * S/G, (g + 1) * S/G)

    @property
    def slots_per_actor(self) -> int:
        return self.phy2log.shape[1] // len(self.actor_ids)

    def phy2actor(self) -> torch.Tensor:
        """[S] actor id holding each physical slot (the same in every layer)."""
        group = torch.arange(self.phy2log.shape[1]) // self.slots_per_actor  # [S]
        return torch.tensor(self.actor_ids, dtype=torch.long)[group]

    def to_table(self, version: int) -> RoutingTable:
        """The routing table this placement implies: expert e of a layer -> actors of its physical slots."""
        phy2actor = self.phy2actor().tolist()  # [S]
        replicas = tuple(
            tuple(tuple(phy2actor[s] for s in slots if s >= 0) for slots in layer.tolist())
            for layer in self.log2phy
        )
        return RoutingTable(version, self.layer_ids, self.log2phy.shape[1], replicas)


def rebalance(
    load: torch.Tensor,
    num_groups: int,
    num_redundant: int,
    *,
    layer_ids: Sequence[int] | None = None,
    actor_ids: Sequence[int] | None = None,
) -> Placement:
    """load [L, E] (non-negative, e.g. routed token-choices per expert) -> a balanced Placement.

    Each of `num_groups` actors gets (E + num_redundant) / num_groups slots per layer. `layer_ids` default to
    0..L-1 and `actor_ids` to 0..G-1.
    """
    # 1. validate
    load = _check_load(load)
    num_layers, num_experts = load.shape
    num_phy = num_experts + num_redundant
    layer_ids = tuple(range(num_layers)) if layer_ids is None else tuple(layer_ids)
    actor_ids = tuple(range(num_groups)) if actor_ids is None else tuple(actor_ids)
    _check_shape(num_experts, num_groups, num_redundant, len(layer_ids), num_layers, actor_ids)

    # 2. replica counts, 3. packing, 4. inverse map
    logcnt = replicate_experts(load, num_phy, max_replicas=num_groups)  # [L, E]
    phy2log = torch.stack([
        pack_replicas(load[i], logcnt[i], num_groups) for i in range(num_layers)
    ])  # [L, S]
    log2phy = invert(phy2log, num_experts, int(logcnt.max()))  # [L, E, X]
    return Placement(phy2log, log2phy, logcnt, layer_ids, actor_ids)


def default_redundant(num_experts: int, num_groups: int) -> int:
    """The redundant slots a rebalance uses when none are asked for: about one per actor, rounded up so every
    actor holds as many slots (8 experts on 5 actors -> 7, 15 slots, 3 each), and never so many that an actor
    would hold two copies of one expert."""
    if num_experts < 1 or num_groups < 1:
        raise ValueError(f"need num_experts >= 1 and num_groups >= 1, got {num_experts} and {num_groups}")
    r = num_groups + (-(num_experts + num_groups)) % num_groups
    return min(r, num_experts * (num_groups - 1))


def replicate_experts(load: torch.Tensor, num_phy: int, max_replicas: int) -> torch.Tensor:
    """load [L, E] -> logcnt [L, E]: one replica each, then each of the num_phy - E extra slots to the expert
    with the highest load per replica among those with fewer than `max_replicas`. Ties go to the lower id."""
    num_layers, num_experts = load.shape
    logcnt = torch.ones(num_layers, num_experts, dtype=torch.long)  # [L, E]
    rows = torch.arange(num_layers)  # [L]
    for _ in range(num_phy - num_experts):
        per_replica = load / logcnt  # [L, E]
        per_replica[logcnt >= max_replicas] = -1.0  # below any real load, which is >= 0
        logcnt[rows, per_replica.argmax(dim=-1)] += 1
    return logcnt


def pack_replicas(load: torch.Tensor, logcnt: torch.Tensor, num_groups: int) -> torch.Tensor:
    """One layer: load [E], logcnt [E] -> phy2log [S]: the experts of actor g's S/G slots are at
    [g * S/G, (g + 1) * S/G), sorted by expert id. Greedy longest-processing-time packing with equal
    pack sizes and at most one replica of an expert per actor."""
    # 1. the replicas, heaviest first (stable: ties keep expert order)
    counts = logcnt.tolist()
    share = (load / logcnt).tolist()  # per-replica load [E]
    items = sorted((e for e, n in enumerate(counts) for _ in range(n)), key=lambda e: -share[e])
    capacity = len(items) // num_groups
    packs: list[list[int]] = [[] for _ in range(num_groups)]
    weight = [0.0] * num_groups

    # 2. each onto the lightest actor with room that lacks the expert (swap one item out if none has both)
    for e in items:
        open_ids = [g for g in range(num_groups) if len(packs[g]) < capacity]
        fits = [g for g in open_ids if e not in packs[g]]
        if fits:
            target = min(fits, key=lambda g: weight[g])
        else:
            target = _make_room(packs, weight, share, e, min(open_ids, key=lambda g: weight[g]), capacity)
        packs[target].append(e)
        weight[target] += share[e]

    # 3. flatten in actor order
    return torch.tensor([e for pack in packs for e in sorted(pack)], dtype=torch.long)  # [S]


def invert(phy2log: torch.Tensor, num_experts: int, max_replicas: int) -> torch.Tensor:
    """phy2log [L, S] -> log2phy [L, E, X]: the physical slots of each expert, ascending, padded with -1."""
    num_layers = phy2log.shape[0]
    log2phy = torch.full((num_layers, num_experts, max_replicas), -1, dtype=torch.long)  # [L, E, X]
    for i, layer in enumerate(phy2log.tolist()):
        filled = [0] * num_experts
        for s, e in enumerate(layer):
            log2phy[i, e, filled[e]] = s
            filled[e] += 1
    return log2phy


def actor_loads(load: torch.Tensor, table: RoutingTable) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Expected load per actor and layer: ([L, A] float, actor ids [A]). A slot with n replicas puts
    load / n on each of them."""
    load = _check_load(load)
    if tuple(load.shape) != (table.num_layers, table.num_experts):
        raise ValueError(f"load has shape {tuple(load.shape)} but the routing table covers "
                         f"({table.num_layers} layers, {table.num_experts} experts)")
    actors = table.actor_ids
    column = {a: j for j, a in enumerate(actors)}
    layer_idx, expert_idx, actor_idx, share = [], [], [], []
    for i, slots in enumerate(table.replicas):
        for e, r in enumerate(slots):
            for a in r:
                layer_idx.append(i)
                expert_idx.append(e)
                actor_idx.append(column[a])
                share.append(1.0 / len(r))
    per_actor = torch.zeros(table.num_layers, len(actors), dtype=torch.float64)  # [L, A]
    index = (torch.tensor(layer_idx), torch.tensor(actor_idx))
    values = load[index[0], torch.tensor(expert_idx)] * torch.tensor(share, dtype=torch.float64)
    per_actor.index_put_(index, values, accumulate=True)
    return per_actor, actors


def imbalance(load: torch.Tensor, table: RoutingTable, *, per_layer: bool = True) -> float:
    """Max over mean expected load per actor (1.0 = perfectly even; no load counts as even).

    per_layer=True (default): sum over layers of the busiest actor's load / sum over layers of the mean —
    each layer waits for its slowest actor, so this is the step-time cost of imbalance. per_layer=False:
    max / mean of the load summed over layers.
    """
    per_actor, _ = actor_loads(load, table)  # [L, A]
    if per_layer:
        busiest, mean = per_actor.max(dim=1).values.sum(), per_actor.mean(dim=1).sum()
    else:
        total = per_actor.sum(dim=0)  # [A]
        busiest, mean = total.max(), total.mean()
    return 1.0 if float(mean) == 0.0 else float(busiest / mean)


def _make_room(packs: list[list[int]], weight: list[float], share: list[float], expert: int,
               open_id: int, capacity: int) -> int:
    """Every actor with room already holds `expert`: move one item of a full actor lacking it to `open_id`
    and return that actor. Such an item exists: a full actor has `capacity` distinct experts, `open_id`
    fewer."""
    for g in sorted(range(len(packs)), key=lambda g: weight[g]):
        if len(packs[g]) == capacity and expert not in packs[g]:
            for item in sorted(packs[g], key=lambda e: share[e]):
                if item not in packs[open_id]:
                    packs[g].remove(item)
                    packs[open_id].append(item)
                    weight[g] -= share[item]
                    weight[open_id] += share[item]
                    return g
    raise AssertionError(f"no swap frees a slot for expert {expert}: {packs}")


def _check_load(load: torch.Tensor) -> torch.Tensor:
    if load.dim() != 2:
        raise ValueError(f"load must be [layers, experts], got shape {tuple(load.shape)}")
    load = load.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError("load must be finite and non-negative (routed token-choices per expert)")
    return load


def _check_shape(num_experts: int, num_groups: int, num_redundant: int, num_layer_ids: int, num_layers: int,
                 actor_ids: tuple[int, ...]) -> None:
    if num_groups < 1 or num_redundant < 0:
        raise ValueError(f"need num_groups >= 1 and num_redundant >= 0, got {num_groups} and {num_redundant}")
    num_phy = num_experts + num_redundant
    if num_phy % num_groups:
        up = num_redundant + (-num_phy) % num_groups
        raise ValueError(f"experts + redundant slots ({num_experts} + {num_redundant}) must be a multiple "
                         f"of num_groups={num_groups} so every actor holds as many slots; "
                         f"try num_redundant={up}")
    if num_phy > num_experts * num_groups:
        raise ValueError(f"{num_phy} slots over {num_groups} actors would put two replicas of an expert on "
                         f"one actor; use num_redundant <= {num_experts * (num_groups - 1)}")
    if num_layer_ids != num_layers:
        raise ValueError(f"layer_ids names {num_layer_ids} layers but load has {num_layers} rows")
    if len(actor_ids) != num_groups or len(set(actor_ids)) != num_groups:
        raise ValueError(f"actor_ids must be {num_groups} distinct ids (one per group), "
                         f"got {list(actor_ids)}")
