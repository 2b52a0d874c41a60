"""The real default model (SmolLM2-135M) through the servicer vs transformers' generate.

Greedy, float32: the shard's tokens must equal `generate(do_sample=False)`
token for token, for each prompt alone and for all of them batched with
staggered joins, concatenation and filtering.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textgen.proto import generate_pb2
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.servicer import TextGenerationServicer
from textgen.server.shard import Shard

pytestmark = pytest.mark.slow

NUM_NEW_TOKENS = 48
BLOCK_SIZE = 16
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Die Katze sitzt auf der Matte und",
    "1, 2, 3, 5, 8, 13, 21,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "El rápido zorro marrón salta sobre el perro perezoso. " * 12,
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY",
]


class FakeContext:
    async def abort(self, code, details):
        raise AssertionError(f"{code.name}: {details}")


@pytest.fixture(scope="module")
def prompt_ids(real_model_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(real_model_dir, prompt_ids) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids])
            out = model.generate(
                input_ids,
                # NOTE: explicit, or generate masks the prompt's <|im_end|> (= pad id) out.
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NUM_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,  # the router stops requests, not the shard
            )
            outputs.append(out[0, len(ids) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def shard(real_model_dir) -> Shard:
    config = ServerConfig(
        real_model_dir, kv_cache_memory_gib=0.25, block_size=BLOCK_SIZE, dtype="float32"
    )
    shard = Shard.load(config, ParallelGroup(), torch.device("cpu"))
    warmup = generate_pb2.WarmupRequest(
        max_input_tokens=256, max_total_tokens=512, max_prefill_tokens=512, max_batch_size=8
    )
    shard.warmup(warmup)
    return shard


@pytest.fixture
def servicer(shard):
    servicer = TextGenerationServicer(shard)
    yield servicer
    servicer.close()


class BlockAllocator:
    """The router's job, reduced to a counter: consecutive fresh blocks, block 0 skipped."""

    def __init__(self) -> None:
        self.next_block = 1

    def request(self, request_id: int, ids: list[int]) -> generate_pb2.Request:
        num_blocks = math.ceil((len(ids) + NUM_NEW_TOKENS) / BLOCK_SIZE)
        blocks = list(range(self.next_block, self.next_block + num_blocks))
        self.next_block += num_blocks
        slots = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(ids))]
        return generate_pb2.Request(
            id=request_id,
            input_ids=ids,
            parameters=generate_pb2.SamplingParameters(),  # greedy
            blocks=blocks,
            slots=slots,
            max_new_tokens=NUM_NEW_TOKENS,
        )


async def prefill(servicer, batch_id: int, requests, outputs) -> generate_pb2.CachedBatch:
    batch = generate_pb2.Batch(id=batch_id, requests=requests, size=len(requests))
    response = await servicer.Prefill(generate_pb2.PrefillRequest(batch=batch), FakeContext())
    record(response.generations, outputs)
    return response.batch


async def decode(servicer, batches, outputs) -> generate_pb2.CachedBatch:
    request = generate_pb2.DecodeRequest(batches=batches)
    response = await servicer.Decode(request, FakeContext())
    record(response.generations, outputs)
    return response.batch


def record(generations, outputs: dict[int, list[int]]) -> None:
    for g in generations:
        outputs.setdefault(g.request_id, []).extend(g.tokens.ids)


async def test_each_prompt_alone_matches_transformers(servicer, prompt_ids, reference):
    allocator = BlockAllocator()
    for i, ids in enumerate(prompt_ids):
        outputs: dict[int, list[int]] = {}
        batch = await prefill(servicer, 100 + i, [allocator.request(i, ids)], outputs)
        for _ in range(NUM_NEW_TOKENS - 1):
            batch = await decode(servicer, [batch], outputs)
        await servicer.ClearCache(generate_pb2.ClearCacheRequest(id=batch.id), FakeContext())
        assert outputs[i] == reference[i], f"prompt {i}: {PROMPTS[i]!r}"


async def test_staggered_batch_matches_transformers(servicer, prompt_ids, reference):
    allocator = BlockAllocator()
    outputs: dict[int, list[int]] = {}
    first = [allocator.request(i, ids) for i, ids in enumerate(prompt_ids[:4])]
    batch = await prefill(servicer, 1, first, outputs)
    for _ in range(5):
        batch = await decode(servicer, [batch], outputs)
    second = [allocator.request(i, ids) for i, ids in enumerate(prompt_ids) if i >= 4]
    joining = await prefill(servicer, 2, second, outputs)
    batch = await decode(servicer, [batch, joining], outputs)
    assert list(batch.request_ids) == list(range(8))
    while batch.size:
        running = [i for i in batch.request_ids if len(outputs[i]) < NUM_NEW_TOKENS]
        if len(running) < batch.size:
            filtered = await servicer.FilterBatch(
                generate_pb2.FilterBatchRequest(batch_id=batch.id, request_ids=running),
                FakeContext(),
            )
            if not running:
                break
            batch = filtered.batch
        batch = await decode(servicer, [batch], outputs)
    for i in range(len(PROMPTS)):
        assert outputs[i] == reference[i], f"prompt {i}: {PROMPTS[i]!r}"
