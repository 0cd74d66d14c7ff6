"""The expert call's wire format (what crosses per target actor per MoE layer: over the expert actor's socket,
engine/channel.py, or through Ray's object store).

A call carries two `bytes` (msgpack-native: Ray serializes them without pickling; measured on this box, per call
~0.35 ms less CPU in the actor and ~0.1 ms less in the caller than the same data as numpy arrays):
  rows  [M, D] the token rows the actor needs, raw, in the wire dtype (the experts' compute dtype)
  meta  int32: a header (dtype code, M, D, P), then pair_rows [P], expert ids [P], gate weights [P] (float32 bits)
The answer is one `bytes`: a header (dtype code, M, D) and [M, D] raw in the wire dtype. The sender makes one
copy (`tobytes`), Ray's unpacking one more (msgpack -> bytes: microseconds at these sizes); after that both
sides read in place (`torch.frombuffer`; read-only: the expert math never writes its inputs). The socket channel
writes the same two buffers without the `tobytes` copy (`call_buffers`) and reads them into fresh buffers. RDT
(actors/rdt.py) sends tensors instead and keeps the [3, P] numpy meta of `pack_pairs`.

`pack_rows` gathers every target actor's rows with one index_select (on the engine's device) and, for the
object store, moves them to the host in one copy; `scatter_rows` combines every answer with one index_add on the
engine's device (one copy over for host answers).
Legend: T = tokens in the layer, D = hidden, M = rows one actor receives, P = its pairs.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from moeray.router.dispatch import ActorBatch

_BITS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as their bit pattern
_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}  # wire dtype <-> code in the headers
_DTYPES = {c: d for d, c in _CODES.items()}
_META_HEAD = 4  # int32s before the pairs: dtype code, M, D, P
_ANSWER_HEAD = struct.Struct("<4i")  # dtype code, M, D, 0 (16 bytes: the rows stay 16-byte aligned)
# frombuffer over received (immutable) bytes: torch warns that the tensor is not writable; nothing writes it
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def _code(dtype: torch.dtype) -> int:
    code = _CODES.get(dtype)
    if code is None:
        raise ValueError(f"wire dtype {dtype} is not one of {sorted(str(d) for d in _CODES)}")
    return code


def _raw(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor -> a numpy view of its bytes (no copy)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    bits = _BITS.get(t.dtype)
    return (t.view(bits) if bits is not None else t).contiguous().numpy()


def encode_call(x_rows: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> tuple[bytes, bytes]:
    """x_rows [M, D] in the wire dtype, pair_rows / expert_ids / weights [P] -> (rows, meta) bytes."""
    rows, meta = call_buffers(x_rows, pair_rows, expert_ids, weights)
    return rows.tobytes(), meta


def call_buffers(x_rows: torch.Tensor, pair_rows: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> tuple[np.ndarray, bytes]:
    """`encode_call` without the rows' copy: (a numpy view of x_rows' bytes, meta bytes), for a sender that
    writes buffers as they are (engine/channel.py)."""
    m, d = x_rows.shape
    p = int(pair_rows.numel())
    meta = np.empty(_META_HEAD + 3 * p, dtype=np.int32)
    meta[:_META_HEAD] = (_code(x_rows.dtype), m, d, p)
    meta[_META_HEAD:_META_HEAD + p] = pair_rows.numpy()
    meta[_META_HEAD + p:_META_HEAD + 2 * p] = expert_ids.numpy()
    meta[_META_HEAD + 2 * p:] = weights.to(torch.float32).numpy().view(np.int32)
    return _raw(x_rows), meta.tobytes()


def decode_call(rows: bytes, meta: bytes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `encode_call`, reading both buffers in place -> (x [M, D] in the wire dtype, pair_rows [P]
    int64, expert_ids [P] int64, weights [P] float32)."""
    head = torch.frombuffer(meta, dtype=torch.int32)
    code, m, d, p = head[:_META_HEAD].tolist()
    if head.numel() != _META_HEAD + 3 * p:
        raise ValueError(f"expert call meta holds {head.numel()} int32s, its header says {_META_HEAD + 3 * p}")
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise ValueError(f"expert call rows have unknown dtype code {code}")
    pairs = head[_META_HEAD:].view(3, p)
    x = torch.frombuffer(rows, dtype=dtype) if m * d else torch.empty(0, dtype=dtype)
    if x.numel() != m * d:
        raise ValueError(f"expert call rows hold {x.numel()} values, the header says [{m}, {d}]")
    return x.view(m, d), pairs[0].long(), pairs[1].long(), pairs[2].view(torch.float32)


def encode_answer(out: torch.Tensor) -> bytes:
    """An actor's answer [M, D] (in the wire dtype) -> bytes: header and the raw rows (one copy)."""
    m, d = out.shape
    return b"".join((_ANSWER_HEAD.pack(_code(out.dtype), m, d, 0), _raw(out)))


def decode_answer(buf: bytes) -> torch.Tensor:
    """The inverse of `encode_answer`, in place -> [M, D] in the wire dtype."""
    code, m, d, _ = _ANSWER_HEAD.unpack_from(buf)
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise ValueError(f"expert answer has unknown dtype code {code}")
    if not m * d:
        return torch.empty(m, d, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, offset=_ANSWER_HEAD.size, count=m * d).view(m, d)


def pack_pairs(pair_rows: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """[P] rows, [P] expert ids, [P] weights -> meta [3, P] int32."""
    meta = torch.empty(3, pair_rows.numel(), dtype=torch.int32)
    meta[0] = pair_rows
    meta[1] = expert_ids
    meta[2] = weights.to(torch.float32).view(torch.int32)
    return meta.numpy()


def unpack_pairs(meta: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """meta [3, P] int32 -> (pair_rows [P] int64, expert_ids [P] int64, weights [P] float32)."""
    with warnings.catch_warnings():  # object-store arrays are read-only (torch warns); nothing writes this one
        warnings.simplefilter("ignore", UserWarning)
        m = torch.from_numpy(meta)
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
