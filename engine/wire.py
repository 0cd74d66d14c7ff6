"""The expert call's wire format (what crosses the object store per target actor per MoE layer).

A call carries two arrays:
  x     [M, D] the token rows the actor needs, one contiguous buffer in the wire dtype (the experts' compute
        dtype; bf16 travels as its int16 bit pattern since numpy has no bf16)
  meta  [3, P] int32: pair_rows, expert ids, gate weights (float32 bit pattern): small, so Ray inlines it
The answer is [M, D] in the wire dtype, same encoding. Both sides read the arrays without copying
(`torch.from_numpy` on the object-store buffer; read-only: the expert math never writes its inputs).

`pack_rows` gathers every target actor's rows with one index_select (on the engine's device) and, for the
object store, moves them to the host in one copy; `scatter_rows` combines every answer with one index_add on the
engine's device (one copy over for host answers).
Legend: T = tokens in the layer, D = hidden, M = rows one actor receives, P = its pairs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from moeray.router.dispatch import ActorBatch

_BITS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as their bit pattern
_FROM_BITS = {np.dtype(np.int16): torch.bfloat16}  # activations are never int16, so the code is unambiguous


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor -> a numpy view of the same memory (no copy)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    bits = _BITS.get(t.dtype)
    return (t.view(bits) if bits is not None else t).numpy()


def from_wire(a: np.ndarray) -> torch.Tensor:
    """The inverse of `to_wire`, without copying (object-store arrays are read-only; torch warns about that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    dt = _FROM_BITS.get(a.dtype)
    return t.view(dt) if dt is not None else t


def pack_pairs(pair_rows: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """[P] rows, [P] expert ids, [P] weights -> meta [3, P] int32."""
    meta = torch.empty(3, pair_rows.numel(), dtype=torch.int32)
    meta[0] = pair_rows
    meta[1] = expert_ids
    meta[2] = weights.to(torch.float32).view(torch.int32)
    return meta.numpy()


def unpack_pairs(meta: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """meta [3, P] int32 -> (pair_rows [P] int64, expert_ids [P] int64, weights [P] float32)."""
    m = from_wire(meta)
    return m[0].long(), m[1].long(), m[2].view(torch.float32)


def host_routing(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's routing on a device, ids [N, K] (int64, < 2^24) and weights [N, K] -> host ids [N, K] int64 and
    weights [N, K] fp32, in one copy (one sync): both travel as one fp32 [2, N, K] tensor, exact for ids < 2^24."""
    both = torch.stack([ids.to(torch.float32), weights.to(torch.float32)]).cpu()  # [2, N, K]
    return both[0].long(), both[1]


def pack_rows(x: torch.Tensor, batches: Sequence[ActorBatch], dtype: torch.dtype,
              device: torch.device | str | None = None) -> list[torch.Tensor]:
    """x [T, D] -> one contiguous [M_i, D] buffer per batch in `dtype`, from one gather (views of one tensor),
    on `device` (None: x's; "cpu" for the object store: one device -> host copy for all batches)."""
    if not batches:
        return []
    rows = torch.cat([b.token_ids for b in batches]) if len(batches) > 1 else batches[0].token_ids
    packed = x.index_select(0, rows.to(x.device)).to(dtype)  # [sum M, D]
    if device is not None:
        packed = packed.to(device)
    return list(packed.split([b.num_rows for b in batches]))


def scatter_rows(num_tokens: int, hidden: int, batches: Sequence[ActorBatch], outputs: Sequence[torch.Tensor],
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum every batch's answer rows ([M_i, D]) into token order with one index_add -> [T, D] in `dtype`."""
    if len(batches) != len(outputs):
        raise ValueError(f"got {len(outputs)} answers for {len(batches)} actor batches")
    for b, o in zip(batches, outputs, strict=True):
        if tuple(o.shape) != (b.num_rows, hidden):
            raise ValueError(f"actor {b.actor_id} returned shape {tuple(o.shape)}, expected ({b.num_rows}, "
                             f"{hidden}) = (rows sent, hidden)")
    out = torch.zeros(num_tokens, hidden, dtype=dtype, device=device)  # [T, D]
    if not outputs:
        return out
    rows = torch.cat([b.token_ids for b in batches]) if len(batches) > 1 else batches[0].token_ids
    vals = torch.cat(list(outputs)) if len(outputs) > 1 else outputs[0]
    return out.index_add_(0, rows.to(device), vals.to(device=device, dtype=dtype))
