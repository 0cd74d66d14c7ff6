"""The front end's Backend (actors/frontend_backend.py) over a Deployment: one per gating actor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from moeray.actors.deploy import Deployment
from moeray.common.errors import BackendUnavailableError, RequestError
from moeray.common.sampling import SamplingParams, StepDelta


class DeploymentBackend:
    def __init__(self, dep: Deployment, index: int) -> None:
        self.dep, self.index = dep, index
        self.model_name = dep.config.served_name
        self.max_context = dep.model_cfg.max_position_embeddings
        self.vocab_size = dep.model_cfg.vocab_size
        self._inflight = 0

    # ---- text ------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.dep.tokenizer is None:
            raise RequestError(f"prompt: model {self.model_name!r} ships no tokenizer.json; send prompt_token_ids")
        return self.dep.tokenizer.encode(text).ids

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.dep.tokenizer is None:
            return ""
        return self.dep.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- requests --------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[StepDelta]:
        self._inflight += 1
        try:
            async for d in self.dep.stream(request_id, prompt_ids, params, gating_index=self.index):
                if d.finish_reason and d.finish_reason.startswith("error"):
                    raise BackendUnavailableError(f"request {request_id} failed in the engine: {d.finish_reason}")
                yield d
        finally:
            self._inflight -= 1

    async def cancel(self, request_id: str) -> None:
        try:
            await self.dep.gating_handles[self.index].cancel(request_id)
        except Exception:  # noqa: BLE001 - cancel is best effort and idempotent
            pass

    def load(self) -> int:
        return self._inflight

    def num_free_blocks(self) -> int:
        return self.dep.gating_handles[self.index].num_free_blocks().result()

    # ---- operations ------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        st = await asyncio.to_thread(self.dep.status)
        actors = []
        for g in st.get("gating", []):
            actors.append({"name": f"gating-{g['index']}", "kind": "gating", "node": g.get("node_id", "")[:12],
                           "device": g.get("device", "cpu"), "dtype": g.get("dtype", ""),
                           "transport": g.get("tensor_transport", "") if g.get("transport") == "ray" else "local",
                           "health": "healthy" if not g.get("last_error") else "degraded",
                           "load": float(g.get("active", 0)), "running": g.get("running", 0),
                           "free_blocks": g.get("free_blocks", 0)})
        for e in st.get("experts", []):
            health = "healthy" if e.get("healthy", True) else "unhealthy"
            if e.get("pending"):
                health = "starting"
            actors.append({"name": f"expert-{e['actor_id']}", "kind": "expert", "node": str(e.get("node_id", ""))[:12],
                           "device": e.get("device", ""), "dtype": e.get("dtype", ""), "health": health,
                           "load": float(e.get("busy_fraction", 0.0)), "group": e.get("group"),
                           "weight_bytes": int(e.get("weight_bytes", 0)), "off_cpu_s": e.get("off_cpu_s", 0.0)})
        for sid in st.get("kv_shards", []):
            actors.append({"name": sid, "kind": "kv_shard", "node": "", "device": "cpu", "health": "healthy",
                           "load": 0.0})
        return {"table_version": int(st.get("table_version", 0)), "actors": actors,
                "deployment": st.get("name", ""), "events": st.get("events", [])[-5:]}

    async def admin(self, op: str, **kwargs: Any) -> dict[str, Any]:
        d = self.dep
        if op == "scale":
            r = await asyncio.to_thread(d.scale, int(kwargs["group"]), int(kwargs["replicas"]))
            st = await asyncio.to_thread(d.status)
            return {"message": f"group {r['group']} now has replicas {r['replicas']}",
                    "table_version": st.get("table_version", 0)}
        if op == "drain":
            r = await asyncio.to_thread(d.drain, int(kwargs["actor"]))
            return {"message": f"drained expert actor {r['drained']}", "table_version": r["table_version"]}
        if op == "rebalance":
            r = await asyncio.to_thread(d.rebalance)
            if not r.get("changed"):
                return {"message": f"no change: {r.get('reason', '')}"}
            return {"message": f"imbalance {r['imbalance_before']:.2f} -> {r['imbalance_after']:.2f}",
                    "table_version": r["version"]}
        if op == "metrics":
            m = await asyncio.to_thread(d.metrics)
            return {"metrics": _flatten_metrics(m)}
        raise NotImplementedError(f"unknown admin operation {op!r}")


def _flatten_metrics(m: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for g in m.get("gating", []):
        labels = {"gating": str(g.get("index", 0))}
        for key in ("running", "waiting", "free_blocks", "preemptions", "steps", "prefill_tokens", "decode_tokens"):
            if key in g:
                out.append({"name": f"moeray_{key}", "value": float(g[key]), "labels": labels})
        for key, v in (g.get("kv_store") or {}).items():
            out.append({"name": f"moeray_kv_{key}", "value": float(v), "labels": labels})
        for key, v in (g.get("transport_stats") or {}).items():
            out.append({"name": f"moeray_transport_{key}", "value": float(v), "labels": labels})
        for pool, st in (g.get("kv_pools") or {}).items():  # KV cache bytes used / cached / free per pool
            for key, v in st.items():
                out.append({"name": f"moeray_kv_pool_{key}", "value": float(v), "labels": {**labels, "pool": pool}})
        for key, v in (g.get("prefix_cache") or {}).items():  # the gating actor's own prefix cache, hit rate
            out.append({"name": f"moeray_prefix_cache_{key}", "value": float(v), "labels": labels})
    c = m.get("controller")
    if c:
        out.append({"name": "moeray_failovers_total", "value": float(c.get("failovers", 0)), "labels": {}})
        out.append({"name": "moeray_routing_table_version", "value": float(c.get("table_version", 0)), "labels": {}})
        rec = c.get("recovery_s") or []
        if rec:
            out.append({"name": "moeray_recovery_seconds_last", "value": float(rec[-1]), "labels": {}})
    return out


def backends_for(dep: Deployment) -> list[DeploymentBackend]:
    return [DeploymentBackend(dep, i) for i in range(len(dep.gating))]
