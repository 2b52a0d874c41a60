"""The prefix cache never changes a token: the same 64 requests, cache on and off.

64 concurrent requests are built from 4 shared prefixes of different lengths,
two of which end on a KV block boundary (16 tokens) and two inside a block, and
sent with staggered arrivals. The reference is the cache-off server at TP 1 with
whole prefills; the cache-on servers run at TP 1 and TP 2, with 32-token
prefill chunks and a KV cache so small that cached blocks are evicted during
the run (asserted). Greedy float32 output must be equal token for token: the
shards compute a cached prefix's KV once and every later request reads it
instead of recomputing it, which changes no value a request attends to
(`cache_len` positions are the same tokens at the same positions).
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher, start_launcher, stop_launcher

pytestmark = pytest.mark.integration

BLOCK_SIZE = 16
NEW_TOKENS = 8
LIMITS = ("--max-input-tokens", "400", "--max-total-tokens", "448")
# About 1,400 KV tokens, so that cached blocks are evicted during the run. The budget is per
# shard, and at TP 2 each shard holds 2 of the 3 KV heads: 87 blocks either way.
KV_GIB = {1: "0.06", 2: "0.04"}
TOPICS = ["the sea", "mountains", "a library", "trains", "bread", "the moon", "winter", "bees"]


def _prefixes(tokenizer) -> list[str]:
    """4 prefixes of different lengths, two ending on a block boundary and two inside one."""
    sentences = [f"Sentence {i} of the shared context says something about {t}." for i, t in
                 enumerate(TOPICS * 6)]  # fmt: skip
    prefixes = []
    for words, aligned in ((6, True), (11, False), (19, True), (27, False)):
        text = "Context: " + " ".join(sentences[:words])
        while (len(tokenizer(text + "\n")["input_ids"]) % BLOCK_SIZE == 0) != aligned:
            text += " More."
        prefixes.append(text + "\n")
    return prefixes


def _requests(tokenizer) -> list[str]:
    questions = [f"Question {i}: write one line about {t}." for i, t in enumerate(TOPICS * 2)]
    return [prefix + question for prefix in _prefixes(tokenizer) for question in questions]


async def _greedy(launcher: Launcher, prompts: list[str]) -> list[list[int]]:
    rng = random.Random(7)

    async def one(client: httpx.AsyncClient, prompt: str, delay: float) -> list[int]:
        await asyncio.sleep(delay)
        body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
        response = await client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        return [token["id"] for token in response.json()["details"]["tokens"]]

    order = list(range(len(prompts)))
    rng.shuffle(order)
    delays = {index: rank * 0.03 for rank, index in enumerate(order)}  # staggered arrivals
    async with httpx.AsyncClient(base_url=launcher.url, timeout=600) as client:
        return list(
            await asyncio.gather(*(one(client, p, delays[i]) for i, p in enumerate(prompts)))
        )


def _metric(launcher: Launcher, name: str) -> float:
    text = httpx.get(launcher.url + "/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _served(tmp: Path, *flags: str, prompts: list[str]) -> tuple[list[list[int]], float, float]:
    launcher = start_launcher(tmp, *LIMITS, *flags)
    try:
        tokens = asyncio.run(_greedy(launcher, prompts))
        return (
            tokens,
            _metric(launcher, "textgen_prefix_cache_hit_tokens_total"),
            _metric(launcher, "textgen_prefix_cache_evictions_total"),
        )
    finally:
        stop_launcher(launcher)


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> list[str]:
    from transformers import AutoTokenizer

    return _requests(AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, prompts: list[str]) -> list[list[int]]:
    tokens, hits, _ = _served(
        tmp_path_factory.mktemp("off"),
        "--no-prefix-caching",
        "--prefill-chunk-tokens",
        "0",  # whole prompts
        prompts=prompts,
    )
    assert hits == 0
    return tokens


@pytest.mark.parametrize("num_shard", [1, 2])
def test_cache_on_equals_cache_off_token_for_token_with_chunks_and_eviction(
    tmp_path: Path, prompts: list[str], reference: list[list[int]], num_shard: int
):
    tokens, hits, evictions = _served(
        tmp_path,
        "--num-shard", str(num_shard),
        "--prefill-chunk-tokens", "32",
        "--kv-cache-memory-gib", KV_GIB[num_shard],
        prompts=prompts,
    )  # fmt: skip
    assert hits > 0, "no request was served from the cache"
    assert evictions > 0, "the KV cache was large enough that nothing was evicted"
    mismatched = [i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(prompts)} requests differ: {mismatched}"
