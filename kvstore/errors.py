"""Errors raised by the KV-store core. The shard actor translates them at its facade."""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class of every KV-store error."""


class CorruptBlockError(KVStoreError):
    """A framed block or spill file failed its checks: bad magic, unknown version, truncated, or a checksum
    mismatch. Readers treat it as a miss: the block is recomputed, never trusted."""


class BlockTooLargeError(KVStoreError, ValueError):
    """A single block is larger than the whole shard; no eviction could make room for it."""


class StoreFullError(KVStoreError):
    """There is room in principle, but pinned blocks occupy it; unpin blocks or add capacity."""


class BlockPinnedError(KVStoreError):
    """A pinned block (in use by a reader) was asked to be deleted."""
