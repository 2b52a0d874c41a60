"""The launcher with no --dtype: each shard's platform chooses the dtype and arithmetic.

On a CPU with native bf16 that is bf16; without (AVX2 machines), float32 with a GGUF
model's products on int8 activations. Either way what is served greedily is what one
in-process shard on the same platform computes when given the same steps: the prompt's
prefill, then one token per step. Both run the same kernels on the same shapes with the
same thread count (torch's default: a single shard keeps it), and those kernels are
deterministic (textgen's compute each output element on one thread; oneDNN's and MKL's
repeat themselves for a given shape and thread count), so the two agree to the bit and
the tokens must be equal, with no tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from launcher_process import Launcher, start_launcher, stop_launcher

pytestmark = pytest.mark.integration

NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def default_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    running = start_launcher(tmp_path_factory.mktemp("defaults"), dtype=None)
    yield running
    stop_launcher(running)


def in_process_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of one shard on this machine's default platform, step by step."""
    import torch

    from textgen.server.distributed import ParallelGroup
    from textgen.server.model_runner import ModelRunner, SequenceInput
    from textgen.server.platform import Platform

    runner = ModelRunner.load(model_dir, Platform.detect(torch.device("cpu")), 16, ParallelGroup())
    length = len(prompt) + new_tokens
    table = list(range(1, length // 16 + 2))
    runner.allocate_kv_cache(len(table) + 1)

    def slots(start: int, stop: int) -> list[int]:
        return [table[p // 16] * 16 + p % 16 for p in range(start, stop)]

    step = SequenceInput(prompt, 0, slots(0, len(prompt)), table)
    tokens = []
    for position in range(len(prompt), length):
        tokens.append(int(runner.forward([step])[0][-1].argmax()))
        step = SequenceInput([tokens[-1]], position, slots(position, position + 1), table)
    return tokens


def test_the_shards_take_the_platforms_dtype_and_arithmetic(default_launcher: Launcher):
    import torch

    from textgen.server.platform import Platform

    expected = Platform.detect(torch.device("cpu"))
    info = httpx.get(default_launcher.url + "/info", timeout=10).json()
    assert info["model_dtype"] == str(expected.dtype).removeprefix("torch.")
    assert f"platform: {expected.describe()}" in default_launcher.log()


def test_served_greedy_tokens_are_one_in_process_shards(
    default_launcher: Launcher, model_dir: Path
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with httpx.Client(base_url=default_launcher.url, timeout=120) as client:
        for prompt in PROMPTS:
            parameters = {"max_new_tokens": NEW_TOKENS, "details": True}
            response = client.post("/generate", json={"inputs": prompt, "parameters": parameters})
            assert response.status_code == 200, response.text
            served = [token["id"] for token in response.json()["details"]["tokens"]]
            ids = tokenizer(prompt)["input_ids"]
            assert served == in_process_greedy(model_dir, ids, NEW_TOKENS)[: len(served)]
