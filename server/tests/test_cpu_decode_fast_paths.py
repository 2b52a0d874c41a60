"""The CPU decode fast paths against the plain torch they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textgen.server import kernels
from textgen.server.attention.backend import AttentionMetadata
from textgen.server.attention.cpu import _decode, _native_decode
from textgen.server.kv_cache import LayerCache
from textgen.server.layers.packed import pack, packed_linear


def _native(q, cache, meta):
    library = kernels.paged_attention()
    assert library is not None, "the C kernel must build here (a compiler is on PATH)"
    return _native_decode(library, q, cache, meta)


@pytest.mark.parametrize("decode", [_decode, _native], ids=["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa_over_the_paged_context(dtype, decode):
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
        n = int(context_lens[b])
        slots = [int(tables[b, p // block_size]) * block_size + p % block_size for p in range(n)]
        k = key.view(-1, hkv, d)[slots].transpose(0, 1).float()  # [Hkv, L, D]
        v = value.view(-1, hkv, d)[slots].transpose(0, 1).float()
        expected = F.scaled_dot_product_attention(
            q[b].float().unsqueeze(1), k, v, enable_gqa=True
        ).squeeze(1)  # [Hq, D]
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out[b].float(), expected, atol=tolerance, rtol=tolerance)


def test_packed_linear_is_identical_to_linear_in_bf16():
    weight = torch.randn(96, 64, dtype=torch.bfloat16)
    packed = pack(weight)
    if packed is None:
        pytest.skip("no native bf16 oneDNN on this CPU")
    bias = torch.randn(96, dtype=torch.bfloat16)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(packed_linear(x, packed, bias), F.linear(x, weight, bias))


def test_float32_weights_stay_unpacked(monkeypatch):
    assert pack(torch.randn(8, 8)) is None
    monkeypatch.setenv("TEXTGEN_PACKED_LINEAR", "0")
    assert pack(torch.randn(8, 8, dtype=torch.bfloat16)) is None
