"""Attention on CPU over the paged cache.

A mixed batch (running sequences' decode tokens, then new prompts) takes both paths.
Decode (one new token per sequence) runs the C kernel of `textgen.server.kernels`, which
reads keys and values in place through the block tables. Where that kernel cannot be
built (or for dtypes it does not take) decode is one batched pair of matmuls: block
tables are padded to [B, max_blocks], the context is gathered block by block as
[B, L, Hkv, D] and positions past each context length are masked. Prefill loops over
sequences, with a causal mask offset by the tokens already cached. Over an int8 cache
every path reads the dequantized keys and values (`LayerCache.gather`; the kernel
dequantizes in registers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textgen.server import kernels
from textgen.server.attention.backend import AttentionBackend, AttentionMetadata
from textgen.server.kv_cache import NATIVE_KINDS, LayerCache

# Query dtypes the C decode kernel takes.
_NATIVE_QUERIES = (torch.float32, torch.bfloat16)


class CpuAttention(AttentionBackend):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        cache.store(metadata.slots, k, v)
        if metadata.is_decode:
            return _any_decode(q, cache, metadata)
        library = _native_library(q)
        if library is not None and q.dtype == torch.bfloat16:
            # Prefill and mixed batches as one decode batch of T single-token queries.
            return _native_decode(library, q, cache, metadata.per_token)
        num_decodes = metadata.num_leading_decodes
        if num_decodes == 0:
            return _prefill(q, cache, metadata)
        # A mixed batch: running sequences' decode tokens first, then new prompts.
        decodes, prompts = metadata.split(num_decodes)
        return torch.cat(
            [
                _any_decode(q[:num_decodes], cache, decodes),
                _prefill(q[num_decodes:], cache, prompts),
            ]
        )  # [T, Hq, D]


def _any_decode(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
    """Single-token queries: the C kernel where it applies, else the torch matmuls."""
    library = _native_library(q)
    if library is not None:
        return _native_decode(library, q, cache, meta)
    return _decode(q, cache, meta)


def _native_library(q: torch.Tensor):
    """The paged attention kernel if it serves `q`'s dtype and device here, else None."""
    if q.dtype not in _NATIVE_QUERIES or q.device.type != "cpu":
        return None
    return kernels.paged_attention()


def _native_decode(
    library, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata
) -> torch.Tensor:
    """The C kernel: no gathered copy of the context, float32 scores and accumulation."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()  # the kernel takes strided rows of contiguous heads
    num_seqs, num_heads, head_dim = q.shape
    key, value = cache.key, cache.value  # [num_blocks, block_size, Hkv, D]
    num_kv_heads = key.shape[2]
    tables = meta.block_tables.contiguous()  # [B, max_blocks] int64
    context_lens = meta.context_lens.contiguous()  # [B] int64
    out = torch.empty(q.shape, dtype=q.dtype)  # [B, Hq, D]
    threads = torch.get_num_threads()
    per_thread = num_heads * (2 * head_dim + meta.max_context_len)
    scratch = torch.empty(threads * per_thread, dtype=torch.float32)
    status = library.textgen_paged_decode(
        q.data_ptr(),
        q.stride(0),
        key.data_ptr(),
        value.data_ptr(),
        out.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        context_lens.data_ptr(),
        num_seqs,
        num_heads,
        num_kv_heads,
        head_dim,
        key.shape[1],
        *key.stride()[:3],
        head_dim**-0.5,
        NATIVE_KINDS[q.dtype],
        NATIVE_KINDS[key.dtype],
        _address(cache.key_scale),
        _address(cache.value_scale),
        scratch.data_ptr(),
        per_thread,
        threads,
    )
    if status != 0:
        raise RuntimeError(f"paged decode kernel rejected the shapes (status {status})")
    return out


def _decode(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
    """Batched single-token attention as two matmuls per KV head group.

    Why not SDPA: its CPU flash kernel is built for long query blocks; with one query
    per sequence it cost 14 ms per layer at batch 64 (200-token contexts, bf16), the
    matmuls below well under 1 ms. The context is gathered by whole blocks (contiguous
    [block_size, Hkv, D] chunks), which is several times faster than slot by slot.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = cache.key.shape[2]
    num_blocks = -(-meta.max_context_len // meta.block_size)
    tables = meta.block_tables[:, :num_blocks]  # [B, nb]
    length = num_blocks * meta.block_size
    if cache.quantized:
        slots = tables.unsqueeze(-1) * meta.block_size + torch.arange(meta.block_size)
        keys, values = cache.gather(slots.view(num_seqs, length), q.dtype)  # [B, L, Hkv, D]
    else:
        keys = cache.key[tables].view(num_seqs, length, num_kv_heads, head_dim)
        values = cache.value[tables].view(num_seqs, length, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    query = q.view(num_seqs, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    scores = torch.matmul(query, keys.permute(0, 2, 3, 1)).float()  # [B, Hkv, G, L]
    positions = torch.arange(length, device=q.device)  # [L]
    padding = positions >= meta.context_lens.unsqueeze(1)  # [B, L]
    scores.mul_(head_dim**-0.5).masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)  # [B, Hkv, G, L]
    out = torch.matmul(probs, values.transpose(1, 2))  # [B, Hkv, G, D]
    return out.view(num_seqs, num_heads, head_dim)  # [T=B, Hq, D]


def _prefill(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
    outputs = []
    start = 0
    for b, query_len in enumerate(meta.query_lens):
        context_len = int(meta.context_lens[b])
        positions = torch.arange(context_len, device=q.device)  # [L]
        slots = _context_slots(meta.block_tables[b : b + 1], positions, meta.block_size)[0]
        keys, values = cache.gather(slots, q.dtype)  # [L, Hkv, D]
        keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [Hkv, L, D]
        # Query i sits at position context_len - query_len + i: it sees keys up to there.
        mask = torch.ones(query_len, context_len, dtype=torch.bool, device=q.device)
        mask = mask.tril(diagonal=context_len - query_len)  # [Tq, L]
        query = q[start : start + query_len].transpose(0, 1)  # [Hq, Tq, D]
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, enable_gqa=True
        )  # [Hq, Tq, D]
        outputs.append(out.transpose(0, 1))
        start += query_len
    return torch.cat(outputs)  # [T, Hq, D]


def _context_slots(
    block_tables: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Slot of every context position through each block table: [B, L]."""
    blocks = block_tables[:, positions // block_size]  # [B, L]
    return blocks * block_size + positions % block_size


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()
