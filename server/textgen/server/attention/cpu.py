"""Attention in plain torch: gather the context from the paged cache, then SDPA.

Decode (one new token per sequence) is one batched call: block tables are
padded to [B, max_blocks], the context is gathered as [B, L, Hkv, D] and
positions past each context length are masked. Prefill loops over sequences,
with a causal mask offset by the tokens already cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textgen.server.attention.backend import AttentionBackend, AttentionMetadata
from textgen.server.kv_cache import LayerCache


class CpuAttention(AttentionBackend):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        key_cache, value_cache = cache.flat()  # [num_slots, Hkv, D]
        key_cache.index_copy_(0, metadata.slots, k)
        value_cache.index_copy_(0, metadata.slots, v)
        if metadata.is_decode:
            return _decode(q, key_cache, value_cache, metadata)
        return _prefill(q, key_cache, value_cache, metadata)


def _decode(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    max_len = int(meta.context_lens.max())
    positions = torch.arange(max_len, device=q.device)  # [L]
    slots = _context_slots(meta.block_tables, positions, meta.block_size)  # [B, L]
    keys = key_cache[slots].transpose(1, 2)  # [B, Hkv, L, D]
    values = value_cache[slots].transpose(1, 2)
    mask = (positions < meta.context_lens.unsqueeze(1))[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True
    )  # [B, Hq, 1, D]
    return out.squeeze(2)  # [T=B, Hq, D]


def _prefill(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    outputs = []
    start = 0
    for b, query_len in enumerate(meta.query_lens):
        context_len = int(meta.context_lens[b])
        positions = torch.arange(context_len, device=q.device)  # [L]
        slots = _context_slots(meta.block_tables[b : b + 1], positions, meta.block_size)[0]
        keys = key_cache[slots].transpose(0, 1)  # [Hkv, L, D]
        values = value_cache[slots].transpose(0, 1)
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
