"""The figures of one concurrency level, computed from its requests' timings.

Latencies come from successful requests only; failed requests are counted and their
error messages tallied.
"""

import statistics
from collections import Counter
from dataclasses import dataclass

from textgen.benchmark.client import RequestResult


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class LevelSummary:
    concurrency: int
    num_ok: int
    num_failed: int
    wall_s: float  # first measured request sent to last one finished
    num_output_tokens: int  # over successful requests
    output_tokens_per_s: float  # num_output_tokens / wall_s
    requests_per_s: float  # num_ok / wall_s
    ttft_ms: Percentiles | None  # time to first token; None when no request succeeded
    itl_ms: Percentiles | None  # inter-token latency, gaps pooled over all streams
    latency_ms: Percentiles | None  # end to end, request sent to stream closed
    errors: dict[str, int]  # error message -> number of failed requests
    request_rate: float | None = None  # open-loop arrivals per second; None: closed loop


def percentiles(values: list[float]) -> Percentiles | None:
    """p50/p90/p99 with linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return None
    if len(values) == 1:
        return Percentiles(values[0], values[0], values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return Percentiles(p50=cuts[49], p90=cuts[89], p99=cuts[98])


def summarize(
    concurrency: int,
    results: list[RequestResult],
    wall_s: float,
    request_rate: float | None = None,
) -> LevelSummary:
    ok = [r for r in results if r.ok]
    num_output_tokens = sum(r.num_output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.inter_token_latencies]
    return LevelSummary(
        concurrency=concurrency,
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        wall_s=wall_s,
        num_output_tokens=num_output_tokens,
        output_tokens_per_s=num_output_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_ms=_to_ms(percentiles(ttfts)),
        itl_ms=_to_ms(percentiles(itls)),
        latency_ms=_to_ms(percentiles([r.latency for r in ok])),
        errors=dict(Counter(r.error for r in results if r.error is not None)),
        request_rate=request_rate,
    )


def throughput_ratios(summaries: list[LevelSummary]) -> dict[int, float]:
    """Output tokens/s of each level over that of concurrency 1, when both were measured."""
    base = next((s for s in summaries if s.concurrency == 1 and s.request_rate is None), None)
    if base is None or base.output_tokens_per_s == 0:
        return {}
    return {
        s.concurrency: s.output_tokens_per_s / base.output_tokens_per_s
        for s in summaries
        if s.concurrency != 1 and s.request_rate is None
    }


def _to_ms(seconds: Percentiles | None) -> Percentiles | None:
    if seconds is None:
        return None
    return Percentiles(seconds.p50 * 1e3, seconds.p90 * 1e3, seconds.p99 * 1e3)
