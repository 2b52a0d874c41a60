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
    def __init__(self, weight: torch.Tensor, group: ParallelGroup, name: str = "") -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V_local, hidden]
        self.group = group
        self.vocab_start = group.rank * weight.shape[0]
        self.name = name  # the checkpoint tensor, for a head tied to it

    @classmethod
    def load(cls, weights: Weights, prefix: str) -> VocabParallelEmbedding:
        name = f"{prefix}.weight"
        return cls(weights.get_sharded(name, dim=0), weights.group, name)

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
        self,
        weight: torch.Tensor,
        group: ParallelGroup,
        blocks: GGUFBlocks | None = None,
        pack_bf16: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V_local, hidden]
        self.group = group
        self.packed = pack(weight, pack_bf16)  # oneDNN layout for bf16 on CPU, else None
        self.blocks = blocks  # the same weight as GGUF blocks, for small batches
        self.int8: gguf.Int8Weight | None = None  # set by gguf.use_int8_activations

    @classmethod
    def load(
        cls, weights: Weights, prefix: str, embedding: VocabParallelEmbedding, tied: bool
    ) -> ParallelLMHead:
        """Share the embedding's slice when the checkpoint ties the two."""
        name = f"{prefix}.weight"
        packs = weights.platform.packed_bf16_linear
        if tied or not weights.has(name):
            blocks = _row_blocks(weights, embedding.name)
            return cls(embedding.weight.data, weights.group, blocks, packs)
        weight = weights.get_sharded(name, dim=0)
        return cls(weight, weights.group, _row_blocks(weights, name), packs)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if gguf.applies(hidden, self.blocks):
            logits = gguf.gguf_linear(hidden, self.blocks, self.int8)  # [N, V_local]
        elif gguf.applies_int8(hidden, self.int8):
            logits = gguf.int8_linear(hidden, self.int8)  # [N, V_local]
        elif self.packed is not None:
            logits = packed_linear(hidden, self.packed, None)  # [N, V_local]
        else:
            logits = nn.functional.linear(hidden, self.weight)  # [N, V_local]
        return self.group.all_gather(logits, dim=-1)  # [N, V]


def _row_blocks(weights: Weights, name: str) -> GGUFBlocks | None:
    """This rank's vocabulary rows of `name` as GGUF blocks, if the checkpoint keeps them."""
    return weights.blocks(name, rows=weights.shard_range(name, 0)) if name else None
