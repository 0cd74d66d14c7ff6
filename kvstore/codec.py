"""KV codecs and the block encoding: one block (all layers' cached rows for B tokens) <-> framed bytes.

A block payload is a list with one entry per layer, each a dict name -> tensor of shape [R, *row_shape]
(see spec.py; float32, bfloat16, float16, float8_e4m3fn). `encode_block` compresses every tensor with one codec and
frames the result (frame.py) with a msgpack header that records, per tensor, its name, dtype, shape and where its
parts (quantised data, scales) lie in the body. `decode_block` checks the frame and restores each tensor in
its original dtype and shape.

Codecs, and their error bound on each element x of the decoded (fp32) value:
    none  bit-exact; stores the tensor's own dtype.
    fp16  |err| <= max(|x| * 2^-11, 2^-25); needs |x| <= 65504.
    int8  symmetric, one scale per row per leading dim (per token per head; per row for 1-D rows):
          |err| <= s / 2, s = max|x| / 127 rounded up to fp16, i.e. about max|x| / 254.
    int4  symmetric, one scale per group of 32 along the last dim, two values per byte:
          |err| <= s / 2, s = max|x_group| / 7 rounded up to fp16, i.e. about max|x_group| / 14.
Casting the result back to a bfloat16 or float16 input dtype adds that dtype's own rounding (half an ulp).
Scales are stored as fp16 rounded *up*, so no value ever clips and the bound holds with the stored scale.
Lossy codecs reject NaN and inf; carry those with `none`.

Legend: R = rows per block, L = leading dims of a row (heads), D = last dim, G = int4 group size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from moeray.kvstore.errors import CorruptBlockError
from moeray.kvstore.frame import pack_frame, unpack_frame
from moeray.kvstore.spec import ModelCacheSpec

Shape = tuple[int, ...]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float8_e4m3fn": torch.float8_e4m3fn}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FP16_MAX = 65504.0


class Codec(ABC):
    """Compresses one cached tensor [R, *row_shape] into named byte parts, and back. Stateless."""

    name: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """Constructor arguments recorded in the frame header, so a reader rebuilds the same codec."""
        return {}

    @abstractmethod
    def encode(self, x: torch.Tensor) -> dict[str, bytes]: ...

    @abstractmethod
    def decode(self, parts: Mapping[str, memoryview], shape: Shape, dtype: torch.dtype) -> torch.Tensor: ...


class NoneCodec(Codec):
    """Bit-exact: the tensor's bytes in its own dtype."""

    name = "none"

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        return {"data": _to_bytes(x)}

    def decode(self, parts: Mapping[str, memoryview], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return _from_bytes(parts["data"], dtype, shape)


class Fp16Codec(Codec):
    """Round to fp16: |err| <= max(|x| * 2^-11, 2^-25) (half an ulp); |x| must be <= 65504."""

    name = "fp16"

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        _check_finite(x, self.name)
        if x.numel() and x.float().abs().max().item() > _FP16_MAX:
            raise ValueError(f"fp16 codec needs |x| <= {_FP16_MAX}; got {x.abs().max().item():.4g}; use 'none'")
        return {"data": _to_bytes(x.to(torch.float16))}

    def decode(self, parts: Mapping[str, memoryview], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return _from_bytes(parts["data"], torch.float16, shape).to(dtype)


class Int8Codec(Codec):
    """Symmetric int8 with one scale per row per leading dim: |err| <= s/2, s = max|x|/127 rounded up to fp16."""

    name = "int8"
    QMAX = 127

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        _check_finite(x, self.name)
        xf = x.float()  # [R, *L, D]
        scales = _fp16_scale_ceil(xf.abs().amax(dim=-1, keepdim=True) / self.QMAX)  # [R, *L, 1]
        q = torch.round(xf / _nonzero(scales)).clamp_(-self.QMAX, self.QMAX).to(torch.int8)  # [R, *L, D]
        return {"q": _to_bytes(q), "scales": _to_bytes(scales)}

    def decode(self, parts: Mapping[str, memoryview], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        q = _from_bytes(parts["q"], torch.int8, shape)  # [R, *L, D]
        scales = _from_bytes(parts["scales"], torch.float16, (*shape[:-1], 1))  # [R, *L, 1]
        return (q.float() * scales.float()).to(dtype)


class Int4Codec(Codec):
    """Symmetric int4, one scale per `group_size` values along the last dim (zero-padded to a whole group),
    two values per byte: |err| <= s/2, s = max|x_group|/7 rounded up to fp16."""

    name = "int4"
    QMAX = 7

    def __init__(self, group_size: int = 32) -> None:
        if group_size <= 0 or group_size % 2:
            raise ValueError(f"int4 group_size must be a positive even number, got {group_size}")
        self.group_size = group_size

    def params(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def encode(self, x: torch.Tensor) -> dict[str, bytes]:
        _check_finite(x, self.name)
        groups = self._grouped(x.float())  # [R, *L, D/G, G]
        scales = _fp16_scale_ceil(groups.abs().amax(dim=-1, keepdim=True) / self.QMAX)  # [R, *L, D/G, 1]
        q = torch.round(groups / _nonzero(scales)).clamp_(-self.QMAX, self.QMAX)
        nibbles = (q + 8).to(torch.uint8).flatten()  # values 1..15; G even, so an even count
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        return {"q": _to_bytes(packed), "scales": _to_bytes(scales)}

    def decode(self, parts: Mapping[str, memoryview], shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        num_groups = -(-shape[-1] // self.group_size)
        group_shape = (*shape[:-1], num_groups, self.group_size)  # [R, *L, D/G, G]
        packed = _from_bytes(parts["q"], torch.uint8, (_numel(group_shape) // 2,))
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(group_shape)
        scales = _from_bytes(parts["scales"], torch.float16, (*group_shape[:-1], 1))
        x = (nibbles.float() - 8) * scales.float()  # [R, *L, D/G, G]
        return x.reshape(*shape[:-1], -1)[..., : shape[-1]].to(dtype)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """[R, *L, D] -> [R, *L, ceil(D/G), G], zero-padding the last group."""
        pad = -x.shape[-1] % self.group_size
        x = torch.nn.functional.pad(x, (0, pad))
        return x.reshape(*x.shape[:-1], -1, self.group_size)


_CODECS: Mapping[str, type[Codec]] = {c.name: c for c in (NoneCodec, Fp16Codec, Int8Codec, Int4Codec)}
CODEC_NAMES: tuple[str, ...] = tuple(_CODECS)


def get_codec(name: str, **params: Any) -> Codec:
    """The codec called `name` (one of CODEC_NAMES)."""
    if name not in _CODECS:
        raise ValueError(f"unknown KV codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    return _CODECS[name](**params)


def encode_block(layers: Sequence[Mapping[str, torch.Tensor]], codec: str | Codec) -> bytes:
    """Encode one block: per layer, a dict name -> [R, *row_shape] tensor. Returns the framed bytes."""
    codec = get_codec(codec) if isinstance(codec, str) else codec
    body: list[bytes] = []
    offset = 0
    layer_headers = []
    for layer_id, tensors in enumerate(layers):
        entries = []
        for name, x in tensors.items():
            if x.dtype not in _DTYPE_NAMES:
                raise ValueError(f"layer {layer_id} tensor {name!r}: dtype {x.dtype} is not one of {list(_DTYPES)}")
            try:
                parts = codec.encode(x.detach().cpu())
            except ValueError as e:
                raise ValueError(f"layer {layer_id} tensor {name!r}: {e}") from e
            part_spans = {}
            for part_name, raw in parts.items():
                part_spans[part_name] = [offset, len(raw)]
                body.append(raw)
                offset += len(raw)
            entries.append({"name": name, "dtype": _DTYPE_NAMES[x.dtype], "shape": list(x.shape), "parts": part_spans})
        layer_headers.append(entries)
    header = {"codec": codec.name, "params": codec.params(), "layers": layer_headers}
    return pack_frame(header, body)


def decode_block(data: bytes | memoryview) -> list[dict[str, torch.Tensor]]:
    """Inverse of encode_block. Raises CorruptBlockError if the frame fails any check."""
    header, body = unpack_frame(data)
    try:
        codec = get_codec(header["codec"], **header["params"])
        return [{e["name"]: _decode_entry(codec, e, body) for e in entries} for entries in header["layers"]]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptBlockError(f"block header does not describe its body: {e!r}") from e


def check_block(layers: Sequence[Mapping[str, torch.Tensor]], spec: ModelCacheSpec, block_size: int) -> None:
    """Raise ValueError unless `layers` holds exactly the tensors `spec` caches for a block of `block_size`."""
    spec.check_block_size(block_size)
    if len(layers) != len(spec.layers):
        raise ValueError(f"block has {len(layers)} layers; the model caches {len(spec.layers)}")
    for layer_id, (tensors, layer_spec) in enumerate(zip(layers, spec.layers, strict=True)):
        expected = {t.name: (t.rows_per_block(block_size), *t.row_shape) for t in layer_spec.tensors}
        got = {name: tuple(x.shape) for name, x in tensors.items()}
        if got != expected:
            raise ValueError(f"layer {layer_id} ({layer_spec.kind}): tensors {got}, expected {expected}")


def _decode_entry(codec: Codec, entry: Mapping[str, Any], body: memoryview) -> torch.Tensor:
    parts = {}
    for part_name, (offset, nbytes) in entry["parts"].items():
        if offset < 0 or nbytes < 0 or offset + nbytes > len(body):
            raise CorruptBlockError(f"tensor {entry['name']!r} part {part_name!r} lies outside the body")
        parts[part_name] = body[offset : offset + nbytes]
    return codec.decode(parts, tuple(entry["shape"]), _DTYPES[entry["dtype"]])


def _check_finite(x: torch.Tensor, codec_name: str) -> None:
    if not torch.isfinite(x.float() if x.dtype.itemsize == 1 else x).all():  # CPU has no fp8 isfinite
        raise ValueError(f"{codec_name} codec needs finite values; carry NaN/inf with codec 'none'")


def _fp16_scale_ceil(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales -> fp16 scales >= them (one ulp up where rounding went down), so no value clips."""
    s16 = scale.to(torch.float16)
    if torch.isinf(s16).any():
        raise ValueError(f"values too large for an fp16 scale (max scale {scale.max().item():.4g}); use 'none'")
    bumped = (s16.view(torch.int16) + 1).view(torch.float16)  # next fp16 up, for positive finite values
    return torch.where(s16.float() < scale, bumped, s16)


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    """All-zero rows have scale 0; divide them by 1 instead (they quantise to 0 either way)."""
    return torch.where(scales == 0, torch.ones_like(scales), scales).float()


def _to_bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()  # native (little-endian) byte order


def _from_bytes(raw: memoryview, dtype: torch.dtype, shape: Shape) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != _numel(shape) * itemsize:
        raise CorruptBlockError(f"{len(raw)} bytes cannot hold a {dtype} tensor of shape {list(shape)}")
    buf = np.frombuffer(raw, dtype=np.uint8).copy()  # writable, owned by the tensor
    return torch.from_numpy(buf).view(dtype).reshape(shape)


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
