"""Block placement: a consistent-hash ring over shard ids, with virtual nodes and replication.

Each shard owns `num_virtual_nodes` points on a 64-bit ring (blake2b of "shard_id/i"); a key hashes to a
point and its owners are the first `replication` distinct shards met walking clockwise from it. The first
owner is the primary; writers store on all owners, readers try them in order. Adding a shard moves only
the keys whose walk now meets it first -- about 1/N of them, all onto the new shard -- and removing one moves
only the keys it owned. Placement is a pure function of the shard set, so every process computes the same
owners without coordination.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable


class HashRing:
    """Consistent hashing of byte keys onto shard ids."""

    def __init__(self, shard_ids: Iterable[str] = (), num_virtual_nodes: int = 128, replication: int = 2) -> None:
        if num_virtual_nodes < 1:
            raise ValueError(f"num_virtual_nodes must be >= 1, got {num_virtual_nodes}")
        if replication < 1:
            raise ValueError(f"replication must be >= 1, got {replication}")
        self.num_virtual_nodes = num_virtual_nodes
        self.replication = replication
        self._shard_ids: set[str] = set()
        self._points: list[int] = []  # sorted ring positions
        self._point2shard: list[str] = []  # parallel to _points
        for shard_id in shard_ids:
            self.add_shard(shard_id)

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._shard_ids))

    def __len__(self) -> int:
        return len(self._shard_ids)

    def add_shard(self, shard_id: str) -> None:
        if shard_id in self._shard_ids:
            raise ValueError(f"shard {shard_id!r} is already on the ring")
        self._shard_ids.add(shard_id)
        self._rebuild()

    def remove_shard(self, shard_id: str) -> None:
        if shard_id not in self._shard_ids:
            raise KeyError(f"shard {shard_id!r} is not on the ring; shards: {self.shard_ids}")
        self._shard_ids.remove(shard_id)
        self._rebuild()

    def owners(self, key: bytes, replication: int | None = None) -> list[str]:
        """The shards that hold `key`, primary first: `replication` distinct ids (default: the ring's),
        or every shard if the ring has fewer."""
        if not self._shard_ids:
            raise ValueError("the hash ring has no shards; add one before placing keys")
        want = min(self.replication if replication is None else replication, len(self._shard_ids))
        if want < 1:
            raise ValueError(f"replication must be >= 1, got {replication}")
        start = bisect.bisect_right(self._points, _position(key))
        found: list[str] = []
        for step in range(len(self._points)):
            shard_id = self._point2shard[(start + step) % len(self._points)]
            if shard_id not in found:
                found.append(shard_id)
                if len(found) == want:
                    break
        return found

    def primary(self, key: bytes) -> str:
        return self.owners(key, replication=1)[0]

    def _rebuild(self) -> None:
        # Ties between equal positions (astronomically rare) break by shard id, so placement stays deterministic.
        ring = sorted(
            (_position(f"{shard_id}/{i}".encode()), shard_id)
            for shard_id in self._shard_ids
            for i in range(self.num_virtual_nodes)
        )
        self._points = [p for p, _ in ring]
        self._point2shard = [s for _, s in ring]


def _position(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
