"""The byte framing shared by encoded blocks and spill files: a fixed prefix, a msgpack header, raw bytes.

    offset 0   magic       4 bytes  b"MRKV"
    offset 4   version     u16 LE   FRAME_VERSION
    offset 6   header_len  u32 LE
    offset 10  checksum    16 bytes blake2b(header || body)
    offset 26  header      msgpack map, header_len bytes; always holds "body_len"
    then       body        raw bytes, body_len of them

The checksum covers header and body, so a flipped bit anywhere is caught: in the prefix by the magic,
version or length checks, elsewhere by the checksum. A frame must be exactly as long as it says it is.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from moeray.kvstore.errors import CorruptBlockError

MAGIC = b"MRKV"
FRAME_VERSION = 1
_PREFIX = struct.Struct("<4sHI16s")  # magic, version, header_len, checksum
_CHECKSUM_BYTES = 16


def pack_frame(header: dict[str, Any], body_parts: Sequence[bytes]) -> bytes:
    """Frame `header` (msgpack-able, without "body_len") and the concatenation of `body_parts`."""
    body_len = sum(len(p) for p in body_parts)
    header_bytes = msgpack.packb({**header, "body_len": body_len}, use_bin_type=True)
    h = hashlib.blake2b(header_bytes, digest_size=_CHECKSUM_BYTES)
    for part in body_parts:
        h.update(part)
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, len(header_bytes), h.digest())
    return b"".join([prefix, header_bytes, *body_parts])


def unpack_frame(data: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """Check a frame and return (header, body). Raises CorruptBlockError on any mismatch."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise CorruptBlockError(f"frame truncated: {len(view)} bytes, shorter than its {_PREFIX.size}-byte prefix")
    magic, version, header_len, checksum = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptBlockError(f"bad magic {bytes(magic)!r}; expected {MAGIC!r}")
    if version != FRAME_VERSION:
        raise CorruptBlockError(f"frame version {version} unsupported; this reader knows {FRAME_VERSION}")
    header_end = _PREFIX.size + header_len
    if header_end > len(view):
        raise CorruptBlockError(f"frame truncated inside its header ({len(view)} of >= {header_end} bytes)")
    h = hashlib.blake2b(view[_PREFIX.size :], digest_size=_CHECKSUM_BYTES)
    if h.digest() != checksum:
        raise CorruptBlockError("checksum mismatch (frame truncated or corrupted)")
    header = _unpack_header(view[_PREFIX.size : header_end])
    body = view[header_end:]
    if len(body) != header.get("body_len"):
        raise CorruptBlockError(f"body is {len(body)} bytes; header says {header.get('body_len')}")
    return header, body


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False)
    except (msgpack.exceptions.UnpackException, ValueError, TypeError) as e:
        raise CorruptBlockError(f"unreadable frame header: {e}") from e
    if not isinstance(header, dict):
        raise CorruptBlockError(f"frame header is a {type(header).__name__}, not a map")
    return header
