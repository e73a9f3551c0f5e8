"""Prometheus metrics of the service, in a private registry that the BentoML service
appends to its own `/metrics` output (via its `__metrics__` hook).

Under `bentoml serve`, prometheus_client runs in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR): counters and histograms of every worker are written to
shared files and BentoML's own output already holds them, summed over workers; only
the families missing from that output (the live-callback gauges, which multiprocess
mode cannot share) are appended, so no family is printed twice."""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CACHE_STATS = {"capacity": "Shards the live sampler's cache can hold",
               "resident": "Shards now resident in the live sampler's cache",
               "hits": "Shard look-ups served from the cache since the live sampler was loaded",
               "misses": "Shard loads from disk since the live sampler was loaded",
               "evictions": "Shards evicted since the live sampler was loaded"}


class _CacheCollector(Collector):
    def __init__(self, stats: Callable[[], dict], held: Callable[[], list[str]]):
        self.stats, self.held = stats, held

    def collect(self):
        stats, worker = self.stats(), str(os.getpid())
        for key, doc in CACHE_STATS.items():
            family = GaugeMetricFamily(f"cdm_shard_cache_{key}", doc, labels=["worker"])
            family.add_metric([worker], float(stats.get(key) or 0))
            yield family
        family = GaugeMetricFamily("cdm_worker_holds_contributor",
                                   "1 for each contributor whose weights this worker's "
                                   "sampler holds or may load", labels=["worker", "contributor"])
        for cid in self.held():
            family.add_metric([worker, cid], 1.0)
        yield family


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

    def watch_shard_cache(self, stats: Callable[[], dict], held: Callable[[], list[str]]) -> None:
        """Expose `stats()` (this worker's `ShardBank.stats`) and `held()` (the
        contributors whose weights it holds) as gauges labelled with the worker's pid. A collector, not `Gauge` objects: multiprocess mode would
        write a Gauge to the shared files as 0 and print it beside the live value."""
        self.registry.register(_CacheCollector(stats, held))

    def record_generation(self, contributors: list[str], attribution: dict[str, list[float]],
                          seconds: float) -> None:
        self.requests.inc()
        self.latency.observe(seconds)
        for c in contributors:
            self.samples.labels(contributor=c).inc(len(attribution[c]))
            self.attribution.labels(contributor=c).inc(sum(attribution[c]))

    def exposition(self, already: str = "") -> str:
        """This registry in the text format, without the families `already` has."""
        present = {line.split()[2] for line in already.splitlines() if line.startswith("# TYPE ")}
        out, keep = [], True
        for line in generate_latest(self.registry).decode().splitlines(keepends=True):
            if line.startswith("# HELP "):
                name = line.split()[2]
                keep = name not in present and name.removesuffix("_total") not in present
            if keep:
                out.append(line)
        return "".join(out)
