"""Attention on CPU over the paged cache.

A mixed batch (running sequences' decode tokens, then new prompts) takes both paths.
Decode (one new token per sequence) runs the native operator `kernels.paged_decode`,
which reads keys and values in place through the block tables. Where the platform has no
native operators, decode is one batched pair of matmuls: block
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
from textgen.server.kv_cache import LayerCache
from textgen.server.platform import Platform


class CpuAttention(AttentionBackend):
    def __init__(self, platform: Platform) -> None:
        self.native_cpu = platform.native_ops  # the native decode operator serves

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
            return self._decode(q, cache, metadata)
        if self.native_cpu:
            # Prefill and mixed batches as one decode batch of T single-token queries.
            return _native_decode(q, cache, metadata.per_token)
        num_decodes = metadata.num_leading_decodes
        if num_decodes == 0:
            return _prefill(q, cache, metadata)
        # A mixed batch: running sequences' decode tokens first, then new prompts.
        decodes, prompts = metadata.split(num_decodes)
        return torch.cat(
            [
                self._decode(q[:num_decodes], cache, decodes),
                _prefill(q[num_decodes:], cache, prompts),
            ]
        )  # [T, Hq, D]

    def _decode(self, q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
        """Single-token queries: the native operator where it serves, else torch matmuls."""
        if self.native_cpu:
            return _native_decode(q, cache, meta)
        return _decode(q, cache, meta)


def _native_decode(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata) -> torch.Tensor:
    """The native operator: no gathered copy of the context, float32 scores and sums."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()  # the operator takes strided rows of contiguous heads
    return kernels.paged_decode(
        q,
        cache.key,
        cache.value,
        meta.block_tables,
        meta.context_lens.contiguous(),
        q.shape[2] ** -0.5,
        cache.key_scale,
        cache.value_scale,
    )  # [B, Hq, D]


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
        query = q[start : start + query_len].transpose(0, 1)  # [Hq, Tq, D]
        if query_len == context_len:  # nothing cached: plain causal, SDPA's flash kernel
            out = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, enable_gqa=True
            )  # [Hq, Tq, D]
        else:
            # Query i sits at position context_len - query_len + i: it sees keys up to there.
            mask = torch.ones(query_len, context_len, dtype=torch.bool, device=q.device)
            mask = mask.tril(diagonal=context_len - query_len)  # [Tq, L]
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
