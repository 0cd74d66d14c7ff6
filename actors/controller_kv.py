"""The controller's KV-shard keeper: restore the replication factor after a shard restarts empty or is lost.

A shard whose `started_at` changed was restarted by Ray (its memory is gone): it gets back, from the other
shards, every block the hash ring says it owns. A shard gone for good is replaced (same id, same options, see
actors/spawn.py), refilled the same way, and the gating actors are given the new handle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from moeray.actors.handles import RAY_CALL_ERRORS, GatingHandle, KVShardHandle, actor_exists, named_actor
from moeray.actors.spawn import kv_shard_name, start_kv_shard
from moeray.common.config import ServeConfig
from moeray.kvstore.ring import HashRing


class KVShardKeeper:
    def __init__(self, config: ServeConfig, deployment: str, shards: dict[str, Any] | None,
                 event: Callable[..., None]) -> None:
        self.config, self.deployment = config, deployment
        # by name: after a controller restart the handles it was built with may point at shards it replaced since
        self.shards = {sid: KVShardHandle(named_actor(kv_shard_name(deployment, sid), config.namespace, h), sid)
                       for sid, h in (shards or {}).items()}
        self._event = event
        self._started: dict[str, float] = {}

    def raw(self) -> dict[str, Any]:
        """The Ray handles, as gating actors take them."""
        return {sid: h.actor for sid, h in self.shards.items()}

    async def repair(self, gating: list[GatingHandle]) -> None:
        """One pass: refill restarted shards, replace lost ones."""
        if not self.shards:
            return
        ring = self._ring()
        for sid, h in list(self.shards.items()):
            try:
                st = await h.stats().wait(self.config.health_timeout_s)
            except RAY_CALL_ERRORS:  # dead or restarting: next pass
                if not actor_exists(kv_shard_name(self.deployment, sid), self.config.namespace):
                    await self._replace(sid, gating)
                continue
            started = st.get("started_at", 0.0)
            if self._started.get(sid) not in (None, started):
                await self._copy_to(sid, ring)
            self._started[sid] = started

    def _ring(self) -> HashRing:
        return HashRing(list(self.shards), replication=self.config.kv_store.replication)

    async def _replace(self, sid: str, gating: list[GatingHandle]) -> None:
        self.shards[sid] = KVShardHandle(start_kv_shard(self.config, self.deployment, sid, detached=True), sid)
        self._event("kv_shard_replaced", shard=sid)
        await self._copy_to(sid, self._ring())
        await asyncio.gather(*[g.set_kv_shards(self.raw()).wait(self.config.control_timeout_s) for g in gating],
                             return_exceptions=True)

    async def _copy_to(self, sid: str, ring: HashRing) -> int:
        copied = 0
        for other, h in self.shards.items():
            if other == sid:
                continue
            try:
                keys = await h.keys().wait(self.config.control_timeout_s)
            except RAY_CALL_ERRORS:
                continue
            mine = [k for k in keys if sid in ring.owners(k)]
            if not mine:
                continue
            try:
                values = await h.get_many(mine).wait(self.config.control_timeout_s)
            except RAY_CALL_ERRORS:
                continue
            puts = [self.shards[sid].put(k, v) for k, v in zip(mine, values, strict=True) if v is not None]
            done = await asyncio.gather(*[p.wait(self.config.control_timeout_s) for p in puts], return_exceptions=True)
            copied += sum(not isinstance(d, BaseException) for d in done)  # the rest: the next restart's repair
        self._event("kv_repair", shard=sid, blocks=copied)
        return copied
