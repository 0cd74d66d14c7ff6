"""One MoE layer's dispatch plan: which expert actor computes which (token, choice) pair, and the combine.

The gate gives every token K (expert id, weight) choices. `plan_dispatch` sends each such pair to exactly one
actor holding that expert and groups the pairs per actor; the actor receives the token rows it needs once
(`gather_inputs`), computes `out[m] = sum over its pairs p with pair_rows[p] == m of
weights[p] * expert_{slot_ids[p]}(x_rows[m])`, and `combine` adds every actor's rows back in token order.

Replica choice: when expert e has n live replicas (its table entry minus `excluded`, in table order), token t
goes to replica t % n. This is deterministic, splits a batch's tokens evenly over the replicas, and, when
several experts share one replica list (replicas of a whole group), keeps all of a token's choices on the same
actor so that its row is shipped once.

Legend: T = tokens, K = choices per token, E = experts, D = hidden, R = most live replicas of an expert,
M = token rows one actor receives, P = (token, choice) pairs one actor computes.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moeray.router.table import NoReplicaError


@dataclass(slots=True)
class ActorBatch:
    """The part of one layer's token batch that one actor computes."""

    actor_id: int
    token_ids: torch.Tensor  # [M] int64, sorted, distinct: rows of the layer input this actor needs
    pair_rows: torch.Tensor  # [P] int64 in [0, M): which received row each pair reads and writes
    slot_ids: torch.Tensor  # [P] int64: expert id of each pair
    weights: torch.Tensor  # [P]: gate weight of each pair

    @property
    def num_rows(self) -> int:
        return int(self.token_ids.numel())

    @property
    def num_pairs(self) -> int:
        return int(self.pair_rows.numel())


def live_replicas(
    layer_slots: Sequence[Sequence[int]], excluded: Collection[int] = (), device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Live replicas per expert as tensors: (replica_ids [E, R] padded with -1, num_live [E])."""
    live = [[a for a in r if a not in excluded] for r in layer_slots]
    width = max(1, max((len(r) for r in live), default=0))
    padded = [r + [-1] * (width - len(r)) for r in live]
    replica_ids = torch.tensor(padded, dtype=torch.long, device=device).reshape(len(live), width)  # [E, R]
    num_live = torch.tensor([len(r) for r in live], dtype=torch.long, device=device)  # [E]
    return replica_ids, num_live


def plan_dispatch(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    layer_slots: Sequence[Sequence[int]],
    excluded: Collection[int] | None = None,
    *,
    layer: int | None = None,
) -> list[ActorBatch]:
    """Split one layer's routed pairs by target actor; batches are sorted by actor id, empty ones omitted.

    topk_ids [T, K] int64 expert ids, topk_weights [T, K]; `layer_slots[e]` = actor ids holding expert e
    (`RoutingTable.layer_slots(layer)`); `excluded` = actors to route around. `layer` only labels errors.
    Raises NoReplicaError when a routed expert has no live replica.
    """
    # 1. check the inputs
    num_experts = len(layer_slots)
    _check_routing(topk_ids, topk_weights, num_experts)
    num_tokens, k = topk_ids.shape
    if num_tokens * k == 0:
        return []
    plan = _plan_host if topk_ids.device.type == "cpu" else _plan_torch  # same batches (tests compare them)
    return plan(topk_ids, topk_weights, layer_slots, excluded or (), layer)


def _plan_torch(topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_slots: Sequence[Sequence[int]],
                excluded: Collection[int], layer: int | None) -> list[ActorBatch]:
    """plan_dispatch's steps 2-5 in torch, on the routing's device."""
    num_tokens, k = topk_ids.shape
    device = topk_ids.device

    # 2. live replicas per expert; every routed expert needs one
    replica_ids, num_live = live_replicas(layer_slots, excluded, device)  # [E, R], [E]
    pair_live = num_live[topk_ids]  # [T, K]
    if bool((pair_live == 0).any()):
        expert = int(topk_ids[pair_live == 0][0])
        raise NoReplicaError(layer, expert, layer_slots[expert])

    # 3. one actor per pair: token t uses replica t % n of its expert
    token_index = torch.arange(num_tokens, device=device).unsqueeze(1)  # [T, 1]
    pair_actor = replica_ids[topk_ids, token_index % pair_live]  # [T, K]

    # 4. group pairs by actor; the stable sort keeps each actor's pairs in token order
    flat_actor = pair_actor.reshape(-1)  # [T*K]
    sorted_actor, order = torch.sort(flat_actor, stable=True)  # [T*K], [T*K]
    actors, counts = torch.unique_consecutive(sorted_actor, return_counts=True)  # [A], [A]
    flat_ids, flat_weights = topk_ids.reshape(-1), topk_weights.reshape(-1)  # [T*K]

    # 5. per actor: the distinct token rows it needs and which row each of its pairs uses
    batches = []
    for actor, pairs in zip(actors.tolist(), torch.split(order, counts.tolist()), strict=True):
        token_ids, pair_rows = torch.unique_consecutive(pairs // k, return_inverse=True)  # [M], [P]
        batches.append(ActorBatch(actor, token_ids, pair_rows, flat_ids[pairs], flat_weights[pairs]))
    return batches


@functools.lru_cache(maxsize=256)
def _live_host(layer_slots: tuple, excluded: frozenset) -> tuple[np.ndarray, np.ndarray]:
    """`live_replicas` as numpy arrays, cached per (table's layer slots, excluded): tables are immutable."""
    replica_ids, num_live = live_replicas(layer_slots, excluded)
    return replica_ids.numpy(), num_live.numpy()


def _plan_host(topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_slots: Sequence[Sequence[int]],
               excluded: Collection[int], layer: int | None) -> list[ActorBatch]:
    """plan_dispatch's steps 2-5 for host tensors, in numpy (a decode-sized plan is a few dozen tiny ops: numpy's
    per-op cost is a fraction of torch's). Same batches, same dtypes as the torch steps (a test compares them)."""
    num_tokens, k = topk_ids.shape
    try:
        replica_ids, num_live = _live_host(tuple(layer_slots), frozenset(excluded))
    except TypeError:  # unhashable slots (lists): not cached
        replica_ids, num_live = (t.numpy() for t in live_replicas(layer_slots, excluded))
    ids = topk_ids.numpy()  # [T, K]
    pair_live = num_live[ids]  # [T, K]
    if (pair_live == 0).any():
        expert = int(ids[pair_live == 0][0])
        raise NoReplicaError(layer, expert, layer_slots[expert])
    pair_actor = replica_ids[ids, np.arange(num_tokens)[:, None] % pair_live]  # [T, K]
    flat_actor = pair_actor.reshape(-1)  # [T*K]
    order = np.argsort(flat_actor, kind="stable")  # [T*K]: pairs grouped by actor, in token order within
    actors, starts, counts = np.unique(flat_actor[order], return_index=True, return_counts=True)  # [A]
    flat_ids = ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1)
    host_weights = flat_weights.numpy() if flat_weights.dtype in (torch.float32, torch.float64) else None
    batches = []
    for actor, start, count in zip(actors.tolist(), starts.tolist(), counts.tolist(), strict=True):
        pairs = order[start:start + count]  # [P] ascending
        tokens = pairs // k  # [P] non-decreasing
        first = np.empty(count, dtype=bool)  # [P] first pair of each distinct token
        first[0] = True
        np.not_equal(tokens[1:], tokens[:-1], out=first[1:])
        w = (torch.from_numpy(host_weights[pairs]) if host_weights is not None
             else flat_weights[torch.from_numpy(pairs)])
        batches.append(ActorBatch(actor, torch.from_numpy(tokens[first]), torch.from_numpy(np.cumsum(first) - 1),
                                  torch.from_numpy(flat_ids[pairs]), w))
    return batches


def gather_inputs(x: torch.Tensor, batch: ActorBatch) -> torch.Tensor:
    """x [T, D] -> the rows `batch`'s actor needs, [M, D]."""
    return x.index_select(0, batch.token_ids)


def combine(
    num_tokens: int,
    hidden: int,
    batches: Sequence[ActorBatch],
    outputs: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sum each actor's output rows ([M, D] per batch, in batch order) into token order -> [T, D].

    dtype/device default to the first output's (float32 on cpu when there are no outputs).
    """
    if len(batches) != len(outputs):
        raise ValueError(f"combine got {len(outputs)} outputs for {len(batches)} actor batches")
    first = outputs[0] if outputs else None
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = device or (first.device if first is not None else "cpu")
    out = torch.zeros(num_tokens, hidden, dtype=dtype, device=device)  # [T, D]
    for batch, rows in zip(batches, outputs, strict=True):
        if tuple(rows.shape) != (batch.num_rows, hidden):
            raise ValueError(f"actor {batch.actor_id} returned shape {tuple(rows.shape)}, expected "
                             f"({batch.num_rows}, {hidden}) = (rows sent, hidden)")
        out.index_add_(0, batch.token_ids.to(device), rows.to(device=device, dtype=dtype))
    return out


def _check_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> None:
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [T, K]; got {tuple(topk_ids.shape)} and "
                         f"{tuple(topk_weights.shape)}")
    if topk_ids.dtype != torch.long:
        raise ValueError(f"topk_ids must be int64 (torch.long), got {topk_ids.dtype}")
    if num_experts == 0:
        raise ValueError("layer_slots is empty: the routing table lists no experts for this layer")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts}); got values in "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")
