"""The int8 KV cache (`--kv-cache-dtype int8`): its store, its attention, its accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_testing import decode_metadata
from conftest import cpu_platform

from textgen.server.attention.backend import AttentionMetadata
from textgen.server.attention.cpu import CpuAttention, _decode, _native_decode
from textgen.server.distributed import ParallelGroup
from textgen.server.kv_cache import KVCache, KVCacheSpec, LayerCache, quantize_int8
from textgen.server.model_runner import ModelRunner, SequenceInput

CPU = torch.device("cpu")


def _cache(num_blocks: int, block_size: int, hkv: int, d: int, native: bool = True) -> LayerCache:
    spec = KVCacheSpec(1, hkv, d, block_size, torch.int8)
    return KVCache(spec, num_blocks, CPU, native=native).layer(0)


def _slots(table: list[int], positions: range, block_size: int) -> torch.Tensor:
    slots = [table[p // block_size] * block_size + p % block_size for p in positions]
    return torch.tensor(slots, dtype=torch.long)


def test_an_int8_block_costs_about_half_a_bf16_one():
    bf16 = KVCacheSpec(30, 3, 64, 16, torch.bfloat16)
    int8 = KVCacheSpec(30, 3, 64, 16, torch.int8)
    assert bf16.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert int8.bytes_per_block == 2 * 30 * 16 * 3 * (64 + 4)  # a float32 scale per row
    assert int8.num_blocks_for(2**30) == 2**30 // int8.bytes_per_block


def test_quantize_int8_rounds_each_row_to_its_own_scale():
    rows = torch.tensor([[[0.5, -1.0, 0.25, 0.0]], [[0.0, 0.0, 0.0, 0.0]], [[3.0, 1.5, -3.0, 1.0]]])
    quantized, scale = quantize_int8(rows)
    assert quantized.dtype == torch.int8 and scale.shape == (3, 1)
    assert quantized[0, 0].tolist() == [64, -127, 32, 0]  # 63.5 rounds to even
    assert quantized[1, 0].tolist() == [0, 0, 0, 0] and scale[1, 0] == 0  # no division by 0
    assert quantized[2, 0].tolist() == [127, 64, -127, 42]  # 63.5 -> 64, 42.33 -> 42
    torch.testing.assert_close(scale[:, 0], torch.tensor([1 / 127, 0.0, 3 / 127]))
    error = (quantized.float() * scale.unsqueeze(-1) - rows).abs()
    assert (error <= scale.unsqueeze(-1) / 2 + 1e-7).all()  # at most half a step


@pytest.mark.parametrize("d", [64, 24])  # 24: not whole vectors, the scalar loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5, 64, 300])  # 64 and more: the OpenMP team
def test_native_store_equals_the_torch_quantization_bit_for_bit(dtype, num_tokens, d, isa):
    torch.manual_seed(num_tokens)
    hq, hkv, block_size = 6, 2, 16
    num_blocks = num_tokens // block_size + 4
    # k and v as the attention layer gets them: strided views of one fused projection
    qkv = (4 * torch.randn(num_tokens, (hq + 2 * hkv) * d)).to(dtype)
    k = qkv[:, hq * d : (hq + hkv) * d].view(num_tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(num_tokens, hkv, d)
    k[0, 0] = 0  # a row of zeros keeps scale 0
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    native, reference = (
        _cache(num_blocks, block_size, hkv, d),
        _cache(num_blocks, block_size, hkv, d, native=False),
    )
    native.store(slots, k, v)
    for cache, scales, rows in (
        (reference.flat()[0], reference.key_scale, k),
        (reference.flat()[1], reference.value_scale, v),
    ):  # the torch path, written out
        quantized, scale = quantize_int8(rows)
        cache[slots] = quantized
        scales[slots // block_size, :, slots % block_size] = scale
    assert torch.equal(native.key, reference.key) and torch.equal(native.value, reference.value)
    assert torch.equal(native.key_scale, reference.key_scale)
    assert torch.equal(native.value_scale, reference.value_scale)
    assert native.key_scale[slots[0] // block_size, 0, slots[0] % block_size] == 0
    keys, values = native.gather(slots, torch.float32)  # dequantized: within half a step
    for got, rows, scales in ((keys, k, native.key_scale), (values, v, native.value_scale)):
        step = scales[slots // block_size, :, slots % block_size].unsqueeze(-1)  # [T, Hkv, 1]
        assert ((got - rows.float()).abs() <= step / 2 * (1 + 1e-5)).all()


def _reference(q: torch.Tensor, cache: LayerCache, table: list[int], length: int) -> torch.Tensor:
    """SDPA in float64 over the dequantized context of one sequence: [Hq, D]."""
    keys, values = cache.gather(_slots(table, range(length), cache.block_size), torch.float64)
    return F.scaled_dot_product_attention(
        q.double().unsqueeze(1), keys.transpose(0, 1), values.transpose(0, 1), enable_gqa=True
    ).squeeze(1)


def _filled(hkv: int, d: int, block_size: int, lengths: list[int], dtype: torch.dtype):
    """An int8 cache holding one context per length, through block tables in random order."""
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    cache = _cache(num_blocks, block_size, hkv, d)
    order, tables, used = torch.randperm(num_blocks).tolist(), [], 0
    for count, length in zip(blocks_per_seq, lengths, strict=True):
        table = order[used : used + count]
        used += count
        rows = (3 * torch.randn(length, hkv, d)).to(dtype)
        cache.store(_slots(table, range(length), block_size), rows, torch.randn_like(rows))
        tables.append(table + [0] * (max(blocks_per_seq) - count))
    return cache, tables


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size", "lengths"),
    [
        (4, 4, 24, 5, [1, 11, 23]),  # the portable path: head_dim not a multiple of 64
        (6, 2, 128, 3, [2, 40]),  # odd block size
        # the AVX-512 int8 path's shapes: 1 to 4 query heads per KV head, D = 64 or 128
        (9, 3, 64, 16, [1, 17, 200]),
        (8, 2, 128, 5, [3, 64]),
        (4, 1, 64, 4, [9, 31]),
        (2, 2, 64, 16, [33]),
        (9, 3, 64, 32, [5, 45, 70]),
        (10, 2, 64, 16, [20]),  # 5 heads per KV head: the portable path
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", ["native", "torch"])
def test_decode_over_an_int8_cache_matches_sdpa_over_its_values(
    hq, hkv, d, block_size, lengths, dtype, decode, isa
):
    torch.manual_seed(1)
    cache, tables = _filled(hkv, d, block_size, lengths, dtype)
    q = torch.randn(len(lengths), hq, d).to(dtype)
    meta = decode_metadata(lengths, tables, block_size)
    out = _native_decode(q, cache, meta) if decode == "native" else _decode(q, cache, meta)
    assert out.dtype == dtype
    for b, n in enumerate(lengths):
        expected = _reference(q[b], cache, tables[b], n)
        # float32: the 16-bit query and probabilities of the AVX-512 path carry about
        # 1.5e-5 of the largest; bf16: the output's rounding (and the torch path's bf16
        # keys, values and products).
        tolerance = 2e-4 if dtype == torch.float32 else (8e-3 if decode == "native" else 3e-2)
        torch.testing.assert_close(out[b].double(), expected, atol=tolerance, rtol=tolerance)


def test_prefill_and_mixed_batches_read_an_int8_cache(isa):
    """A decode, a prompt after a cached prefix and a fresh prompt in one forward."""
    torch.manual_seed(4)
    hq, hkv, d, block_size = 6, 2, 64, 4
    cache = _cache(16, block_size, hkv, d)
    tables = [[3, 7, 1, 0], [5, 2, 9, 11], [4, 6, 8, 10]]
    shapes = [(9, 1), (6, 5), (0, 7)]  # (cached tokens, new tokens)
    for table, (cached, _) in zip(tables, shapes, strict=True):
        rows = torch.randn(cached, hkv, d)
        cache.store(_slots(table, range(cached), block_size), rows, torch.randn_like(rows))
    slots = torch.cat(
        [_slots(t, range(c, c + n), block_size) for t, (c, n) in zip(tables, shapes, strict=True)]
    )
    num_tokens = len(slots)
    meta = AttentionMetadata(
        slots=slots,
        query_lens=[n for _, n in shapes],
        context_lens=torch.tensor([c + n for c, n in shapes]),
        block_tables=torch.tensor(tables),
        block_size=block_size,
        max_context_len=12,
    )
    rows = [(t, c + i + 1) for t, (c, n) in zip(tables, shapes, strict=True) for i in range(n)]
    for dtype in (torch.float32, torch.bfloat16):  # torch prefill and the kernel per token
        q = torch.randn(num_tokens, hq, d).to(dtype)
        k, v = torch.randn(num_tokens, hkv, d).to(dtype), torch.randn(num_tokens, hkv, d).to(dtype)
        out = CpuAttention(cpu_platform(dtype)).forward(q, k, v, cache, meta)  # stores k, v
        keys, _ = cache.gather(slots, torch.float32)
        torch.testing.assert_close(keys, k.float(), atol=0.05, rtol=0)  # quantized, stored
        for row, (table, length) in enumerate(rows):
            expected = _reference(q[row], cache, table, length)
            torch.testing.assert_close(out[row].double(), expected, atol=8e-3, rtol=8e-3)


def _all_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    """Every position's logits of one prefill: [len(prompt), V] float32."""
    runner.allocate_kv_cache(len(prompt) // 16 + 2)
    table = list(range(len(prompt) // 16 + 2))
    sequence = SequenceInput(prompt, 0, list(range(len(prompt))), table, all_logits=True)
    return runner.forward([sequence])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_model_with_an_int8_cache_stays_close_to_float32(real_model_dir, dtype):
    int8 = ModelRunner.load(
        real_model_dir, cpu_platform(dtype), 16, ParallelGroup(), kv_cache_dtype="int8"
    )
    assert int8.kv_cache_spec.dtype == torch.int8
    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (120,)).tolist()
    reference = _all_logits(
        ModelRunner.load(real_model_dir, cpu_platform(torch.float32), 16, ParallelGroup()), prompt
    )
    logits = _all_logits(int8, prompt)
    assert int8.kv_cache.key_scales[0].abs().sum() > 0  # the cache that was read is int8
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = F.kl_div(
        logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"
    ).item()
    # measured on this prompt (bf16): top-1 agreement 0.85, KL 0.0025 (bf16 cache: 0.92, 0.0019)
    assert agree > 0.8 and 0 < kl < 0.01, (agree, kl)


def test_decode_steps_over_an_int8_cache_follow_the_prefill(real_model_dir):
    """Tokens decoded one by one see the same quantized context as a prefill of them all.

    Not to the bit: a token's keys and values computed alone or in a batch differ in their
    last float bits (the products sum in another order), and where such a value lies on a
    rounding boundary of the int8 grid the two caches store it one step apart, a
    difference the later layers carry on. Those are single steps at the few entries near a
    boundary, where rounding the cache to the grid at all moves every entry by up to half a
    step. So the bound is the int8 cache's own effect, measured here: decoding one by one
    must move the logits less than the int8 cache moves them from a float32 cache's. The
    float bits differ from CPU to CPU; this argument does not.
    """
    runner = ModelRunner.load(
        real_model_dir, cpu_platform(torch.float32), 16, ParallelGroup(), kv_cache_dtype="int8"
    )
    prompt = [504, 3458, 282, 4649, 314, 7001, 29, 1106]
    runner.allocate_kv_cache(4)
    table = [1, 2, 3]
    tokens = list(prompt)
    step = SequenceInput(list(prompt), 0, _slots(table, range(len(prompt)), 16).tolist(), table)
    for _ in range(12):  # greedy, one token per forward after the prompt
        tokens.append(int(runner.forward([step])[0][-1].argmax()))
        position = len(tokens) - 1
        slot = _slots(table, range(position, position + 1), 16).tolist()
        step = SequenceInput([tokens[-1]], position, slot, table)
    decoded = runner.forward([step])[0][-1]
    prefill = _all_logits(runner, tokens)
    float_cache = ModelRunner.load(real_model_dir, cpu_platform(torch.float32), 16, ParallelGroup())
    reference = _all_logits(float_cache, tokens)[-1]
    assert (decoded - prefill[-1]).norm() < (prefill[-1] - reference).norm()
    assert prefill[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens[len(prompt) :]
