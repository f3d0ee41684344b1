"""Prometheus metrics of one server instance (its own registry, so apps in one process don't mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily


class _CacheCollector:
    def __init__(self, cache):
        self._cache = cache

    def collect(self):
        yield CounterMetricFamily("sam2flow_embedding_cache_hits", "Embedding cache hits", value=self._cache.hits)
        yield CounterMetricFamily("sam2flow_embedding_cache_misses", "Embedding cache misses", value=self._cache.misses)


class ServerMetrics:
    def __init__(self, cache):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sam2flow_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("sam2flow_request_seconds", "HTTP request latency", ["route"], registry=r)
        self.batch_size = Histogram(
            "sam2flow_embed_batch_size",
            "Images per embedding batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.model_load = Gauge("sam2flow_model_load_seconds", "Model load time", ["version"], registry=r)
        r.register(_CacheCollector(cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)
