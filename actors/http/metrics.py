"""GET /metrics: Prometheus text (prometheus-client) with the HTTP layer's own series and the backends' moeray_*.

The HTTP layer counts requests by endpoint and status and measures time to first token, inter-token latency
and end-to-end latency as a client sees them. The backends' series (the same names ray.util.metrics exports on
each node: moeray_running, moeray_kv_*, moeray_failovers_total, ...) are read from `Backend.admin("metrics")`
when /metrics is scraped, and written as gauges.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HTTPMetrics:
    """One registry per app (tests start several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("moeray_http_requests", "HTTP API requests by endpoint and status",
                                ("endpoint", "status"), registry=self.registry)
        self.ttft = Histogram("moeray_http_time_to_first_token_seconds", "request arrival -> first token",
                              buckets=LATENCY_BOUNDS_S, registry=self.registry)
        self.itl = Histogram("moeray_http_inter_token_latency_seconds", "time between a choice's tokens",
                             buckets=LATENCY_BOUNDS_S, registry=self.registry)
        self.e2e = Histogram("moeray_http_e2e_request_latency_seconds", "request arrival -> last token",
                             buckets=LATENCY_BOUNDS_S, registry=self.registry)
        self.tokens = Counter("moeray_http_generated_tokens", "tokens returned", registry=self.registry)
        self._backend_metrics: list[dict[str, Any]] = []
        self.registry.register(_BackendCollector(self))

    def observe_piece(self, piece, arrival_s: float, last_s: list, index: int) -> None:
        """A choice's step arrived: TTFT for its first tokens, ITL (per token) after that."""
        if not piece.token_ids:
            return
        now = time.monotonic()
        if last_s[index] is None:
            self.ttft.observe(now - arrival_s)
        else:
            gap = (now - last_s[index]) / len(piece.token_ids)
            for _ in piece.token_ids:
                self.itl.observe(gap)
        last_s[index] = now
        self.tokens.inc(len(piece.token_ids))

    def finished(self, endpoint: str, status: int, elapsed_s: float | None = None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status == 200 and elapsed_s is not None:
            self.e2e.observe(elapsed_s)

    def render(self, backend_metrics: list[dict[str, Any]]) -> bytes:
        self._backend_metrics = backend_metrics
        return generate_latest(self.registry)


class _BackendCollector:
    def __init__(self, owner: HTTPMetrics) -> None:
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        label_names: dict[str, list[str]] = {}
        for m in self.owner._backend_metrics:
            name = re.sub(r"[^a-zA-Z0-9_:]", "_", str(m["name"]))
            labels = {str(k): str(v) for k, v in (m.get("labels") or {}).items()}
            if name not in families:
                label_names[name] = sorted(labels)
                families[name] = GaugeMetricFamily(name, f"{name} (from the backends)", labels=label_names[name])
            families[name].add_metric([labels.get(k, "") for k in label_names[name]], float(m["value"]))
        yield from families.values()
