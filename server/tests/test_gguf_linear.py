"""Linear layers on GGUF blocks: the kernel, the blocks kept by the conversion, the model."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from gguf_testing import dequantized, make_blocks
from kernel_builds import build_variant
from safetensors import safe_open

from textgen.server import kernels
from textgen.server.distributed import ParallelGroup
from textgen.server.layers import gguf
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.weights import Weights

BLOCK_SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def _kernel_builds() -> None:
    assert kernels.gguf_linear() is not None, "the C kernel must build here (a compiler is on PATH)"


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("in_features", [32, 96, 256])  # 1, 3 (odd: the tail block) and 8 blocks
def test_kernel_matches_the_product_with_dequantized_weights(kind, num_tokens, in_features):
    torch.manual_seed(num_tokens * in_features)
    blocks = make_blocks(torch.randn(7, in_features), kind)
    x = torch.randn(num_tokens, in_features).to(torch.bfloat16)
    out = gguf.gguf_linear(x, blocks)  # [T, 7] bf16
    expected = (x.double() @ dequantized(blocks).double().T).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, 7)
    # float32 sums rounded once to bf16: at most one bf16 step from the exact result's rounding
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for the x86-64 baseline")
def test_portable_c_path_matches_too(tmp_path):
    """The plain C loop (no AVX-512) that other CPUs build, compiled here for the baseline ISA."""
    entry = build_variant(tmp_path, "gguf_linear", "-march=x86-64").textgen_gguf_linear
    entry.argtypes = kernels.gguf_linear().textgen_gguf_linear.argtypes
    torch.manual_seed(3)
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        blocks = make_blocks(torch.randn(5, 96), kind)
        x = torch.randn(6, 96).to(torch.bfloat16)
        out = torch.empty(6, 5, dtype=torch.bfloat16)
        type_id = gguf.GGML_TYPES[kind][0]
        args = (x.data_ptr(), 96, blocks.data.data_ptr(), type_id, out.data_ptr(), 5, 6, 5, 96)
        assert entry(*args, 1, 2) == 0
        torch.testing.assert_close(out, gguf.gguf_linear(x, blocks), rtol=2**-7, atol=1e-3)


def test_kernel_reads_strided_rows():
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
    assert not gguf.applies(torch.zeros(gguf.MAX_TOKENS + 1, 32, dtype=torch.bfloat16), blocks)
    assert not gguf.applies(torch.zeros(1, 32), blocks)  # float32 keeps the plain product
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
    weights = Weights(real_model_dir, torch.bfloat16, torch.device("cpu"), ParallelGroup(rank, 2))
    saved = _weight(real_model_dir, name)  # float32, as transformers dequantized it
    rows = weights.shard_range(name, 0)
    assert torch.equal(dequantized(weights.blocks(name, rows=rows)), saved[rows[0] : rows[1]])
    columns = weights.shard_range(name, 1)  # a row-parallel split: 288 or 768 columns
    sliced = weights.blocks(name, columns=columns)
    assert torch.equal(dequantized(sliced), saved[:, columns[0] : columns[1]])


def test_float32_shards_do_not_load_blocks(real_model_dir):
    weights = Weights(real_model_dir, torch.float32, torch.device("cpu"), ParallelGroup())
    assert weights.blocks("model.layers.0.mlp.down_proj.weight") is None


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
    cpu = torch.device("cpu")
    bf16 = ModelRunner.load(real_model_dir, torch.bfloat16, BLOCK_SIZE, ParallelGroup(), cpu)
    if bf16.model.lm_head.packed is None:
        pytest.skip("this CPU has no native bf16")
    layer = bf16.model.layers[0]
    assert layer.self_attn.qkv_proj.blocks.kind == "Q4_1"
    assert layer.mlp.down_proj.blocks.kind == "Q4_1"
    assert bf16.model.lm_head.blocks.kind == "Q8_0"  # tied to the Q8_0 embedding

    prompt = [1, 504, 3458, 282, 4649, 314, 4182, 30, 378, 3458, 282]
    reference = _step_logits(
        ModelRunner.load(real_model_dir, torch.float32, BLOCK_SIZE, ParallelGroup(), cpu),
        prompt,
        copies=1,
    )[0]
    on_blocks = _step_logits(bf16, prompt, copies=1)[0]  # 1 token per step: the kernel
    dense = _step_logits(bf16, prompt, copies=gguf.MAX_TOKENS + 1)[0]  # oneDNN's product
    scale = reference.abs().max()
    for logits in (on_blocks, dense):
        assert logits.argmax() == reference.argmax()
        assert (logits - reference).abs().max() / scale < 0.05
