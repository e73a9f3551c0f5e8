"""Prometheus metrics of the service, in a private registry that the BentoML service
appends to its own `/metrics` output (via its `__metrics__` hook)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CACHE_STATS = {"capacity": "Shards the live sampler's cache can hold",
               "resident": "Shards now resident in the live sampler's cache",
               "hits": "Shard look-ups served from the cache since the live sampler was loaded",
               "misses": "Shard loads from disk since the live sampler was loaded",
               "evictions": "Shards evicted since the live sampler was loaded"}


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.samples = Counter("cdm_generated_samples", "Samples generated with the contributor allowed",
                               ["contributor"], registry=self.registry)
        self.attribution = Counter("cdm_attribution_mass", "Sum of per-sample attribution",
                                   ["contributor"], registry=self.registry)
        self.requests = Counter("cdm_generate_requests", "Successful generate requests",
                                registry=self.registry)
        self.forgets = Counter("cdm_forget_requests", "Acknowledged forget requests",
                               registry=self.registry)
        self.latency = Histogram("cdm_generate_latency_seconds", "Sampling time per generate request",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                                 registry=self.registry)
        self.batch_size = Histogram("cdm_generate_batch_requests", "Generate requests sampled in one batch",
                                    buckets=(1, 2, 4, 8, 16), registry=self.registry)

    def watch_shard_cache(self, stats: Callable[[], dict]) -> None:
        """Expose `stats()` (the live sampler's `ShardBank.stats`) as gauges."""
        for key, doc in CACHE_STATS.items():
            gauge = Gauge(f"cdm_shard_cache_{key}", doc, registry=self.registry)
            gauge.set_function(lambda key=key: float(stats().get(key) or 0))

    def record_generation(self, contributors: list[str], attribution: dict[str, list[float]],
                          seconds: float) -> None:
        self.requests.inc()
        self.latency.observe(seconds)
        for c in contributors:
            self.samples.labels(contributor=c).inc(len(attribution[c]))
            self.attribution.labels(contributor=c).inc(sum(attribution[c]))

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
