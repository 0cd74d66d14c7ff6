"""One shard's block store: encoded blocks by key, bounded bytes in memory, LRU eviction, optional disk tier.

Values are opaque bytes (encoded blocks from codec.py); the store never decodes them. Memory holds at most
`capacity_bytes` of values. Putting a block evicts least-recently-used unpinned blocks until it fits; a
block in use is pinned (a count, so several readers may pin it) and is never evicted. With `spill_dir`,
evicted blocks are written there as framed files (frame.py: the key in the header, the value as the body,
a checksum over both) and a later `get` promotes them back; a file that fails its checks is deleted and
counts as a miss. The disk tier is itself LRU-bounded by `spill_capacity_bytes` (None: unbounded).

Not thread-safe: the shard actor serialises calls.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from moeray.kvstore.errors import BlockPinnedError, BlockTooLargeError, CorruptBlockError, StoreFullError
from moeray.kvstore.frame import pack_frame, unpack_frame

_SPILL_SUFFIX = ".kvb"


@dataclass(slots=True)
class StoreStats:
    """Counters since creation, and current occupancy."""

    hits: int = 0  # get() answered, from memory or disk
    disk_hits: int = 0  # of those, answered from the disk tier
    misses: int = 0  # get() found nothing usable (absent, or a corrupt spill file)
    evictions: int = 0  # blocks pushed out of memory (spilled or dropped)
    spills: int = 0  # evicted blocks written to disk
    disk_evictions: int = 0  # spill files dropped to respect spill_capacity_bytes
    corrupt: int = 0  # spill files that failed their checks (also counted in misses)
    num_blocks: int = 0
    bytes: int = 0  # in memory
    disk_blocks: int = 0
    disk_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ShardStore:
    """put / get / contains / delete / pin / unpin of encoded blocks, keyed by bytes."""

    def __init__(
        self,
        capacity_bytes: int,
        spill_dir: str | os.PathLike[str] | None = None,
        spill_capacity_bytes: int | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.spill_capacity_bytes = spill_capacity_bytes
        self._mem: OrderedDict[bytes, bytes] = OrderedDict()  # LRU first, MRU last
        self._pins: dict[bytes, int] = {}  # key -> pin count (> 0), only for keys in _mem
        self._mem_bytes = 0
        self._pinned_bytes = 0
        self._disk: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, LRU first
        self._disk_bytes = 0
        self._stats = StoreStats()
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self._spill_dir is not None:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            self._adopt_spill_files()

    # -- reads ------------------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The value stored under `key`, or None. A hit becomes most recently used."""
        value = self._mem.get(key)
        if value is not None:
            self._mem.move_to_end(key)
            self._stats.hits += 1
            return value
        value = self._read_spill(key) if key in self._disk else None
        if value is None:
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        self._stats.disk_hits += 1
        self._promote(key, value)
        return value

    def contains(self, key: bytes) -> bool:
        """Whether `key` is stored (memory or disk). Does not count as a use, nor read the disk file."""
        return key in self._mem or key in self._disk

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def keys(self) -> list[bytes]:
        """Every stored key, memory first (LRU to MRU), then disk; e.g. to re-replicate after a shard loss."""
        return [*self._mem, *self._disk]

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        s = StoreStats(**self._stats.to_dict())
        s.num_blocks, s.bytes = len(self._mem), self._mem_bytes
        s.disk_blocks, s.disk_bytes = len(self._disk), self._disk_bytes
        return s

    # -- writes -----------------------------------------------------------------------------------------

    def put(self, key: bytes, value: bytes | bytearray | memoryview) -> None:
        """Store `value` under `key` in memory (replacing any old value), evicting LRU unpinned blocks.

        Raises BlockTooLargeError if the value alone exceeds capacity_bytes, StoreFullError if pinned blocks
        leave no room for it. On either error nothing changes."""
        _check_key(key)
        value = value if isinstance(value, bytes) else bytes(value)
        size = len(value)
        if size > self.capacity_bytes:
            raise BlockTooLargeError(
                f"block of {size} bytes exceeds the shard capacity of {self.capacity_bytes} bytes; "
                "raise capacity_bytes or use smaller blocks / a stronger codec"
            )
        old = self._mem.get(key)
        pinned_other = self._pinned_bytes - (len(old) if old is not None and key in self._pins else 0)
        if pinned_other + size > self.capacity_bytes:
            raise StoreFullError(f"cannot store {size} bytes: {pinned_other} of {self.capacity_bytes} bytes are pinned")
        self._insert(key, value)
        self._drop_spill(key)

    def delete(self, key: bytes) -> bool:
        """Remove `key` from memory and disk; True if it was stored. A pinned block raises BlockPinnedError."""
        if key in self._pins:
            raise BlockPinnedError(f"block {key.hex()} is pinned {self._pins[key]} time(s); unpin it first")
        found = self._remove_mem(key) is not None
        return self._drop_spill(key) or found

    def pin(self, key: bytes) -> None:
        """Keep `key` in memory until a matching unpin (pins count). Raises KeyError if it is not stored."""
        if key not in self._mem and self.get(key) is None:
            raise KeyError(f"cannot pin block {key.hex()}: not stored")
        if key not in self._mem:  # read from disk but no room to promote: pinned blocks fill memory
            raise StoreFullError(f"cannot pin block {key.hex()}: pinned blocks fill memory")
        if key not in self._pins:
            self._pinned_bytes += len(self._mem[key])
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: bytes) -> None:
        """Undo one pin. Raises KeyError if `key` is not pinned."""
        count = self._pins.get(key)
        if count is None:
            raise KeyError(f"block {key.hex()} is not pinned")
        if count == 1:
            del self._pins[key]
            self._pinned_bytes -= len(self._mem[key])
        else:
            self._pins[key] = count - 1

    # -- memory tier ------------------------------------------------------------------------------------

    def _insert(self, key: bytes, value: bytes) -> None:
        """Put into memory as MRU, evicting unpinned LRU blocks first; the caller checked it can fit."""
        old = self._remove_mem(key)
        if old is not None and key in self._pins:
            self._pinned_bytes += len(value) - len(old)
        self._evict_until(self.capacity_bytes - len(value))
        self._mem[key] = value
        self._mem_bytes += len(value)

    def _evict_until(self, target_bytes: int) -> None:
        """Evict unpinned blocks, least recently used first, until memory holds <= target_bytes."""
        while self._mem_bytes > target_bytes:
            key = next((k for k in self._mem if k not in self._pins), None)
            assert key is not None, "only pinned blocks left; put() should have raised StoreFullError"
            value = self._remove_mem(key)
            self._stats.evictions += 1
            self._spill(key, value)

    def _remove_mem(self, key: bytes) -> bytes | None:
        value = self._mem.pop(key, None)
        if value is not None:
            self._mem_bytes -= len(value)
        return value

    def _promote(self, key: bytes, value: bytes) -> None:
        """Move a block read from disk into memory if unpinned blocks can make room; else leave it on disk."""
        if self._pinned_bytes + len(value) > self.capacity_bytes:
            self._disk.move_to_end(key)
            return
        self._drop_spill(key)
        self._insert(key, value)

    # -- disk tier --------------------------------------------------------------------------------------

    def _spill(self, key: bytes, value: bytes) -> None:
        if self._spill_dir is None:
            return
        if self.spill_capacity_bytes is not None and len(value) > self.spill_capacity_bytes:
            return
        frame = pack_frame({"key": key}, [value])
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(frame)
            os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
        except OSError:
            tmp.unlink(missing_ok=True)
            return  # a full or failing disk loses the evicted copy, never the request
        self._drop_spill(key, keep_file=True)
        self._disk[key] = len(frame)
        self._disk_bytes += len(frame)
        self._stats.spills += 1
        self._trim_disk()

    def _read_spill(self, key: bytes) -> bytes | None:
        """The value in `key`'s spill file, or None (and the file deleted) if it is missing or corrupt."""
        try:
            header, body = unpack_frame(self._path(key).read_bytes())
            if header.get("key") != key:
                raise CorruptBlockError(f"spill file for {key.hex()} holds another key")
            return bytes(body)
        except FileNotFoundError:
            self._drop_spill(key)
            return None
        except (OSError, CorruptBlockError):
            self._stats.corrupt += 1
            self._drop_spill(key)
            return None

    def _drop_spill(self, key: bytes, keep_file: bool = False) -> bool:
        size = self._disk.pop(key, None)
        if size is None:
            return False
        self._disk_bytes -= size
        if not keep_file:
            self._path(key).unlink(missing_ok=True)
        return True

    def _trim_disk(self) -> None:
        if self.spill_capacity_bytes is None:
            return
        while self._disk_bytes > self.spill_capacity_bytes:
            oldest = next(iter(self._disk))
            self._drop_spill(oldest)
            self._stats.disk_evictions += 1

    def _path(self, key: bytes) -> Path:
        assert self._spill_dir is not None
        return self._spill_dir / (key.hex() + _SPILL_SUFFIX)

    def _adopt_spill_files(self) -> None:
        """Index spill files left by an earlier store in this directory (oldest first); verified on read."""
        assert self._spill_dir is not None
        for tmp in self._spill_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        files = sorted(self._spill_dir.glob("*" + _SPILL_SUFFIX), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                key = bytes.fromhex(path.stem)
            except ValueError:
                continue
            self._disk[key] = path.stat().st_size
            self._disk_bytes += self._disk[key]
        self._trim_disk()


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not key:
        raise TypeError(f"block keys are non-empty bytes, got {type(key).__name__}")
