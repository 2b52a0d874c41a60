"""A Llama decoder stack's small steps as one native call (`kernels.llama_small_step`).

The call runs the kernels the layers call one by one, with the same thread splits and in
the same order, so a forward through it must equal the forward through the layers to the
bit: logits and the KV cache it leaves, on every ISA level with an int8 product, for a
float32 and an int8 cache, for decode steps and for a short prompt chunk.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_platform
from gguf_testing import make_blocks

from textgen.server import kernels
from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner, SequenceInput

BLOCK = 16


def _sequence(seq: int, tokens: list[int], start: int, blocks_each: int) -> SequenceInput:
    table = list(range(seq * blocks_each, (seq + 1) * blocks_each))
    positions = range(start, start + len(tokens))
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]
    return SequenceInput(tokens, start, slots, table, all_logits=True)


def _steps() -> list[list[tuple[int, list[int], int]]]:
    """Forwards as (sequence, new tokens, tokens already cached): 40-token prompts (the
    layers' path), then decode steps of 1, 3 and 4 sequences and a 3-token chunk."""
    torch.manual_seed(3)
    prompts = [torch.randint(100, 30000, (40,)).tolist() for _ in range(4)]
    return [
        [(s, prompts[s], 0) for s in range(4)],
        [(0, [11], 40)],
        [(0, [12], 41), (1, [13], 40), (2, [14], 40)],
        [(0, [15], 42), (1, [16], 41), (2, [17], 41), (3, [18], 40)],
        [(3, [19, 20, 21], 41)],
    ]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_one_call_equals_the_layers_to_the_bit(real_model_dir, int8_isa, kv_cache_dtype):
    platform = cpu_platform(torch.float32, int8_activations=True)
    runners = [
        ModelRunner.load(real_model_dir, platform, BLOCK, ParallelGroup(), "cpu", kv_cache_dtype)
        for _ in range(2)
    ]
    fused, layers = runners
    assert fused.model.small_step is not None
    layers.model.small_step = None  # this one runs the layers one by one
    blocks_each = 4
    for runner in runners:
        runner.allocate_kv_cache(4 * blocks_each)
    for step in _steps():
        inputs = [_sequence(s, tokens, start, blocks_each) for s, tokens, start in step]
        got, expected = fused.forward(inputs), layers.forward(inputs)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
    for name in ("key_caches", "value_caches", "key_scales", "value_scales"):
        for a, b in zip(getattr(fused.kv_cache, name), getattr(layers.kv_cache, name), strict=True):
            assert (a is None and b is None) or torch.equal(a, b), name


def test_the_one_call_serves_only_where_its_kernels_do(real_model_dir, tiny_llama, int8_isa):
    def small_step(model_dir, dtype, int8_activations):
        platform = cpu_platform(dtype, int8_activations)
        return ModelRunner.load(model_dir, platform, BLOCK, ParallelGroup()).model.small_step

    assert small_step(real_model_dir, torch.float32, True) is not None
    assert small_step(real_model_dir, torch.float32, False) is None  # float products
    assert small_step(real_model_dir, torch.bfloat16, True) is None  # bf16 activations
    assert small_step(tiny_llama[0], torch.float32, True) is None  # no GGUF blocks


def _layer_case() -> tuple:
    """One valid call: one layer, hidden 64, 4 heads over 2 KV heads of 16, inner 64."""
    torch.manual_seed(4)

    def rows(n: int, k: int) -> torch.Tensor:
        return kernels.gemv_pack(make_blocks(torch.randn(n, k), "Q4_1").data, "Q4_1")

    cache = torch.zeros(4, BLOCK, 2, 16)
    return (
        torch.randn(2, 64),  # hidden
        torch.tensor([3, 7]),  # positions
        torch.tensor([3, 23]),  # slots
        torch.tensor([[0, 1], [1, 0]]),  # block tables
        torch.tensor([4, 8]),  # context lengths
        [torch.rand(64), torch.rand(64)],
        [rows(128, 64), rows(64, 64), rows(128, 64), rows(64, 64)],
        [cache],
        [cache.clone()],
        [],
        [],
        torch.rand(32, 16),  # cos
        torch.rand(32, 16),  # sin
        4,
        64,
        1e-5,
        0.25,
    )


def test_the_schema_and_fake_tensors_agree_with_the_operator(int8_isa):
    op = torch.ops.textgen.llama_small_step.default
    torch.library.opcheck(op, _layer_case(), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({2: torch.tensor([3, 64])}, IndexError, "outside the cache"),
        ({1: torch.tensor([3, 32])}, IndexError, "past the rotary table"),
        ({4: torch.tensor([4, 33])}, IndexError, "outside its block table"),
        ({14: 32}, ValueError, "gemv_pack's"),
        ({13: 3}, ValueError, "multiple of the KV heads"),
        ({9: [torch.zeros(4, 2, BLOCK)]}, ValueError, "scales"),
    ],
)
def test_bad_arguments_raise_before_any_kernel_runs(change, error, message, int8_isa):
    args = list(_layer_case())
    for index, value in change.items():
        args[index] = value
    with pytest.raises(error, match=message):
        torch.ops.textgen.llama_small_step(*args)
