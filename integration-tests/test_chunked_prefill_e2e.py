"""`--prefill-chunk-tokens` end to end: prompts prefilled 8 tokens a step beside decodes.

The launcher runs float32 with 8-token chunks. A long generation keeps a batch
decoding while the other prompts arrive, so each of them is split over several
mixed steps; their greedy output must still equal transformers' token for token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher, start_launcher, stop_launcher
from reference import greedy_continuations

pytestmark = pytest.mark.integration

CHUNK_TOKENS = 8
NEW_TOKENS = 16
LONG_TOKENS = 200
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "<|im_start|>user\nName three primary colors and explain why they are called primary."
    "<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
]


@pytest.fixture(scope="module")
def chunked_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    tmp = tmp_path_factory.mktemp("chunked")
    running = start_launcher(tmp, "--prefill-chunk-tokens", str(CHUNK_TOKENS))
    yield running
    stop_launcher(running)


def body(prompt: str, new_tokens: int = NEW_TOKENS, **parameters) -> dict:
    parameters = {"max_new_tokens": new_tokens, "details": True, **parameters}
    return {"inputs": prompt, "parameters": parameters}


def test_chunked_prompts_beside_a_decoding_request_match_transformers(
    chunked_launcher: Launcher, model_dir: Path
):
    reference = greedy_continuations(model_dir, PROMPTS, NEW_TOKENS)

    async def run() -> tuple[list[dict], int]:
        long = body("Count to one hundred:", LONG_TOKENS, ignore_eos_token=True)
        async with (
            httpx.AsyncClient(base_url=chunked_launcher.url, timeout=300) as client,
            client.stream("POST", "/generate_stream", json=long) as stream,
        ):
            events = (line async for line in stream.aiter_lines() if line.startswith("data:"))
            await anext(events)  # its first token: the long request is decoding from now on
            replies = await asyncio.gather(
                *(client.post("/generate", json=body(p)) for p in PROMPTS),
                # Prefill logprobs need the prompt in one piece: never chunked.
                client.post("/generate", json=body(PROMPTS[0], decoder_input_details=True)),
            )
            long_tokens = 1 + sum([1 async for _ in events])
        return [r.json() for r in replies], long_tokens

    replies, long_tokens = asyncio.run(run())
    assert long_tokens == LONG_TOKENS
    for reply, expected, prompt in zip(replies, reference, PROMPTS, strict=False):
        assert [t["id"] for t in reply["details"]["tokens"]] == expected, prompt
    whole = replies[-1]["details"]
    assert [t["id"] for t in whole["tokens"]] == reference[0]
    assert len(whole["prefill"]) > CHUNK_TOKENS  # the prompt's tokens, with logprobs
    # The prompts did go in chunks: at most CHUNK_TOKENS prompt tokens per step.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_tokens = sum(len(tokenizer(p).input_ids) for p in PROMPTS)
    metrics = httpx.get(chunked_launcher.url + "/metrics").text
    prefill_steps = _counter(metrics, 'tgi_batch_inference_success_total{method="prefill"}')
    assert prefill_steps >= -(-prompt_tokens // CHUNK_TOKENS)


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
