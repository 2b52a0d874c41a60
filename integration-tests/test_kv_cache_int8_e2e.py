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
