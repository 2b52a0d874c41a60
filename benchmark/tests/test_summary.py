import pytest

from textgen.benchmark.client import RequestResult
from textgen.benchmark.summary import Percentiles, percentiles, summarize, throughput_ratios


def test_percentiles_interpolate_between_ranks():
    assert percentiles([float(v) for v in range(1, 102)]) == Percentiles(51.0, 91.0, 100.0)
    p = percentiles([20.0, 10.0])
    assert (p.p50, p.p90, p.p99) == pytest.approx((15.0, 19.0, 19.9))


def test_percentiles_of_one_and_of_none():
    assert percentiles([3.0]) == Percentiles(3.0, 3.0, 3.0)
    assert percentiles([]) is None


def test_summarize_fixed_timings():
    results = [
        RequestResult(start=0.0, end=1.0, token_times=[0.1, 0.3, 0.6]),  # gaps 0.2, 0.3
        RequestResult(start=0.5, end=2.0, token_times=[0.8, 1.2]),  # gap 0.4
        RequestResult(start=1.0, end=1.1, error="HTTP 500: boom"),
        RequestResult(start=1.0, end=1.2, error="HTTP 500: boom"),
    ]
    s = summarize(concurrency=2, results=results, wall_s=2.5)
    assert (s.concurrency, s.num_ok, s.num_failed) == (2, 2, 2)
    assert s.num_output_tokens == 5
    assert s.output_tokens_per_s == pytest.approx(2.0)
    assert s.requests_per_s == pytest.approx(0.8)
    assert s.ttft_ms.p50 == pytest.approx(200.0)  # median of 100 ms and 300 ms
    assert s.itl_ms.p50 == pytest.approx(300.0)  # median of 200, 300 and 400 ms
    assert s.itl_ms.p99 == pytest.approx(398.0)
    assert s.latency_ms.p50 == pytest.approx(1250.0)  # median of 1000 ms and 1500 ms
    assert s.errors == {"HTTP 500: boom": 2}


def test_summarize_when_everything_failed():
    s = summarize(concurrency=1, results=[RequestResult(0.0, 1.0, error="x")], wall_s=1.0)
    assert (s.num_ok, s.num_failed, s.output_tokens_per_s) == (0, 1, 0.0)
    assert s.ttft_ms is s.itl_ms is s.latency_ms is None


def test_throughput_ratios_against_concurrency_1():
    def level(concurrency: int, num_tokens: int):
        result = RequestResult(0.0, 1.0, token_times=[0.5] * num_tokens)
        return summarize(concurrency, [result], wall_s=1.0)

    assert throughput_ratios([level(1, 10), level(4, 35), level(16, 79)]) == {
        4: pytest.approx(3.5),
        16: pytest.approx(7.9),
    }
    assert throughput_ratios([level(4, 35), level(16, 79)]) == {}
