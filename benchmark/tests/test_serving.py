"""The benchmark against the fake server of conftest.py."""

import io

import pytest

from textgen.benchmark.config import ServingConfig
from textgen.benchmark.serving import run_serving

MAX_NEW_TOKENS = 8
FIRST_TOKEN_DELAY_MS = 20  # conftest.FIRST_TOKEN_DELAY_S
TOKEN_DELAY_MS = 2  # conftest.TOKEN_DELAY_S


def _config(url: str, **kwargs) -> ServingConfig:
    kwargs = {"concurrency": (1, 4), "max_new_tokens": MAX_NEW_TOKENS, "timeout": 10.0, **kwargs}
    return ServingConfig(url=url, **kwargs)


def _assert_ordered(p) -> None:
    assert 0 < p.p50 <= p.p90 <= p.p99


@pytest.mark.parametrize("api", ["tgi", "openai"])
async def test_levels_count_every_request_and_token(fake_server, api):
    with fake_server() as url:
        summaries = await run_serving(_config(url, api=api), progress_stream=io.StringIO())
    assert [s.concurrency for s in summaries] == [1, 4]
    for s, num_requests in zip(summaries, [4, 8], strict=True):
        assert (s.num_ok, s.num_failed, s.errors) == (num_requests, 0, {})
        assert s.num_output_tokens == num_requests * MAX_NEW_TOKENS
        assert s.output_tokens_per_s > 0 and s.requests_per_s > 0
        for p in (s.ttft_ms, s.itl_ms, s.latency_ms):
            _assert_ordered(p)
        # The server sleeps before the first token and between tokens: lower bounds.
        assert s.ttft_ms.p50 >= FIRST_TOKEN_DELAY_MS
        assert s.latency_ms.p50 >= FIRST_TOKEN_DELAY_MS + (MAX_NEW_TOKENS - 1) * TOKEN_DELAY_MS


async def test_warmup_requests_are_not_measured(fake_server):
    with fake_server() as url:
        config = _config(url, concurrency=(2,), num_requests=3, warmup=5)
        [summary] = await run_serving(config, progress_stream=io.StringIO())
    assert summary.num_ok + summary.num_failed == 3


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("http", 'HTTP 500: {"error":"boom","error_type":"generation"}'),
        ("event", "generation: out of memory"),
    ],
)
async def test_server_errors_are_counted_as_failures(fake_server, mode, error):
    with fake_server(fail_odd_requests=mode) as url:
        config = _config(url, concurrency=(4,), num_requests=8, warmup=0)
        [summary] = await run_serving(config, progress_stream=io.StringIO())
    assert (summary.num_ok, summary.num_failed) == (4, 4)
    assert summary.errors == {error: 4}
    assert summary.num_output_tokens == 4 * MAX_NEW_TOKENS  # failed streams do not count


async def test_unreachable_server_fails_every_request(fake_server):
    with fake_server() as url:
        pass  # the port is closed once the server has stopped
    [summary] = await run_serving(_config(url, concurrency=(2,)), progress_stream=io.StringIO())
    assert (summary.num_ok, summary.num_failed) == (0, 4)
    assert summary.ttft_ms is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_counts_requests_on_a_terminal(fake_server):
    stderr = _Terminal()
    with fake_server() as url:
        await run_serving(_config(url, concurrency=(2,)), progress_stream=stderr)
    assert stderr.getvalue().endswith("\rconcurrency 2: 4/4 done, 0 failed\n")


async def test_a_shared_prefix_starts_every_prompt(fake_server):
    received = []
    with fake_server(received=received) as url:
        config = _config(url, concurrency=(2,), num_requests=4, shared_prefix_tokens=50)
        [summary] = await run_serving(config, progress_stream=io.StringIO())
    assert summary.num_ok == 4
    prompts = [body["inputs"] for body in received]
    prefix = prompts[0].split("\n")[0]
    assert len(prefix.split()) == 50 and all(p.startswith(prefix + "\n") for p in prompts)
    assert len(set(prompts)) == len(prompts)  # the rest differs


async def test_chat_users_resend_their_history_every_turn(fake_server):
    received = []
    with fake_server(received=received) as url:
        config = _config(url, concurrency=(3,), chat_turns=4, warmup=0)
        [summary] = await run_serving(config, progress_stream=io.StringIO())
    assert summary.num_ok == 12  # 3 users x 4 turns
    prompts = [body["inputs"] for body in received]
    answer = "".join(f" w{i}" for i in range(MAX_NEW_TOKENS))  # what the fake server says
    firsts = [p for p in prompts if p.count("User:") == 1]
    assert len(firsts) == 3
    for first in firsts:
        turn = first
        for number in range(2, 5):  # each later turn holds the previous one and its answer
            (turn,) = [
                p
                for p in prompts
                if p.startswith(turn + answer + "\nUser: ") and p.count("User:") == number
            ]
