"""The C kernels: how they are built and found, and the decode kernel on awkward shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from textgen.server import kernels
from textgen.server.attention.backend import AttentionMetadata
from textgen.server.attention.cpu import _native_decode
from textgen.server.kv_cache import LayerCache


def test_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_KERNEL_CACHE", str(tmp_path))
    first = kernels.build("paged_attention")
    assert first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert kernels.build("paged_attention") == first
    assert first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left over


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        kernels.build("paged_attention")


def test_switched_off_by_environment(monkeypatch):
    kernels.paged_attention.cache_clear()
    monkeypatch.setenv("TEXTGEN_NATIVE_KERNELS", "0")
    try:
        assert kernels.paged_attention() is None
    finally:
        kernels.paged_attention.cache_clear()


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "block_size", "lengths"),
    [
        (4, 4, 24, 5, [1, 11, 23]),  # no grouping, head_dim not a multiple of 16
        (8, 1, 64, 16, [16, 17, 90]),  # one KV head for all
        (6, 2, 128, 3, [2, 40]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_on_awkward_shapes(hq, hkv, d, block_size, lengths, dtype):
    library = kernels.paged_attention()
    assert library is not None, "the C kernel must build here (a compiler is on PATH)"
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
    meta = AttentionMetadata(
        slots=torch.zeros(len(lengths), dtype=torch.long),
        query_lens=[1] * len(lengths),
        context_lens=torch.tensor(lengths),
        block_tables=torch.tensor(tables),
        block_size=block_size,
        max_context_len=max(lengths),
    )
    out = _native_decode(library, q, LayerCache(key, value), meta)  # [B, Hq, D]
    assert out.dtype == dtype
    for b, n in enumerate(lengths):
        slots = [tables[b][p // block_size] * block_size + p % block_size for p in range(n)]
        k = key.view(-1, hkv, d)[slots].transpose(0, 1).double()  # [Hkv, L, D]
        v = value.view(-1, hkv, d)[slots].transpose(0, 1).double()
        expected = F.scaled_dot_product_attention(
            q[b].double().unsqueeze(1), k, v, enable_gqa=True
        ).squeeze(1)  # [Hq, D]
        # float32 accumulation: float32 output within 1e-5; bf16 output within its rounding.
        tolerance = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(out[b].double(), expected, atol=tolerance, rtol=tolerance)
