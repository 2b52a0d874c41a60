"""Prometheus: the live gauges, read at scrape time so they cost nothing per token, and the
registry /metrics renders (counters and histograms are recorded by telemetry.py). Names
follow TGI's where TGI has the metric."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from textgen.router.allocator import BlockAllocator
from textgen.router.queue import Queue
from textgen.router.scheduler import Scheduler


class LiveStateCollector(Collector):
    def __init__(self, queue: Queue, scheduler: Scheduler, allocator: BlockAllocator) -> None:
        self._queue = queue
        self._scheduler = scheduler
        self._allocator = allocator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("tgi_queue_size", "Requests waiting", value=len(self._queue))
        yield GaugeMetricFamily(
            "tgi_batch_current_size", "Requests in the running batch", self._scheduler.num_running
        )
        yield GaugeMetricFamily(
            "tgi_batch_current_max_tokens",
            "KV tokens the running batch may reach (prompts + max_new_tokens)",
            self._scheduler.current_max_tokens,
        )
        yield GaugeMetricFamily(
            "textgen_kv_blocks_used", "KV blocks held by requests", self._allocator.num_used_blocks
        )
        yield GaugeMetricFamily(
            "textgen_kv_blocks_free",
            "KV blocks an allocation can take (free, or cached and held by no request)",
            self._allocator.num_free_blocks,
        )
        stats = self._allocator.stats()
        yield GaugeMetricFamily(
            "textgen_prefix_cache_blocks",
            "KV blocks named by the prefix cache",
            stats.cached_blocks,
        )
        yield GaugeMetricFamily(
            "textgen_prefix_cache_evictable_blocks",
            "Cached KV blocks no request holds (evicted, least recently used first, for room)",
            stats.evictable_blocks,
        )
        yield CounterMetricFamily(
            "textgen_prefix_cache_evictions",
            "Cached KV blocks evicted to make room",
            stats.evictions,
        )


def make_registry(
    queue: Queue,
    scheduler: Scheduler,
    allocator: BlockAllocator,
    registry: CollectorRegistry | None = None,
) -> CollectorRegistry:
    """Add the live gauges to `registry` (the one RouterMetrics records on) or a new one."""
    if registry is None:
        registry = CollectorRegistry(auto_describe=True)
    registry.register(LiveStateCollector(queue, scheduler, allocator))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
