"""Renders level summaries: a table for people, one JSON object for scripts."""

import json
from dataclasses import asdict

from textgen.benchmark.config import ServingConfig
from textgen.benchmark.summary import LevelSummary, Percentiles, throughput_ratios

_HEADERS = (
    "concurrency",
    "ok",
    "failed",
    "wall s",
    "out tok/s",
    "req/s",
    "TTFT ms p50/p90/p99",
    "ITL ms p50/p90/p99",
    "E2E ms p50/p99",
)


def render_table(summaries: list[LevelSummary]) -> str:
    """One row per level, then the errors seen and the throughput ratios to concurrency 1."""
    rows = [_HEADERS, *(_row(s) for s in summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(map(str.rjust, row, widths)) for row in rows]
    lines += _error_lines(summaries)
    ratios = throughput_ratios(summaries)
    lines += [f"throughput {c} vs 1: {ratio:.1f}x" for c, ratio in ratios.items()]
    return "\n".join(lines)


def render_json(config: ServingConfig, summaries: list[LevelSummary]) -> str:
    ratios = {str(c): ratio for c, ratio in throughput_ratios(summaries).items()}
    report = {
        "config": asdict(config),
        "levels": [asdict(s) for s in summaries],
        "throughput_vs_concurrency_1": ratios,
    }
    return json.dumps(report, indent=2)


def _row(s: LevelSummary) -> tuple[str, ...]:
    return (
        str(s.concurrency) if s.request_rate is None else f"rate {s.request_rate:g}/s",
        str(s.num_ok),
        str(s.num_failed),
        f"{s.wall_s:.2f}",
        f"{s.output_tokens_per_s:.1f}",
        f"{s.requests_per_s:.2f}",
        _format_ms(s.ttft_ms, with_p90=True),
        _format_ms(s.itl_ms, with_p90=True),
        _format_ms(s.latency_ms, with_p90=False),
    )


def _format_ms(p: Percentiles | None, with_p90: bool) -> str:
    if p is None:
        return "-"
    values = (p.p50, p.p90, p.p99) if with_p90 else (p.p50, p.p99)
    return "/".join(f"{v:.1f}" for v in values)


def _error_lines(summaries: list[LevelSummary]) -> list[str]:
    return [
        f"concurrency {s.concurrency}: {count} failed with {message}"
        for s in summaries
        for message, count in s.errors.items()
    ]
