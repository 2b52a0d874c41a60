"""Vocabulary-parallel token embedding and LM head.

Each rank holds a contiguous range of vocabulary rows. The embedding looks up
the ids in its range, zeroes the others and all-reduces; the head computes the
logits of its range and all-gathers them into the full vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from textgen.server.distributed import ParallelGroup
from textgen.server.layers import gguf
from textgen.server.layers.packed import pack, packed_linear
from textgen.server.weights import GGUFBlocks, Weights


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, weight: torch.Tensor, group: ParallelGroup, blocks: GGUFBlocks | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V_local, hidden]
        self.group = group
        self.vocab_start = group.rank * weight.shape[0]
        # NOTE: lookups use `weight`; the GGUF blocks are kept for a head tied to it.
        self.blocks = blocks

    @classmethod
    def load(cls, weights: Weights, prefix: str) -> VocabParallelEmbedding:
        name = f"{prefix}.weight"
        rows = weights.shard_range(name, 0)
        blocks = weights.blocks(name, rows=rows)
        return cls(weights.get_range(name, 0, *rows), weights.group, blocks)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return nn.functional.embedding(input_ids, self.weight)  # [T, hidden]
        local_ids = input_ids - self.vocab_start  # [T]
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        hidden = nn.functional.embedding(local_ids.masked_fill(outside, 0), self.weight)
        hidden = hidden.masked_fill(outside.unsqueeze(-1), 0.0)  # [T, hidden]
        return self.group.all_reduce(hidden)


class ParallelLMHead(nn.Module):
    def __init__(
        self, weight: torch.Tensor, group: ParallelGroup, blocks: GGUFBlocks | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V_local, hidden]
        self.group = group
        self.packed = pack(weight)  # oneDNN layout for bf16 on CPU, else None
        self.blocks = blocks  # the same weight as GGUF blocks, for small batches

    @classmethod
    def load(
        cls, weights: Weights, prefix: str, embedding: VocabParallelEmbedding, tied: bool
    ) -> ParallelLMHead:
        """Share the embedding's slice when the checkpoint ties the two."""
        if tied or not weights.has(f"{prefix}.weight"):
            return cls(embedding.weight.data, weights.group, embedding.blocks)
        name = f"{prefix}.weight"
        rows = weights.shard_range(name, 0)
        blocks = weights.blocks(name, rows=rows)
        return cls(weights.get_range(name, 0, *rows), weights.group, blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if gguf.applies(hidden, self.blocks):
            logits = gguf.gguf_linear(hidden, self.blocks)  # [N, V_local]
        elif self.packed is not None:
            logits = packed_linear(hidden, self.packed, None)  # [N, V_local]
        else:
            logits = nn.functional.linear(hidden, self.weight)  # [N, V_local]
        return self.group.all_gather(logits, dim=-1)  # [N, V]
