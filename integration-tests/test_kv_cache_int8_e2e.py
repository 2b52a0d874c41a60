"""`--kv-cache-dtype int8` end to end: the real launcher, two shards, the router.

Each shard quantizes the rows of its own KV heads, one scale per token and head, so
the split changes nothing a row holds. What two shards serve greedily is then the
greedy choice of one in-process shard over an int8 cache, each token scored with the
served tokens before it: the top logit, or a near tie within `TIE` of it (the two
differ in their last float bits, which can move a value across an int8 rounding step;
test_kv_cache_int8.py measures how far the cache is from float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher, shard_commands, start_launcher, stop_launcher

pytestmark = pytest.mark.integration

NEW_TOKENS = 24
TIE = 0.1
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",  # its first token is a near tie (0.003 apart)
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def int8_launcher(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Launcher]:
    running = start_launcher(
        tmp_path_factory.mktemp("kv-int8"), "--num-shard", "2", "--kv-cache-dtype", "int8"
    )
    yield running
    stop_launcher(running)


def one_shard_logits(model_dir: Path, prompt: list[int], served: list[int]):
    """One in-process float32 shard over an int8 cache: the logits before each served token."""
    import torch

    from textgen.server.distributed import ParallelGroup
    from textgen.server.model_runner import ModelRunner, SequenceInput
    from textgen.server.platform import Platform

    platform = Platform.detect(torch.device("cpu"), "float32")
    runner = ModelRunner.load(model_dir, platform, 16, ParallelGroup(), kv_cache_dtype="int8")
    tokens = prompt + served
    runner.allocate_kv_cache(len(tokens) // 16 + 2)
    table = list(range(1, len(tokens) // 16 + 2))
    slots = [table[p // 16] * 16 + p % 16 for p in range(len(tokens))]
    logits = runner.forward([SequenceInput(tokens, 0, slots, table, all_logits=True)])[0]
    return logits[len(prompt) - 1 : -1]  # [len(served), V]


def test_two_shards_over_int8_caches_serve_one_shards_greedy_tokens(
    int8_launcher: Launcher, model_dir: Path
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    commands = [" ".join(argv) for _, argv in shard_commands(int8_launcher).values()]
    assert len(commands) == 2 and all("--kv-cache-dtype int8" in c for c in commands)
    exact = 0
    with httpx.Client(base_url=int8_launcher.url, timeout=120) as client:
        for prompt in PROMPTS:
            parameters = {"max_new_tokens": NEW_TOKENS, "details": True}
            response = client.post("/generate", json={"inputs": prompt, "parameters": parameters})
            assert response.status_code == 200, response.text
            served = [token["id"] for token in response.json()["details"]["tokens"]]
            assert len(served) == NEW_TOKENS
            logits = one_shard_logits(model_dir, tokenizer(prompt)["input_ids"], served)
            below_top = logits.max(-1).values - logits[range(len(served)), served]
            assert (below_top <= TIE).all(), (prompt, below_top.tolist())
            exact += int((below_top == 0).sum())
    assert exact >= len(PROMPTS) * NEW_TOKENS - 3  # near ties are rare


SHARED = (
    "You are a careful assistant for a public library. Answer in one short sentence, name "
    "the shelf when you can, and never invent a title that the catalogue does not hold. "
)


def _hit_tokens(launcher: Launcher) -> float:
    metrics = httpx.get(launcher.url + "/metrics").text
    line = next(
        x for x in metrics.splitlines() if x.startswith("textgen_prefix_cache_hit_tokens_total")
    )
    return float(line.split()[1])


def test_prefix_cache_hits_over_int8_caches_serve_one_shards_greedy_tokens(
    int8_launcher: Launcher, model_dir: Path
):
    """The second prompt reads the first's int8 blocks of the shared instructions; what it
    is served still meets the bound above against a whole int8 forward of its own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with httpx.Client(base_url=int8_launcher.url, timeout=120) as client:
        for question in ("Where are the atlases?", "Where is poetry?"):
            before = _hit_tokens(int8_launcher)
            parameters = {"max_new_tokens": NEW_TOKENS, "details": True}
            body = {"inputs": SHARED + question, "parameters": parameters}
            response = client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            served = [token["id"] for token in response.json()["details"]["tokens"]]
            logits = one_shard_logits(model_dir, tokenizer(SHARED + question)["input_ids"], served)
            below_top = logits.max(-1).values - logits[range(len(served)), served]
            assert (below_top <= TIE).all(), (question, below_top.tolist())
    assert _hit_tokens(int8_launcher) - before >= 32  # the second read 2+ cached blocks
