"""Attention metadata for the attention tests."""

from __future__ import annotations

import torch

from textgen.server.attention.backend import AttentionMetadata


def decode_metadata(lengths: list[int], tables: list[list[int]], block_size: int):
    """One decode token per sequence over contexts of `lengths` tokens."""
    return AttentionMetadata(
        slots=torch.zeros(len(lengths), dtype=torch.long),
        query_lens=[1] * len(lengths),
        context_lens=torch.tensor(lengths),
        block_tables=torch.tensor(tables),
        block_size=block_size,
        max_context_len=max(lengths),
    )
