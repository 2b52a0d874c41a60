"""The attention backend interface and the per-forward metadata it reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

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

    @property
    def num_leading_decodes(self) -> int:
        """How many sequences at the front have one new token (a mixed batch's decodes)."""
        for i, query_len in enumerate(self.query_lens):
            if query_len != 1:
                return i
        return len(self.query_lens)

    @cached_property
    def per_token(self) -> AttentionMetadata:
        """Every new token as a one-token sequence over its own causal context.

        A prefill or mixed batch then reads as a decode batch of T queries: token i of
        a sequence whose context ends at C with Q new tokens attends to C - Q + i + 1
        tokens through the same block table. Computed once per forward.
        """
        query_lens = torch.tensor(self.query_lens, device=self.context_lens.device)  # [B]
        seq = torch.repeat_interleave(
            torch.arange(len(self.query_lens), device=query_lens.device), query_lens
        )  # [T]: the sequence of each token
        starts = torch.cumsum(query_lens, 0) - query_lens  # [B]: first token of each
        index = torch.arange(seq.shape[0], device=seq.device) - starts[seq]  # [T]
        context_lens = self.context_lens[seq] - query_lens[seq] + index + 1  # [T]
        return AttentionMetadata(
            slots=self.slots,
            query_lens=[1] * seq.shape[0],
            context_lens=context_lens,
            block_tables=self.block_tables[seq],  # [T, max_blocks]
            block_size=self.block_size,
            max_context_len=self.max_context_len,
        )

    def split(self, num_seqs: int) -> tuple[AttentionMetadata, AttentionMetadata]:
        """The first `num_seqs` sequences and the rest, as two metadata."""
        num_tokens = sum(self.query_lens[:num_seqs])

        def part(seqs: slice, tokens: slice) -> AttentionMetadata:
            context_lens = self.context_lens[seqs]
            return AttentionMetadata(
                slots=self.slots[tokens],
                query_lens=self.query_lens[seqs],
                context_lens=context_lens,
                block_tables=self.block_tables[seqs],
                block_size=self.block_size,
                max_context_len=int(context_lens.max()),
            )

        return (
            part(slice(0, num_seqs), slice(0, num_tokens)),
            part(slice(num_seqs, None), slice(num_tokens, None)),
        )


class AttentionBackend(ABC):
    """Writes the new keys/values into the paged cache, then attends.

    Invariant: after `forward`, the cache holds the new tokens' K/V at
    `metadata.slots`; the result attends causally over each sequence's
    context, read through its block table.
    """

    # The native CPU operators store and attend over the paged cache (then a model may run
    # its small steps' decoder layers as one native call, `kernels.llama_small_step`).
    native_cpu: bool = False

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
