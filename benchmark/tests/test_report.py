import json

from textgen.benchmark.client import RequestResult
from textgen.benchmark.config import ServingConfig
from textgen.benchmark.report import render_json, render_table
from textgen.benchmark.summary import summarize


def _summaries():
    ok = RequestResult(start=0.0, end=1.0, token_times=[0.1, 0.2, 0.3, 0.4])
    failed = RequestResult(start=0.0, end=0.1, error="HTTP 503: busy")
    return [summarize(1, [ok], wall_s=1.0), summarize(16, [ok, ok, ok, failed], wall_s=1.5)]


def test_render_table():
    lines = render_table(_summaries()).splitlines()
    assert lines[0].split()[:3] == ["concurrency", "ok", "failed"]
    assert lines[1].split()[:6] == ["1", "1", "0", "1.00", "4.0", "1.00"]
    assert lines[2].split()[:6] == ["16", "3", "1", "1.50", "8.0", "2.00"]
    assert lines[3:] == ["concurrency 16: 1 failed with HTTP 503: busy", "throughput 16 vs 1: 2.0x"]


def test_render_table_without_successes_shows_dashes():
    failed = RequestResult(start=0.0, end=0.1, error="HTTP 503: busy")
    row = render_table([summarize(4, [failed], wall_s=0.1)]).splitlines()[1]
    assert row.split()[-3:] == ["-", "-", "-"]


def test_render_json():
    report = json.loads(render_json(ServingConfig(concurrency=(1, 16)), _summaries()))
    assert report["config"]["concurrency"] == [1, 16]
    assert [level["num_ok"] for level in report["levels"]] == [1, 3]
    assert report["levels"][1]["ttft_ms"]["p50"] > 0
    assert report["throughput_vs_concurrency_1"] == {"16": 2.0}
