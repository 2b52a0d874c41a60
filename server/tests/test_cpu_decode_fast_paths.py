"""The CPU decode fast paths (native operators, each ISA level this CPU runs) against the
plain torch they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_testing import decode_metadata
from conftest import cpu_platform

from textgen.server.attention.backend import AttentionMetadata
from textgen.server.attention.cpu import CpuAttention, _decode, _native_decode
from textgen.server.kv_cache import LayerCache
from textgen.server.layers.activation import GatedActivation
from textgen.server.layers.norm import RMSNorm
from textgen.server.layers.packed import pack, packed_linear
from textgen.server.layers.rotary import RopeConfig, RotaryEmbedding

CPU = torch.device("cpu")


def _reference(q, key, value, table: list[int], length: int) -> torch.Tensor:
    """SDPA in float64 over one sequence's context, read slot by slot: [Hq, D]."""
    _, block_size, hkv, d = key.shape
    slots = [table[p // block_size] * block_size + p % block_size for p in range(length)]
    k = key.view(-1, hkv, d)[slots].transpose(0, 1).double()  # [Hkv, L, D]
    v = value.view(-1, hkv, d)[slots].transpose(0, 1).double()
    return F.scaled_dot_product_attention(q.double().unsqueeze(1), k, v, enable_gqa=True).squeeze(1)


@pytest.mark.parametrize("decode", [_decode, _native_decode], ids=["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa_over_the_paged_context(dtype, decode, isa):
    torch.manual_seed(0)
    num_blocks, block_size, hkv, hq, d = 12, 4, 2, 6, 16
    key = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    value = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11]])  # second row: 3 full blocks + 1 token
    context_lens = torch.tensor([6, 13])
    q = torch.randn(2, hq, d).to(dtype)
    meta = AttentionMetadata(
        slots=torch.tensor([0, 0]),
        query_lens=[1, 1],
        context_lens=context_lens,
        block_tables=tables,
        block_size=block_size,
        max_context_len=13,
    )
    out = decode(q, LayerCache(key, value), meta)  # [2, Hq, D]
    for b in range(2):
        expected = _reference(q[b], key, value, tables[b].tolist(), int(context_lens[b]))
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[b].double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size", "lengths"),
    [
        (4, 4, 24, 5, [1, 11, 23]),  # no grouping, head_dim not a multiple of 16
        (8, 1, 64, 16, [16, 17, 90]),  # one KV head for all
        (6, 2, 128, 3, [2, 40]),
        # the AVX-512 bf16 path's shapes: 1 to 4 query heads per KV head, D = 64 or 128
        (9, 3, 64, 16, [1, 17, 200]),
        (8, 2, 128, 5, [3, 64]),
        (4, 1, 64, 4, [9, 31]),
        (2, 2, 64, 16, [33]),
        (9, 3, 64, 32, [5, 45, 70]),  # blocks longer than the 16 tokens scored at once
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_on_awkward_shapes(hq, hkv, d, block_size, lengths, dtype, isa):
    torch.manual_seed(1)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    key = (3 * torch.randn(num_blocks, block_size, hkv, d)).to(dtype)
    value = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    order = torch.randperm(num_blocks).tolist()  # tables point anywhere in the cache
    tables, used = [], 0
    for count in blocks_per_seq:
        tables.append(order[used : used + count] + [0] * (max(blocks_per_seq) - count))
        used += count
    q = torch.randn(len(lengths), hq, d).to(dtype)
    meta = decode_metadata(lengths, tables, block_size)
    out = _native_decode(q, LayerCache(key, value), meta)  # [B, Hq, D]
    assert out.dtype == dtype
    for b, n in enumerate(lengths):
        expected = _reference(q[b], key, value, tables[b], n)
        # float32 accumulation: float32 output within 1e-5; bf16 output within its rounding.
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(out[b].double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_store_writes_what_index_copy_writes(dtype, isa):
    torch.manual_seed(6)
    native = LayerCache(
        torch.zeros(5, 4, 2, 16, dtype=dtype), torch.zeros(5, 4, 2, 16, dtype=dtype)
    )
    native = LayerCache(native.key, native.value, native=True)
    plain = LayerCache(native.key.clone(), native.value.clone())
    qkv = torch.randn(6, (4 + 2 * 2) * 16).to(dtype)  # k and v: strided views of one row
    k, v = qkv[:, 64:96].view(6, 2, 16), qkv[:, 96:].view(6, 2, 16)
    slots = torch.tensor([3, 0, 19, 7, 12, 8])
    native.store(slots, k, v)
    plain.store(slots, k, v)
    assert torch.equal(native.key, plain.key) and torch.equal(native.value, plain.value)


def test_packed_linear_is_identical_to_linear_in_bf16():
    if not cpu_platform(torch.bfloat16).packed_bf16_linear:
        pytest.skip("no native bf16 oneDNN on this CPU")
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    packed = pack(weight, True)
    bias = torch.randn(96, dtype=torch.bfloat16)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(packed_linear(x, packed, bias), F.linear(x, weight, bias))


def test_float32_weights_stay_unpacked():
    assert pack(torch.randn(8, 8), True) is None
    assert pack(torch.randn(8, 8, dtype=torch.bfloat16), False) is None
    assert not cpu_platform(torch.float32).packed_bf16_linear


# Float32 rows: the variance's sum of 40 squares in another order differs by at most
# 39 * 2^-24 of itself, half that after the square root; each of the two products rounds
# once more on either side. So the outputs agree to 2e-6 of their size.
FLOAT32_NORM_RTOL = 2e-6


@pytest.mark.parametrize("tokens", [1, 3, 64, 300])  # 64 and 300: spread over the threads
def test_native_rms_norm_rounds_like_the_torch_path(tokens, isa):
    torch.manual_seed(tokens)
    norm = RMSNorm((torch.rand(40) + 0.5).to(torch.bfloat16), eps=1e-5, native=True)
    wide = (torch.randn(tokens, 56) * 3).to(torch.bfloat16)
    x = wide[:, 8:48]  # rows 56 elements apart
    out = norm(x)
    norm.native = False
    expected = norm(x)
    # Same roundings; only the order of the float32 variance sum differs.
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=0.0)
    assert (out != expected).float().mean() < 0.01


@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
def test_native_rms_norm_in_float32(tokens, isa):
    torch.manual_seed(tokens)
    norm = RMSNorm(torch.rand(40) + 0.5, eps=1e-5, native=True)
    x = (torch.randn(tokens, 56) * 3)[:, 8:48]
    residual = torch.randn(tokens, 40) * 3
    out, added = norm.add_and_norm(x, residual)
    alone = norm(x)
    norm.native = False
    expected, expected_added = norm.add_and_norm(x, residual)
    assert torch.equal(added, expected_added)  # one float32 add each
    torch.testing.assert_close(out, expected, rtol=FLOAT32_NORM_RTOL, atol=0.0)
    torch.testing.assert_close(alone, norm(x), rtol=FLOAT32_NORM_RTOL, atol=0.0)


@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
def test_native_add_and_norm_rounds_like_the_torch_path(tokens, isa):
    """A layer's residual add and the next norm: the sum to the bit, the norm as above."""
    torch.manual_seed(tokens)
    norm = RMSNorm((torch.rand(40) + 0.5).to(torch.bfloat16), eps=1e-5, native=True)
    x = (torch.randn(tokens, 56) * 3).to(torch.bfloat16)[:, 8:48]  # rows 56 elements apart
    residual = (torch.randn(tokens, 40) * 3).to(torch.bfloat16)
    out, added = norm.add_and_norm(x, residual)
    assert torch.equal(added, x + residual)  # rounded as torch's bf16 add rounds
    torch.testing.assert_close(out, norm(x + residual), rtol=0.0, atol=0.0)
    norm.native = False
    expected, expected_added = norm.add_and_norm(x, residual)
    assert torch.equal(added, expected_added)
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=0.0)
    assert (out != expected).float().mean() < 0.01


@pytest.mark.parametrize(("tokens", "hq", "hkv"), [(1, 9, 3), (5, 4, 4), (64, 8, 1), (300, 3, 1)])
def test_native_rotary_matches_the_torch_path(tokens, hq, hkv, isa):
    torch.manual_seed(hq)
    d = 24
    config = RopeConfig(head_dim=d, theta=10000.0, max_position=512)
    rotary = RotaryEmbedding(config, torch.bfloat16, CPU, native=True)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d).to(torch.bfloat16)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.view(tokens, hq, d), k.view(tokens, hkv, d)
    positions = torch.randint(0, 512, (tokens,))
    expected = []  # float64 rotation with float64 tables, rounded once to bf16
    angles = positions.double()[:, None] * (1.0 / 10000.0 ** (torch.arange(0, d, 2) / d)).double()
    cos = torch.cat([angles.cos()] * 2, -1)[:, None]  # [T, 1, D]
    sin = torch.cat([angles.sin()] * 2, -1)[:, None]
    for x in (q, k):
        x64 = x.double()
        turned = torch.cat([-x64[..., d // 2 :], x64[..., : d // 2]], dim=-1)
        expected.append((x64 * cos + turned * sin).to(torch.bfloat16))
    q_native, k_native = rotary(positions, q, k)  # views of the fused qkv, rotated in place
    assert q_native.data_ptr() == qkv.data_ptr()
    for out, want in zip((q_native, k_native), expected, strict=True):
        torch.testing.assert_close(out, want, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 64])
def test_native_rotary_in_float32_is_the_torch_path_to_the_bit(tokens, isa):
    """The same two products and one sum per element, on the same float32 tables."""
    torch.manual_seed(tokens)
    config = RopeConfig(head_dim=32, theta=10000.0, max_position=256)
    native = RotaryEmbedding(config, torch.float32, CPU, native=True)
    plain = RotaryEmbedding(config, torch.float32, CPU)
    qkv = torch.randn(tokens, (4 + 2 * 2) * 32)
    q, k = qkv[:, :128].view(tokens, 4, 32), qkv[:, 128:192].view(tokens, 2, 32)
    positions = torch.randint(0, 256, (tokens,))
    expected = plain(positions, q.clone(), k.clone())
    out = native(positions, q, k)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (7, 65), (300, 129)])
def test_native_silu_and_mul_rounds_like_the_torch_path(tokens, inter, isa):
    torch.manual_seed(inter)
    act = GatedActivation("silu", native=True)
    wide = (torch.randn(tokens, 2 * inter + 8) * 4).to(torch.bfloat16)
    wide[0, :4] = torch.tensor([0.0, -0.0, 30.0, -100.0])  # zeros, saturation, underflow
    gate_up = wide[:, 8:]  # rows 2 * inter + 8 elements apart
    out = act(gate_up)
    gate, up = gate_up.split(inter, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    # Same roundings; only the exp may differ in its last float32 bit.
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=0.0)
    assert (out != expected).float().mean() < 1e-3
    # float32, against float64: exp_nonpositive is within 2^-23 of exp (scanned over its
    # range), then silu's sum and quotient and the product with up round once each, so
    # 2^-23 + 3 * 2^-24 < 2^-21 relative. Values that underflow to denormals (the -100)
    # keep no relative precision, hence the absolute 1e-30.
    gate, up = wide[:, 8:].float().split(inter, dim=-1)
    exact = (gate.double() * torch.sigmoid(gate.double()) * up.double()).float()
    torch.testing.assert_close(act(wide[:, 8:].float()), exact, rtol=2**-21, atol=1e-30)


def test_bf16_prefill_and_mixed_batches_attend_through_the_kernel_per_token(isa):
    """A decode, a prompt after a cached prefix and a fresh prompt in one bf16 forward."""
    torch.manual_seed(4)
    hq, hkv, d, block_size, num_blocks = 6, 2, 32, 4, 16
    dtype = torch.bfloat16
    key = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    value = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    tables = [[3, 7, 1, 0], [5, 2, 9, 11], [4, 6, 8, 10]]
    # (cached tokens, new tokens): a decode, 5 new after 6 cached, a fresh prompt of 7
    shapes = [(9, 1), (6, 5), (0, 7)]
    slots, contexts = [], []
    for table, (cached, new) in zip(tables, shapes, strict=True):
        positions = range(cached, cached + new)
        slots += [table[p // block_size] * block_size + p % block_size for p in positions]
        contexts.append(cached + new)
    num_tokens = len(slots)
    q = torch.randn(num_tokens, hq, d).to(dtype)
    k = torch.randn(num_tokens, hkv, d).to(dtype)
    v = torch.randn(num_tokens, hkv, d).to(dtype)
    meta = AttentionMetadata(
        slots=torch.tensor(slots),
        query_lens=[new for _, new in shapes],
        context_lens=torch.tensor(contexts),
        block_tables=torch.tensor(tables),
        block_size=block_size,
        max_context_len=max(contexts),
    )
    # Token i of a sequence with c cached tokens sees c + i + 1 tokens of its own table.
    rows = [
        (table, c + i + 1) for table, (c, n) in zip(tables, shapes, strict=True) for i in range(n)
    ]
    assert meta.per_token.context_lens.tolist() == [length for _, length in rows]
    attention = CpuAttention(cpu_platform(dtype))
    assert attention.native_cpu
    out = attention.forward(q, k, v, LayerCache(key, value), meta)  # writes k, v first
    for row, (table, length) in enumerate(rows):
        expected = _reference(q[row], key, value, table, length)
        torch.testing.assert_close(out[row].double(), expected, atol=8e-3, rtol=8e-3)


def test_native_rotary_refuses_positions_past_its_table(isa):
    config = RopeConfig(head_dim=8, theta=10000.0, max_position=16)
    rotary = RotaryEmbedding(config, torch.bfloat16, CPU, native=True)
    q, k = torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(IndexError):
        rotary(torch.tensor([16]), q, k)
    rotary(torch.tensor([15]), q, k)  # the last position is fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_reads_query_rows_in_place(dtype, isa):
    """q as the model hands it over: a view into a fused qkv row, not a contiguous copy."""
    torch.manual_seed(5)
    hq, hkv, d, block_size, lengths = 9, 3, 64, 16, [3, 40]
    key = torch.randn(6, block_size, hkv, d).to(dtype)
    value = torch.randn(6, block_size, hkv, d).to(dtype)
    tables = [[4, 0, 0], [1, 5, 2]]
    qkv = torch.randn(len(lengths), (hq + 2 * hkv) * d).to(dtype)
    q = qkv[:, : hq * d].view(len(lengths), hq, d)  # rows (hq + 2 hkv) d apart
    assert not q.is_contiguous()
    meta = decode_metadata(lengths, tables, block_size)
    out = _native_decode(q, LayerCache(key, value), meta)
    assert torch.equal(out, _native_decode(q.contiguous(), LayerCache(key, value), meta))
    for b, n in enumerate(lengths):
        expected = _reference(q[b], key, value, tables[b], n)
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(out[b].double(), expected, atol=tolerance, rtol=tolerance)
