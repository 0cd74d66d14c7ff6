"""Cache-aware choice of a gating actor: consistent hashing of a prompt's first block, bounded by load.

A request goes to the gating actor most likely to hold its prefix in its own cache: the owner of the prompt's
first-block key on a hash ring (`vnodes` points per actor, so keys spread evenly and adding an actor moves only
1/n of them). An actor is skipped while taking one more request would put it above `bound` x the mean
in-flight count (consistent hashing with bounded loads, Mirrokni et al. 2018): hot prefixes spill to the next
actor on the ring, the same one each time, so a prefix is cached on few actors. Pure: no Ray, no clock.

Legend: n = actors, k = ring points (n * vnodes).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

AFFINITY_TOKENS = 16  # the prompt tokens hashed: the first block at the default block_size
LOAD_BOUND = 1.25


def prefix_key(prompt_ids: Sequence[int], num_tokens: int = AFFINITY_TOKENS, cache_salt: str | None = None) -> int:
    """A 64-bit hash of the prompt's first `num_tokens` token ids (the first block), and of the request's
    cache_salt when it has one (its blocks are cached apart, so it need not follow the unsalted prefix)."""
    raw = b"".join(int(t).to_bytes(8, "little", signed=False) for t in prompt_ids[:num_tokens])
    if cache_salt is not None:  # length-prefixed after the ids: unsalted keys are unchanged
        salt = cache_salt.encode("utf-8")
        raw += b"\xffsalt" + len(salt).to_bytes(4, "little") + salt
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"moeray.affinity").digest(), "little")


@functools.cache
def ring_points(num_actors: int, vnodes: int = 64) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The hash ring: sorted point hashes [k] and the actor each belongs to [k]."""
    points = []
    for a in range(num_actors):
        for v in range(vnodes):
            h = hashlib.blake2b(f"{a}:{v}".encode(), digest_size=8, person=b"moeray.ring").digest()
            points.append((int.from_bytes(h, "little"), a))
    points.sort()
    return tuple(p for p, _ in points), tuple(a for _, a in points)


def load_cap(loads: Sequence[int], bound: float = LOAD_BOUND) -> int:
    """The most in-flight requests an actor may hold after taking one more: ceil(bound * mean), mean over the
    requests in flight plus the new one."""
    return max(1, math.ceil(bound * (sum(loads) + 1) / len(loads)))


def affinity_order(key: int, loads: Sequence[int], bound: float = LOAD_BOUND, vnodes: int = 64) -> list[int]:
    """Actor indices in the order to try for a request with prefix `key`: actors under the load cap in ring
    order from the key, then the others by load (a caller fails over down the list)."""
    n = len(loads)
    if n == 1:
        return [0]
    points, owners = ring_points(n, vnodes)
    start = bisect.bisect(points, key)
    ring, seen = [], set()
    for i in range(len(points)):
        a = owners[(start + i) % len(points)]
        if a not in seen:
            seen.add(a)
            ring.append(a)
    cap = load_cap(loads, bound)
    under = [a for a in ring if loads[a] + 1 <= cap]
    over = sorted((a for a in ring if loads[a] + 1 > cap), key=lambda a: loads[a])
    return under + over


def order_by_affinity(backends: Sequence[T], prompt_ids: Sequence[int], bound: float = LOAD_BOUND,
                      cache_salt: str | None = None) -> list[T]:
    """`backends` (anything with `.load()` -> in-flight requests) in the order to try for this prompt."""
    loads = [int(b.load()) for b in backends]
    key = prefix_key(prompt_ids, cache_salt=cache_salt)
    return [backends[i] for i in affinity_order(key, loads, bound)]
