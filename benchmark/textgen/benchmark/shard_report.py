"""Renders the shard benchmark: one row per phase and batch size, or one JSON object."""

from __future__ import annotations

import json
from dataclasses import asdict

from textgen.benchmark.shard import PhaseSummary, ShardBenchConfig
from textgen.proto import generate_pb2 as pb

_HEADERS = (
    "phase",
    "batch",
    "steps",
    "latency ms p50/p90/p99",
    "tok/s p50/p90/p99",
)


def render_shard_table(info: pb.InfoResponse, summaries: list[PhaseSummary]) -> str:
    title = f"{info.model_type} {info.dtype} on {info.device_type}, {info.world_size} shard(s)"
    rows = [_HEADERS, *(_row(s) for s in summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    return "\n".join([title, *("  ".join(map(str.rjust, row, widths)) for row in rows)])


def _row(s: PhaseSummary) -> tuple[str, ...]:
    lat, tput = s.latency_ms, s.throughput_tok_s
    return (
        s.phase,
        str(s.batch_size),
        str(s.num_steps),
        f"{lat.p50:.1f}/{lat.p90:.1f}/{lat.p99:.1f}",
        f"{tput.p50:.0f}/{tput.p90:.0f}/{tput.p99:.0f}",
    )


def render_shard_json(
    config: ShardBenchConfig, info: pb.InfoResponse, summaries: list[PhaseSummary]
) -> str:
    shard = {"model_type": info.model_type, "dtype": info.dtype, "device": info.device_type}
    return json.dumps(
        {"config": asdict(config), "shard": shard, "phases": [asdict(s) for s in summaries]},
        indent=2,
    )
