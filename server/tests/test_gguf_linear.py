"""Linear layers on GGUF blocks: the kernel, the blocks kept by the conversion, the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cpu_platform
from gguf_testing import dequantized, make_blocks
from safetensors import safe_open

from textgen.server import kernels
from textgen.server.distributed import ParallelGroup
from textgen.server.layers import gguf
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.platform import Platform
from textgen.server.weights import Weights

BLOCK_SIZE = 16
CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("in_features", [32, 96, 256])  # 1, 3 (odd: the tail block) and 8 blocks
def test_kernel_matches_the_product_with_dequantized_weights(kind, num_tokens, in_features, isa):
    torch.manual_seed(num_tokens * in_features)
    blocks = make_blocks(torch.randn(7, in_features), kind)
    x = torch.randn(num_tokens, in_features)
    weight = dequantized(blocks).double()
    exact = x.double() @ weight.T
    out = gguf.gguf_linear(x, blocks)  # [T, 7] float32
    assert out.dtype == torch.float32 and out.shape == (num_tokens, 7)
    # Exact weights, float32 products and sums: Higham's bound, in * 2^-24 of sum |w x|.
    bound = in_features * 2**-24 * (x.double().abs() @ weight.abs().T)
    assert ((out.double() - exact).abs() <= bound).all()
    out = gguf.gguf_linear(x.to(torch.bfloat16), blocks)  # [T, 7] bf16
    expected = (x.to(torch.bfloat16).double() @ weight.T).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # float32 sums rounded once to bf16: at most one bf16 step from the exact result's rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_product_is_the_silu_pass_over_the_product(dtype, int8, isa):
    """A gated MLP's fused gate/up projection at a small step: one call, the same bits."""
    if int8 and kernels.int8_isa() is None:
        pytest.skip(f"no int8 product at {isa}")
    torch.manual_seed(4)
    blocks = make_blocks(torch.randn(96, 64), "Q4_1")  # 48 gate rows, then 48 up rows
    x = (torch.randn(3, 64) * 2).to(dtype)
    weight = gguf.pack_int8(blocks) if int8 else None
    plain = gguf.gguf_linear(x, blocks, weight)
    gated = gguf.gguf_linear(x, blocks, weight, gated=True)
    assert gated.shape == (3, 48) and gated.dtype == dtype
    assert torch.equal(gated, kernels.silu_and_mul(plain))


def test_kernel_reads_strided_rows(isa):
    torch.manual_seed(1)
    blocks = make_blocks(torch.randn(5, 64), "Q4_1")
    wide = torch.randn(3, 100).to(torch.bfloat16)
    x = wide[:, 10:74]  # rows 100 elements apart
    torch.testing.assert_close(
        gguf.gguf_linear(x, blocks), gguf.gguf_linear(x.contiguous(), blocks)
    )


def test_columns_are_sliced_on_block_bounds_only():
    torch.manual_seed(2)
    blocks = make_blocks(torch.randn(4, 128), "Q8_0")
    assert torch.equal(dequantized(blocks.columns(32, 96)), dequantized(blocks)[:, 32:96])
    assert blocks.columns(16, 48) is None
    assert gguf.concat_rows([blocks, make_blocks(torch.randn(4, 128), "Q4_1")]) is None
    both = gguf.concat_rows([blocks, blocks])
    assert torch.equal(dequantized(both), torch.cat([dequantized(blocks)] * 2))


def test_the_kernel_serves_small_batches_only():
    blocks = make_blocks(torch.randn(3, 32), "Q4_0")
    assert gguf.applies(torch.zeros(gguf.MAX_TOKENS, 32, dtype=torch.bfloat16), blocks)
    assert gguf.applies(torch.zeros(gguf.MAX_TOKENS, 32), blocks)
    assert not gguf.applies(torch.zeros(gguf.MAX_TOKENS + 1, 32, dtype=torch.bfloat16), blocks)
    assert not gguf.applies(torch.zeros(1, 32, dtype=torch.bfloat16), None)


def _weight(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",  # rows permuted back from GGUF's order
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",  # Q8_0
    ],
)
@pytest.mark.parametrize("rank", [0, 1])
def test_converted_default_model_keeps_blocks_equal_to_its_weights(real_model_dir, name, rank):
    weights = Weights(real_model_dir, cpu_platform(torch.bfloat16), ParallelGroup(rank, 2))
    saved = _weight(real_model_dir, name)  # float32, as transformers dequantized it
    rows = weights.shard_range(name, 0)
    assert torch.equal(dequantized(weights.blocks(name, rows=rows)), saved[rows[0] : rows[1]])
    columns = weights.shard_range(name, 1)  # a row-parallel split: 288 or 768 columns
    sliced = weights.blocks(name, columns=columns)
    assert torch.equal(dequantized(sliced), saved[:, columns[0] : columns[1]])


def test_blocks_are_loaded_where_the_native_operators_serve(real_model_dir):
    name = "model.layers.0.mlp.down_proj.weight"
    for dtype in (torch.float32, torch.bfloat16):
        assert Weights(real_model_dir, cpu_platform(dtype), ParallelGroup()).blocks(name)
    without = Platform.detect(CPU, "float32", isa="none")
    assert Weights(real_model_dir, without, ParallelGroup()).blocks(name) is None


def _step_logits(runner: ModelRunner, prompt: list[int], copies: int) -> torch.Tensor:
    """Prefill `prompt`, then one decode step for `copies` identical sequences: [copies, V]."""
    blocks_per_seq = 4
    runner.allocate_kv_cache(copies * blocks_per_seq)
    sequences = []
    for c in range(copies):
        table = list(range(c * blocks_per_seq, (c + 1) * blocks_per_seq))
        slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
        sequences.append(SequenceInput(prompt, 0, slots, table))
    runner.forward(sequences)
    position = len(prompt)
    next_id = 1000
    decodes = [
        SequenceInput(
            [next_id],
            position,
            [s.block_table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE],
            s.block_table,
        )
        for s in sequences
    ]
    return torch.cat(runner.forward(decodes))


def test_default_model_decodes_on_blocks_close_to_float32(real_model_dir):
    bf16 = ModelRunner.load(
        real_model_dir, cpu_platform(torch.bfloat16), BLOCK_SIZE, ParallelGroup()
    )
    if bf16.model.lm_head.packed is None:
        pytest.skip("this CPU has no native bf16")
    layer = bf16.model.layers[0]
    assert layer.self_attn.qkv_proj.blocks.kind == "Q4_1"
    assert layer.mlp.down_proj.blocks.kind == "Q4_1"
    assert bf16.model.lm_head.blocks.kind == "Q8_0"  # tied to the Q8_0 embedding

    prompt = [1, 504, 3458, 282, 4649, 314, 4182, 30, 378, 3458, 282]
    reference = _step_logits(
        ModelRunner.load(real_model_dir, cpu_platform(torch.float32), BLOCK_SIZE, ParallelGroup()),
        prompt,
        copies=1,
    )[0]
    on_blocks = _step_logits(bf16, prompt, copies=1)[0]  # 1 token per step: the kernel
    dense = _step_logits(bf16, prompt, copies=gguf.MAX_TOKENS + 1)[0]  # oneDNN's product
    scale = reference.abs().max()
    for logits in (on_blocks, dense):
        assert logits.argmax() == reference.argmax()
        assert (logits - reference).abs().max() / scale < 0.05
