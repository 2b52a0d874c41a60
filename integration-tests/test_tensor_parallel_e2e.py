"""`--num-shard 2` end to end on CPU: the real launcher, two gloo shards, the router.

The default model (9 query heads in 3 KV groups) splits 6 + 3 heads, so this
also covers uneven head splits. Greedy output is compared with transformers,
which `--num-shard 1` already equals token for token (test_generate.py), so
equality here is N = 2 == N = 1. One launch serves the module; the last test
SIGKILLs a shard and so ends it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher, shard_commands, start_launcher, stop_launcher
from reference import greedy_continuations

pytestmark = pytest.mark.integration

NUM_SHARD = 2
NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village by the sea,",
]
EXIT_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def tp_launcher(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Launcher]:
    running = start_launcher(tmp_path_factory.mktemp("tp"), "--num-shard", str(NUM_SHARD))
    yield running
    stop_launcher(running)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    return greedy_continuations(model_dir, PROMPTS, NEW_TOKENS)


def body(prompt: str) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def shard_pids(launcher: Launcher) -> dict[int, int]:
    """rank -> pid of the launcher's shard children."""
    return {rank: pid for rank, (pid, _) in shard_commands(launcher).items()}


def test_two_shards_serve_behind_one_router(tp_launcher: Launcher):
    assert sorted(shard_pids(tp_launcher)) == list(range(NUM_SHARD))
    assert "connected to 2 shard(s)" in tp_launcher.log()
    for rank in range(NUM_SHARD):
        assert Path(f"{tp_launcher.uds_path}-{rank}").exists()


def test_greedy_matches_single_shard_output_alone(tp_launcher: Launcher, reference):
    with httpx.Client(base_url=tp_launcher.url, timeout=120) as client:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            assert token_ids(client.post("/generate", json=body(prompt))) == expected, prompt


def test_greedy_matches_single_shard_output_concurrently(tp_launcher: Launcher, reference):
    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=tp_launcher.url, timeout=300) as client:
            responses = await asyncio.gather(
                *(client.post("/generate", json=body(prompt)) for prompt in PROMPTS)
            )
        return [token_ids(response) for response in responses]

    assert asyncio.run(run()) == reference


def test_killed_shard_fails_the_stream_and_stops_the_launcher(tp_launcher: Launcher):
    """Last test of the module: it ends the shared launcher."""
    request = {"inputs": PROMPTS[4], "parameters": {"max_new_tokens": 1000}}
    events = []
    with httpx.stream(
        "POST", tp_launcher.url + "/generate_stream", json=request, timeout=60
    ) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                break  # streaming has begun
        shard_pid = shard_pids(tp_launcher)[1]
        killed_at = time.monotonic()
        os.kill(shard_pid, signal.SIGKILL)
        events += [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert "token" in events[0]
    assert events[-1]["error_type"] == "generation", events[-1]
    assert "error" in events[-1]
    code = tp_launcher.process.wait(timeout=EXIT_DEADLINE_S)
    elapsed = time.monotonic() - killed_at
    print(f"launcher exited with {code} {elapsed:.1f}s after the SIGKILL")
    assert code != 0
    assert elapsed < EXIT_DEADLINE_S
    assert "shard rank=1 exited with code -9" in tp_launcher.log()
    assert shard_pids(tp_launcher) == {}
    assert not any(Path(f"{tp_launcher.uds_path}-{r}").exists() for r in range(NUM_SHARD))
