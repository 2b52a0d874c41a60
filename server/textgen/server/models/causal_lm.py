"""The interface every model architecture implements for the model runner."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from textgen.server.attention import AttentionBackend, AttentionMetadata
from textgen.server.kv_cache import KVCache, KVCacheSpec
from textgen.server.weights import Weights


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over packed tokens and a paged KV cache."""

    @classmethod
    @abstractmethod
    def load(cls, config, weights: Weights, attention: AttentionBackend) -> CausalLM:
        """Build the model from an HF config, reading this rank's weight slices."""

    def prepare(self) -> None:
        """Called once the weights are final (int8 weights packed): set up fast paths that
        read them. Nothing by default."""

    @abstractmethod
    def kv_cache_spec(self, block_size: int) -> KVCacheSpec:
        """The shape of this shard's KV cache blocks."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        logits_indices: torch.Tensor,  # [N] rows of T whose logits are wanted
    ) -> torch.Tensor:  # [N, V] float32
        ...
