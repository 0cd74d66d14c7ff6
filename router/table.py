"""The routing table: which expert-group actors hold which (MoE layer, expert) slot.

A *slot* is one routed expert of one MoE layer; it lives on one or more actors (its *replicas*). Layers are
named by their decoder-layer index, and only MoE layers appear. The table is frozen and versioned: every
derived table (`without`, `with_actor`, `with_replicas`) carries `version + 1`, so the controller can publish
it and gating actors can tell a newer table from an older one between steps.

Legend: L = MoE layers, E = routed experts per layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Replicas = tuple[int, ...]  # actor ids holding one slot, in preference order


class NoReplicaError(ValueError):
    """A slot would be left with no live replica (every actor holding it is dead, draining or excluded)."""

    def __init__(self, layer: int | None, expert: int, lost: Iterable[int]):
        self.layer, self.expert, self.lost = layer, expert, tuple(sorted(lost))
        where = f"layer {layer}, expert {expert}" if layer is not None else f"expert {expert}"
        super().__init__(
            f"slot ({where}) would have no replica left: all of its actors {list(self.lost)} are excluded; "
            "add a replica of it on a live actor before removing these"
        )


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """For each MoE layer in `layer_ids` and each expert in [0, num_experts): the actor ids holding it.

    `replicas[i][e]` is the tuple of actors holding expert e of layer `layer_ids[i]`: non-empty, distinct.
    """

    version: int
    layer_ids: tuple[int, ...]  # [L], strictly increasing decoder-layer indices
    num_experts: int
    replicas: tuple[tuple[Replicas, ...], ...]  # [L][E] -> actor ids
    _layer_index: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        layer_ids = tuple(int(i) for i in self.layer_ids)
        replicas = tuple(tuple(tuple(int(a) for a in r) for r in layer) for layer in self.replicas)
        object.__setattr__(self, "layer_ids", layer_ids)
        object.__setattr__(self, "replicas", replicas)
        _validate(self.version, layer_ids, self.num_experts, replicas)
        object.__setattr__(self, "_layer_index", {layer: i for i, layer in enumerate(layer_ids)})

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through __init__ (validates, rebuilds the index); frozen slots dataclasses unpickle
        # badly on Python 3.10.
        return (RoutingTable, (self.version, self.layer_ids, self.num_experts, self.replicas))

    # ---- constructors --------------------------------------------------------------------------------

    @classmethod
    def round_robin(
        cls, moe_layers: Sequence[int], num_experts: int, num_groups: int, replicas: int = 1, version: int = 0
    ) -> RoutingTable:
        """Expert e on group e % G; its r-th extra replica on group (e + r) % G. Actor ids are 0..G-1."""
        _check_groups(num_experts, num_groups, replicas)
        slots = tuple(tuple((e + r) % num_groups for r in range(replicas)) for e in range(num_experts))
        return cls(version, tuple(moe_layers), num_experts, tuple(slots for _ in moe_layers))

    @classmethod
    def blocks(
        cls, moe_layers: Sequence[int], num_experts: int, num_groups: int, replicas: int = 1, version: int = 0
    ) -> RoutingTable:
        """Contiguous expert blocks: group g holds experts [g*E/G, (g+1)*E/G) (sizes differ by at most one);
        the r-th extra replica of a block lives on group (g + r) % G. Actor ids are 0..G-1."""
        _check_groups(num_experts, num_groups, replicas)
        home = [e * num_groups // num_experts for e in range(num_experts)]  # block of expert e
        slots = tuple(tuple((home[e] + r) % num_groups for r in range(replicas)) for e in range(num_experts))
        return cls(version, tuple(moe_layers), num_experts, tuple(slots for _ in moe_layers))

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def actor_ids(self) -> tuple[int, ...]:
        """Every actor that holds at least one slot, sorted."""
        return tuple(sorted({a for layer in self.replicas for r in layer for a in r}))

    def layer_slots(self, layer: int) -> tuple[Replicas, ...]:
        """[E] -> actor ids for decoder layer `layer` (what `dispatch.plan_dispatch` takes)."""
        index = self._layer_index.get(layer)
        if index is None:
            raise ValueError(f"layer {layer} is not a MoE layer of this routing table; MoE layers: "
                             f"{list(self.layer_ids)}")
        return self.replicas[index]

    def actor_slots(self, actor_id: int) -> dict[int, list[int]]:
        """What `actor_id` must load: layer -> sorted expert ids (every layer is a key, possibly empty)."""
        return {
            layer: [e for e, r in enumerate(slots) if actor_id in r]
            for layer, slots in zip(self.layer_ids, self.replicas, strict=True)
        }

    def added_slots(self, since: RoutingTable) -> dict[int, dict[int, list[int]]]:
        """actor -> layer -> experts this table puts on the actor that `since` did not: what to load before
        switching from `since` to this table. Only actors and layers with something to load appear."""
        return _slot_difference(self, since)

    def removed_slots(self, since: RoutingTable) -> dict[int, dict[int, list[int]]]:
        """actor -> layer -> experts `since` had on the actor that this table drops: safe to unload after
        the switch (once in-flight calls on the old version have finished)."""
        return _slot_difference(since, self)

    # ---- derived tables (each carries version + 1) --------------------------------------------------

    def without(self, actor_ids: Iterable[int]) -> RoutingTable:
        """Route around `actor_ids` (dead or draining): drop them from every slot.

        Raises NoReplicaError naming the first slot that would be left with no replica.
        """
        gone = frozenset(actor_ids)
        new_layers = []
        for layer, slots in zip(self.layer_ids, self.replicas, strict=True):
            kept = tuple(tuple(a for a in r if a not in gone) for r in slots)
            for e, r in enumerate(kept):
                if not r:
                    raise NoReplicaError(layer, e, slots[e])
            new_layers.append(kept)
        return RoutingTable(self.version + 1, self.layer_ids, self.num_experts, tuple(new_layers))

    def with_actor(self, actor_id: int, like: int) -> RoutingTable:
        """Add `actor_id` as one more replica of every slot `like` holds (a new replica of a group)."""
        if actor_id in self.actor_ids:
            raise ValueError(f"actor {actor_id} already holds slots in routing table v{self.version}; "
                             "pick an unused actor id")
        if like not in self.actor_ids:
            raise ValueError(f"actor {like} holds no slot in routing table v{self.version}; "
                             f"actors: {list(self.actor_ids)}")
        new_layers = tuple(
            tuple(r + (actor_id,) if like in r else r for r in slots) for slots in self.replicas
        )
        return RoutingTable(self.version + 1, self.layer_ids, self.num_experts, new_layers)

    def with_replicas(self, replicas: Mapping[tuple[int, int], Sequence[int]]) -> RoutingTable:
        """Replace the actors of the given (layer, expert) slots; every other slot keeps its replicas."""
        new_layers = [list(slots) for slots in self.replicas]
        for (layer, expert), actors in replicas.items():
            index = self._layer_index.get(layer)
            if index is None or not 0 <= expert < self.num_experts:
                raise ValueError(f"slot (layer {layer}, expert {expert}) is not in routing table "
                                 f"v{self.version} (layers {list(self.layer_ids)}, "
                                 f"{self.num_experts} experts)")
            new_layers[index][expert] = tuple(actors)
        return RoutingTable(self.version + 1, self.layer_ids, self.num_experts,
                            tuple(tuple(slots) for slots in new_layers))

    # ---- persistence (JSON- and msgpack-safe: only ints, lists and str keys) ------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "layer_ids": list(self.layer_ids),
            "num_experts": self.num_experts,
            "replicas": [[list(r) for r in slots] for slots in self.replicas],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingTable:
        expected = {"version", "layer_ids", "num_experts", "replicas"}
        if set(data) != expected:
            raise ValueError(f"routing table dict must have exactly the keys {sorted(expected)}, "
                             f"got {sorted(data)}")
        return cls(int(data["version"]), tuple(data["layer_ids"]), int(data["num_experts"]),
                   tuple(tuple(tuple(r) for r in slots) for slots in data["replicas"]))


def _validate(version: int, layer_ids: tuple[int, ...], num_experts: int,
              replicas: tuple[tuple[Replicas, ...], ...]) -> None:
    if version < 0:
        raise ValueError(f"routing table version must be >= 0, got {version}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if any(i < 0 for i in layer_ids) or list(layer_ids) != sorted(set(layer_ids)):
        raise ValueError(f"layer_ids must be distinct non-negative layer indices in increasing order, "
                         f"got {list(layer_ids)}")
    if len(replicas) != len(layer_ids):
        raise ValueError(f"replicas has {len(replicas)} layers but layer_ids names {len(layer_ids)}")
    for layer, slots in zip(layer_ids, replicas, strict=True):
        if len(slots) != num_experts:
            raise ValueError(f"layer {layer} lists {len(slots)} experts, expected num_experts={num_experts}")
        for e, r in enumerate(slots):
            if not r:
                raise NoReplicaError(layer, e, ())
            if len(set(r)) != len(r) or min(r) < 0:
                raise ValueError(f"slot (layer {layer}, expert {e}) has replicas {list(r)}; actor ids must "
                                 "be distinct and >= 0")


def _check_groups(num_experts: int, num_groups: int, replicas: int) -> None:
    if num_groups < 1 or num_experts < 1:
        raise ValueError(f"need num_experts >= 1 and num_groups >= 1, got {num_experts} and {num_groups}")
    if not 1 <= replicas <= num_groups:
        raise ValueError(f"replicas must be in [1, num_groups={num_groups}] so each copy of a slot lives on "
                         f"a different actor, got {replicas}")


def _slot_difference(a: RoutingTable, b: RoutingTable) -> dict[int, dict[int, list[int]]]:
    """actor -> layer -> experts that `a` places on the actor and `b` does not."""
    out: dict[int, dict[int, list[int]]] = {}
    for actor in a.actor_ids:
        b_slots = {layer: set(es) for layer, es in b.actor_slots(actor).items()}
        for layer, experts in a.actor_slots(actor).items():
            extra = [e for e in experts if e not in b_slots.get(layer, set())]
            if extra:
                out.setdefault(actor, {})[layer] = extra
    return out
