"""The attention backend interface and the per-forward metadata it reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from textgen.server.kv_cache import LayerCache


@dataclass(frozen=True)
class AttentionMetadata:
    """Where a forward's tokens go in the cache and what each sequence attends to.

    The T new tokens of a forward are the B sequences' new tokens, packed
    in order. Built once per forward and shared by every layer.
    """

    # Cache slot of every new token. [T]
    slots: torch.Tensor
    # New tokens per sequence; they are the last tokens of its context.
    query_lens: list[int]
    # Tokens each sequence attends to after this forward (cached + new). [B]
    context_lens: torch.Tensor
    # Block ids of each sequence, padded with 0 to the longest table. [B, max_blocks]
    block_tables: torch.Tensor
    block_size: int
    # max(context_lens), known without reading the tensor back.
    max_context_len: int

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: the batched path applies."""
        return max(self.query_lens) == 1


class AttentionBackend(ABC):
    """Writes the new keys/values into the paged cache, then attends.

    Invariant: after `forward`, the cache holds the new tokens' K/V at
    `metadata.slots`; the result attends causally over each sequence's
    context, read through its block table.
    """

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        cache: LayerCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        ...
