"""The server's counters and `/metrics` in Prometheus' text format.

One registry per server (prometheus_client's default registry is process-global); its
collector reads the counters, the engine's and the expert cache's, at each scrape.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_CACHE_COUNTERS = ("hits", "misses", "bytes_copied", "evictions", "cpu_computed", "prefetch_issued",
                   "prefetch_used")
_CACHE_GAUGES = ("hit_rate", "prefetch_precision")


class RequestCounter:
    """HTTP requests answered, by endpoint and status code."""

    def __init__(self):
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()

    def count(self, endpoint: str, status: int) -> None:
        self.counts[(endpoint, status)] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class _Collector:
    def __init__(self, requests: RequestCounter, engine: Callable[[], Any], stats: Callable[[], dict | None]):
        self.requests, self.engine, self.stats = requests, engine, stats

    def collect(self) -> Iterator:
        requests = CounterMetricFamily("offload_moe_requests", "HTTP requests answered", labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(self.requests.counts.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        engine = self.engine()
        if engine is not None:
            yield from _engine_metrics(engine)
        stats = self.stats()
        if stats is not None:
            yield from _cache_metrics(stats)


def _engine_metrics(engine) -> Iterator:
    c = engine.counters
    yield CounterMetricFamily("offload_moe_prompt_tokens", "prompt tokens prefilled", value=c.prompt_tokens)
    yield CounterMetricFamily("offload_moe_completion_tokens", "tokens generated", value=c.completion_tokens)
    yield CounterMetricFamily("offload_moe_decode_steps", "batched decode forwards", value=c.decode_steps)
    yield CounterMetricFamily("offload_moe_prefill_seconds", "time spent in prompt forwards", value=c.prefill_seconds)
    yield CounterMetricFamily("offload_moe_decode_seconds", "time spent in decode forwards", value=c.decode_seconds)
    yield GaugeMetricFamily("offload_moe_tokens_per_second", "tokens generated per second over the last "
                            f"{c.WINDOW_S:g} s", value=c.tokens_per_second())
    yield GaugeMetricFamily("offload_moe_queue_length", "requests waiting for a place", value=engine.queue_length)
    yield GaugeMetricFamily("offload_moe_active_requests", "requests being decoded", value=engine.active)


def _cache_metrics(stats: dict) -> Iterator:
    rows = [(str(row["layer"]), row) for row in stats["layers"]] + [("total", stats["total"])]
    kinds = [(name, CounterMetricFamily) for name in _CACHE_COUNTERS] + [(name, GaugeMetricFamily)
                                                                          for name in _CACHE_GAUGES]
    for name, kind in kinds:
        family = kind(f"offload_moe_expert_cache_{name}", f"expert cache {name.replace('_', ' ')}", labels=["layer"])
        for layer, row in rows:
            family.add_metric([layer], row[name])
        yield family


def metrics_text(requests: RequestCounter, engine: Callable[[], Any], stats: Callable[[], dict | None]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Collector(requests, engine, stats))
    return generate_latest(registry)
