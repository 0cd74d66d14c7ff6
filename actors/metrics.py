"""Metrics through `ray.util.metrics` (Ray exports them for Prometheus on each node's metrics port).

Names are prefixed `moeray_`. Gating actors record request latency and throughput; the controller records
failovers, recovery time, routing-table version, per-actor load and imbalance.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class GatingMetrics:
    def __init__(self, index: int) -> None:
        tags = {"gating": str(index)}
        self.ttft = Histogram("moeray_ttft_seconds", "time to first token", boundaries=_LATENCY_BOUNDS_S,
                              tag_keys=("gating",))
        self.itl = Histogram("moeray_inter_token_seconds", "time between tokens of a request",
                             boundaries=_LATENCY_BOUNDS_S, tag_keys=("gating",))
        self.tokens = Counter("moeray_generated_tokens_total", "generated tokens", tag_keys=("gating",))
        self.queue = Gauge("moeray_queue_depth", "requests waiting for admission", tag_keys=("gating",))
        self.running = Gauge("moeray_running_requests", "requests being decoded", tag_keys=("gating",))
        self.kv_hit_tokens = Counter("moeray_kv_hit_tokens_total", "prompt tokens served from the KV store",
                                     tag_keys=("gating",))
        self.kv_written = Counter("moeray_kv_written_blocks_total", "blocks written to the KV store",
                                  tag_keys=("gating",))
        self.prefix_hit_rate = Gauge("moeray_prefix_cache_hit_rate", "prompt tokens found in the gating actor's "
                                     "own cache / prompt tokens looked up", tag_keys=("gating",))
        self.kv_pool_bytes = Gauge("moeray_kv_pool_bytes", "KV cache bytes per pool: used, cached (evictable), free",
                                   tag_keys=("gating", "pool", "state"))
        for m in (self.ttft, self.itl, self.tokens, self.queue, self.running, self.kv_hit_tokens, self.kv_written,
                  self.prefix_hit_rate, self.kv_pool_bytes):
            m.set_default_tags(tags)

    def kv_cache(self, hit_rate: float, pools: dict[str, dict[str, int]]) -> None:
        """The engine's prefix-cache hit rate and per-pool bytes (BlockManager.cache_stats / usage)."""
        self.prefix_hit_rate.set(hit_rate)
        for pool, st in pools.items():
            for state in ("used", "cached", "free"):
                self.kv_pool_bytes.set(st[f"{state}_bytes"], tags={"pool": pool, "state": state})


class ControllerMetrics:
    def __init__(self) -> None:
        self.failovers = Counter("moeray_failovers_total", "actors marked unhealthy and routed around")
        self.failovers_total = 0
        self.recovery = Histogram("moeray_recovery_seconds", "unhealthy -> re-admitted",
                                  boundaries=[0.5, 1, 2, 5, 10, 30, 60, 120])
        self.table_version = Gauge("moeray_routing_table_version", "active routing-table version")
        self.actor_load = Gauge("moeray_expert_actor_busy_fraction", "busy fraction per expert actor",
                                tag_keys=("actor",))
        self.imbalance = Gauge("moeray_expert_imbalance", "max/mean expected load per expert actor (last EPLB)")
