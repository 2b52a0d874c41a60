from collections.abc import AsyncIterator

from textgen.benchmark.client import RequestResult, iter_sse_data


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_iter_sse_data_splits_events_at_blank_lines():
    lines = _lines(
        "data: a", "", ": keep-alive", "", "event: x", "data:b", "data: c", "", "data: d"
    )
    assert [data async for data in iter_sse_data(lines)] == ["a", "b\nc", "d"]


def test_request_result_timings():
    result = RequestResult(start=10.0, end=10.5, token_times=[10.1, 10.15, 10.3])
    assert result.ok
    assert result.num_output_tokens == 3
    assert result.ttft == 10.1 - 10.0
    assert result.inter_token_latencies == [10.15 - 10.1, 10.3 - 10.15]
    assert result.latency == 0.5


def test_request_result_prefers_the_servers_token_count():
    result = RequestResult(start=0.0, token_times=[0.1, 0.2], usage_tokens=4)
    assert result.num_output_tokens == 4


def test_request_result_without_tokens():
    result = RequestResult(start=0.0, end=1.0, error="HTTP 500: boom")
    assert not result.ok
    assert result.ttft is None
    assert result.inter_token_latencies == []
