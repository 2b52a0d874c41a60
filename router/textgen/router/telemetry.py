"""Prometheus metrics recorded as requests and steps happen (the live gauges are in metrics.py).

Names, label sets and bucket layouts are TGI's (router/src/server.rs, infer/mod.rs,
validation.rs, backends/v3/src/{queue,backend}.rs) so TGI's dashboards work unchanged;
`textgen_*` metrics are ours. Cost: request metrics are recorded once per request, step
metrics once per step; nothing is recorded per token. Inter-token latency, which is per
token by nature, is recorded per step as one weighted observation per batch (every request
of a batch waited the same time for its token).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from textgen.router.client import StepResult
from textgen.router.request import Entry, ValidRequest

STEP_METHODS = ("prefill", "decode")
FAILURE_REASONS = ("validation", "overloaded", "generation", "dropped")
CONCAT_REASONS = ("backpressure", "wait_exceeded")
SHARD_PHASES = ("concat", "forward", "sampling", "total")


def duration_buckets() -> list[float]:
    """TGI's buckets for every metric whose name ends in `duration`: 35 steps of x1.5 from
    0.15 ms to ~211 s."""
    buckets, value = [], 0.0001
    for _ in range(35):
        value *= 1.5  # as TGI computes them, so the `le` labels match to the last digit
        buckets.append(value)
    return buckets


def linear_buckets(limit: int, count: int = 100) -> list[float]:
    """TGI's token-count buckets: `count` equal steps up to `limit`."""
    return [limit / count * (k + 1) for k in range(count)]


def batch_size_buckets() -> list[float]:
    """TGI's `tgi_batch_next_size` buckets: 1, 2, ..., 1024."""
    return [float(k + 1) for k in range(1024)]


@dataclass(frozen=True)
class TokenLimits:
    """The limits TGI scales its token-count buckets by."""

    max_input_tokens: int
    max_total_tokens: int


class WeightedHistogram(Collector):
    """A histogram that takes `n` equal observations in one call (one per step, not per token).

    Only the event loop writes and reads it, so it needs no lock.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self._counts[bisect_left(self._bounds, value)] += n
        self._sum += value * n

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append((_bound_label(bound), cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class RouterMetrics:
    """Every counter and histogram the router records, on one per-app registry."""

    def __init__(self, registry: CollectorRegistry, limits: TokenLimits) -> None:
        self.registry = registry
        self._requests(registry, limits)
        self._steps(registry)
        self._own(registry)

    @classmethod
    def standalone(cls) -> RouterMetrics:
        """Metrics on a registry of their own, for a scheduler nobody scrapes (tests)."""
        return cls(CollectorRegistry(auto_describe=True), TokenLimits(4095, 4096))

    def _requests(self, r: CollectorRegistry, limits: TokenLimits) -> None:
        durations = duration_buckets()
        total_buckets = linear_buckets(limits.max_total_tokens)
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests answered", registry=r)
        failure = Counter("tgi_request_failure", "Requests failed", ["err"], registry=r)
        self.request_failure = {err: failure.labels(err=err) for err in FAILURE_REASONS}

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.request_duration = hist("tgi_request_duration", "Request latency", durations)
        self.validation_duration = hist(
            "tgi_request_validation_duration", "Validation time", durations
        )
        self.queue_duration = hist("tgi_request_queue_duration", "Time in the queue", durations)
        self.inference_duration = hist(
            "tgi_request_inference_duration", "Time from batching to the last token", durations
        )
        self.time_per_token = hist(
            "tgi_request_mean_time_per_token_duration", "Inference time per token", durations
        )
        self.generated_tokens = hist(
            "tgi_request_generated_tokens", "Tokens generated per request", total_buckets
        )
        self.input_length = hist(
            "tgi_request_input_length",
            "Prompt tokens per request",
            linear_buckets(limits.max_input_tokens),
        )
        self.max_new_tokens = hist(
            "tgi_request_max_new_tokens", "max_new_tokens per request", total_buckets
        )

    def _steps(self, r: CollectorRegistry) -> None:
        durations = duration_buckets()

        def per_method(metric: Counter | Histogram) -> dict:
            return {method: metric.labels(method=method) for method in STEP_METHODS}

        def hist(name: str, doc: str) -> dict:
            return per_method(Histogram(name, doc, ["method"], buckets=durations, registry=r))

        self.batch_count = per_method(
            Counter("tgi_batch_inference_count", "Steps started", ["method"], registry=r)
        )
        self.batch_success = per_method(
            Counter("tgi_batch_inference_success", "Steps that succeeded", ["method"], registry=r)
        )
        self.batch_failure = per_method(
            Counter("tgi_batch_inference_failure", "Steps that failed", ["method"], registry=r)
        )
        self.batch_inference = hist("tgi_batch_inference_duration", "Step time, router side")
        self.batch_forward = hist("tgi_batch_forward_duration", "Shard forward pass")
        self.batch_decode = hist("tgi_batch_decode_duration", "Shard sampling after the forward")
        self.batch_filter = hist("tgi_batch_filter_duration", "Delivering tokens and filtering")
        self.batch_concat_duration = Histogram(
            "tgi_batch_concat_duration",
            "Shard batch concat",
            ["method"],
            buckets=durations,
            registry=r,
        ).labels(method="decode")
        concat = Counter("tgi_batch_concat", "Newcomers prefilled", ["reason"], registry=r)
        self.batch_concat = {reason: concat.labels(reason=reason) for reason in CONCAT_REASONS}
        self.batch_next_size = Histogram(
            "tgi_batch_next_size",
            "Requests per new batch",
            buckets=batch_size_buckets(),
            registry=r,
        )

    def _own(self, r: CollectorRegistry) -> None:
        durations = duration_buckets()
        self.time_to_first_token = Histogram(
            "textgen_time_to_first_token_seconds",
            "From request received to its first token",
            buckets=durations,
            registry=r,
        )
        self.inter_token_latency = WeightedHistogram(
            "textgen_inter_token_latency_seconds",
            "Time between two tokens of a request (from one decode step to the next)",
            durations,
        )
        r.register(self.inter_token_latency)
        self.prefix_cache_hit_tokens = Counter(
            "textgen_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache instead of computed",
            registry=r,
        )
        self.prefix_cache_hit_ratio = Histogram(
            "textgen_prefix_cache_hit_ratio",
            "Fraction of each admitted request's prompt served from the prefix cache",
            buckets=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0],
            registry=r,
        )
        phase = Histogram(
            "textgen_shard_step_duration_seconds",
            "Shard time per step by phase (concat: decode only; sampling: after the forward)",
            ["method", "phase"],
            buckets=durations,
            registry=r,
        )
        self.shard_phase = {
            (method, name): phase.labels(method=method, phase=name)
            for method in STEP_METHODS
            for name in SHARD_PHASES
            if (method, name) != ("prefill", "concat")
        }

    # -- requests ------------------------------------------------------------

    def request_received(self) -> None:
        self.request_count.inc()

    def prefix_cache_used(self, entry: Entry) -> None:
        """Once per admitted request: how much of its prompt came from the prefix cache."""
        cached = entry.allocation.cached_tokens if entry.allocation is not None else 0
        self.prefix_cache_hit_tokens.inc(cached)
        self.prefix_cache_hit_ratio.observe(cached / entry.request.input_len)

    def request_rejected(self, reason: str) -> None:
        self.request_failure[reason].inc()

    def request_validated(self, request: ValidRequest) -> None:
        self.input_length.observe(request.input_len)
        self.max_new_tokens.observe(request.stopping.max_new_tokens)

    def request_finished(self, entry: Entry) -> None:
        """Once per admitted request, when its handler lets go of it."""
        t = entry.timings
        if t.first_token:
            self.time_to_first_token.observe(t.first_token - t.received)
        if entry.cancelled:
            self.request_failure["dropped"].inc()
        elif t.finished:
            self._success(entry)
        else:
            self.request_failure["generation"].inc()

    def _success(self, entry: Entry) -> None:
        t = entry.timings
        inference = t.finished - t.batched
        self.request_success.inc()
        self.request_duration.observe(time.monotonic() - t.received)
        self.validation_duration.observe(t.queued - t.received)
        self.queue_duration.observe(t.batched - t.queued)
        self.inference_duration.observe(inference)
        self.time_per_token.observe(inference / max(entry.num_generated, 1))
        self.generated_tokens.observe(entry.num_generated)

    # -- steps ---------------------------------------------------------------

    def batch_formed(self, size: int, concat_reason: str | None) -> None:
        self.batch_next_size.observe(size)
        if concat_reason is not None:
            self.batch_concat[concat_reason].inc()

    def step_started(self, method: str) -> None:
        self.batch_count[method].inc()

    def step_failed(self, method: str) -> None:
        self.batch_failure[method].inc()

    def step_done(self, method: str, result: StepResult, started: float, delivered: float) -> None:
        """`started`: before the RPC; `delivered`: the RPC returned (filtering starts)."""
        now = time.monotonic()
        self.batch_success[method].inc()
        self.batch_inference[method].observe(now - started)
        self.batch_filter[method].observe(now - delivered)
        self.batch_forward[method].observe(result.forward_ns / 1e9)
        self.batch_decode[method].observe(result.decode_ns / 1e9)
        phase = self.shard_phase
        phase[method, "forward"].observe(result.forward_ns / 1e9)
        phase[method, "sampling"].observe(result.decode_ns / 1e9)
        phase[method, "total"].observe(result.total_ns / 1e9)
        if method == "decode":
            self.batch_concat_duration.observe(result.concat_ns / 1e9)
            phase[method, "concat"].observe(result.concat_ns / 1e9)

    def tokens_waited(self, seconds: float, num_requests: int) -> None:
        """`num_requests` requests each got a token `seconds` after their previous one."""
        if num_requests:
            self.inter_token_latency.observe(seconds, num_requests)
