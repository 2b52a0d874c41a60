"""`--plot`: output throughput and latency against load, one PNG."""

from __future__ import annotations

from textgen.benchmark.summary import LevelSummary


def plot_levels(summaries: list[LevelSummary], path: str) -> None:
    """Left: output tokens/s; right: TTFT and ITL p50/p99 (ms), both against the load."""
    import matplotlib

    matplotlib.use("Agg")  # NOTE: files only; no display on servers
    import matplotlib.pyplot as plt

    by_rate = summaries[0].request_rate is not None
    loads = [s.request_rate if by_rate else s.concurrency for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(loads, [s.output_tokens_per_s for s in summaries], marker="o")
    left.set_ylabel("output tokens/s")
    for name in ("ttft_ms", "itl_ms"):
        for pct in ("p50", "p99"):
            values = [_pct(getattr(s, name), pct) for s in summaries]
            right.plot(loads, values, marker="o", label=f"{name[:-3].upper()} {pct}")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.legend()
    for axis in (left, right):
        axis.set_xlabel("requests/s" if by_rate else "concurrent streams")
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(p: object, which: str) -> float | None:
    return getattr(p, which) if p is not None else None
