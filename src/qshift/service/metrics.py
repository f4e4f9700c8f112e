"""Prometheus metrics of the service (one registry per app)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qshift_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("qshift_request_seconds", "HTTP request latency", ["endpoint"], buckets=BUCKETS,
                                 registry=r)
        self.stage = Histogram("qshift_stage_seconds", "Seconds per pipeline stage and batch", ["stage"],
                               buckets=BUCKETS, registry=r)
        self.batch_size = Histogram("qshift_batch_queries", "Queries per worker batch", buckets=(1, 2, 4, 8, 16,
                                                                                                  32, 64, 128),
                                    registry=r)
        self.adapt_steps = Counter("qshift_adapt_batches_total", "Batches adapted on", ["index"], registry=r)
        self.resets = Counter("qshift_adapt_resets_total", "Adaptation resets (requested)", registry=r)
        self.cache_hits = Counter("qshift_refine_cache_hits_total", "Rewrites read from the cache", registry=r)
        self.cache_misses = Counter("qshift_refine_cache_misses_total", "Rewrites computed", registry=r)
        self.adapter_batches = Gauge("qshift_adapter_batches", "Batches each online adapter has learnt from",
                                     ["index", "pipeline"], registry=r)
        self.adapter_queries = Gauge("qshift_adapter_queries", "Queries each online adapter has learnt from",
                                     ["index", "pipeline"], registry=r)
        self.worker_batches = Gauge("qshift_worker_batches", "Batches the worker has run", registry=r)
        self._seen: dict[int, tuple[int, int]] = {}

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, key: Any, jobs: list, pipe: Any, seconds: float) -> None:
        """Called by the worker after each batch."""
        self.batch_size.observe(len(jobs))
        timings = jobs[0].future.result().timings if jobs and jobs[0].future.done() else {}
        for stage, sec in timings.items():
            self.stage.labels(stage).observe(sec)
        if "adapt" in pipe.info:
            self.adapt_steps.labels(key[0]).inc()
        refine = pipe.info.get("refine", {})
        hits = sum(v.get("cache_hits", 0) for v in refine.values())
        misses = sum(v.get("cache_misses", 0) for v in refine.values())
        h0, m0 = self._seen.get(id(pipe), (0, 0))
        self.cache_hits.inc(max(0, hits - h0))
        self.cache_misses.inc(max(0, misses - m0))
        self._seen[id(pipe)] = (hits, misses)

    def text(self, service: Any = None) -> str:
        if service is not None:
            self.worker_batches.set(service.worker.batches)
            for (index, *_), pipe in list(service.pipelines.items()):
                for stage in pipe.stages:
                    if stage.kind == "adapt" and stage.adapter is not None:
                        self.adapter_batches.labels(index, pipe.key).set(stage.adapter.stats["batches"])
                        self.adapter_queries.labels(index, pipe.key).set(stage.adapter.stats["queries"])
        return generate_latest(self.registry).decode()
