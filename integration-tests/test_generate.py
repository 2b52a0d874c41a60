"""End to end: the real launcher, router and shard, over real HTTP, against transformers."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time

import httpx
import pytest
from launcher_process import Launcher, start_launcher, stop_launcher
from reference import greedy_continuations

pytestmark = pytest.mark.integration

NEW_TOKENS = 48
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Quelle est la meilleure façon d'apprendre une langue ?",
    "1, 2, 3, 5, 8, 13,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
    "A list of three fruits:\n-",
]


@pytest.fixture(scope="module")
def reference(model_dir) -> list[list[int]]:
    return greedy_continuations(model_dir, PROMPTS, NEW_TOKENS)


def generate_ids(client: httpx.Client, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    response = client.post("/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def test_info_and_health(launcher: Launcher):
    assert httpx.get(launcher.url + "/health").status_code == 200
    info = httpx.get(launcher.url + "/info").json()
    assert info["max_input_tokens"] == 1024
    assert info["max_total_tokens"] == 1536
    assert info["model_dtype"] == "float32"
    assert info["router"] == "textgen-router"


def test_greedy_matches_transformers_alone(launcher: Launcher, reference):
    with httpx.Client(base_url=launcher.url) as client:
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            assert generate_ids(client, prompt) == expected, prompt


def test_greedy_matches_transformers_batched_with_staggered_joins(launcher: Launcher, reference):
    async def one(client: httpx.AsyncClient, index: int) -> list[int]:
        await asyncio.sleep(0.15 * index)  # arrive while earlier ones decode
        body = {
            "inputs": PROMPTS[index],
            "parameters": {"max_new_tokens": NEW_TOKENS, "details": True},
        }
        response = await client.post("/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return [token["id"] for token in response.json()["details"]["tokens"]]

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=launcher.url) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(PROMPTS))))

    assert asyncio.run(run()) == reference


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_stream_tokens_add_up_to_the_generated_text(launcher: Launcher):
    body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 20, "details": True}}
    with httpx.stream(
        "POST", launcher.url + "/generate_stream", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
    final = events[-1]
    assert final["generated_text"] == "".join(
        e["token"]["text"] for e in events if not e["token"]["special"]
    )
    assert final["details"]["generated_tokens"] == len(events)
    assert final["details"]["finish_reason"] in {"length", "eos_token"}


def test_huggingface_hub_client(launcher: Launcher):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=launcher.url)
    # NOTE: the client posts to TGI's `/`, whose return_full_text defaults to true.
    text = client.text_generation(PROMPTS[0], max_new_tokens=8, return_full_text=False)
    streamed = "".join(client.text_generation(PROMPTS[0], max_new_tokens=8, stream=True))
    assert text and text == streamed


def kv_blocks_used(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(url + "/metrics").text
    return next(
        m.samples[0].value
        for m in text_string_to_metric_families(page)
        if m.name == "textgen_kv_blocks_used"
    )


def test_disconnect_mid_stream_frees_blocks_and_server_keeps_serving(launcher: Launcher):
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    with httpx.stream(
        "POST", launcher.url + "/generate_stream", json=body, timeout=120
    ) as response:
        lines = response.iter_lines()
        received = list(itertools.islice(lines, 6))
        assert any(line.startswith("data:") for line in received)
        assert kv_blocks_used(launcher.url) > 0
    # The stream is closed mid-generation; the next step drops the request.
    for _ in range(100):
        if kv_blocks_used(launcher.url) == 0:
            break
        time.sleep(0.1)
    assert kv_blocks_used(launcher.url) == 0
    with httpx.Client(base_url=launcher.url) as client:
        assert len(generate_ids(client, PROMPTS[0])) > 0


def test_validation_error_is_422(launcher: Launcher):
    response = httpx.post(
        launcher.url + "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 5000}}
    )
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"


def test_sigterm_exits_cleanly_without_leftovers(tmp_path, model_dir):
    own = start_launcher(tmp_path)
    pgrep = subprocess.run(["pgrep", "-P", str(own.process.pid)], capture_output=True, text=True)
    children = [int(pid) for pid in pgrep.stdout.split()]
    assert len(children) == 2  # the shard and the router
    assert (tmp_path / "shard-0").exists()
    assert stop_launcher(own) == 0
    log = own.log()
    assert "Traceback" not in log, log
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not (tmp_path / "shard-0").exists()
