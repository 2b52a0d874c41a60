"""Runs one forward of packed sequences over the paged KV cache.

The runner turns per-sequence inputs (new tokens, their positions and
slots, the block table) into packed tensors and attention metadata, calls
the model, and hands back each sequence's logits. It knows nothing of
requests, sampling or the protocol.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from textgen.server.attention import AttentionMetadata, get_attention_backend
from textgen.server.distributed import ParallelGroup
from textgen.server.kv_cache import KVCache, KVCacheSpec
from textgen.server.layers import gguf
from textgen.server.models import CausalLM, get_model_class
from textgen.server.platform import Platform
from textgen.server.weights import Weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceInput:
    """One sequence's share of a forward."""

    token_ids: list[int]  # the new tokens, computed at positions start_pos...
    start_pos: int  # tokens already in the cache before this forward
    slots: list[int]  # cache slot of each new token
    block_table: list[int]
    all_logits: bool = False  # logits of every new token, not just the last

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        config: PretrainedConfig,
        block_size: int,
        platform: Platform,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.platform = platform
        self.device = platform.device
        self.kv_cache_dtype = kv_cache_dtype  # "auto" (the model's dtype) or "int8"
        self.kv_cache: KVCache | None = None

    @classmethod
    def load(
        cls,
        model_dir: Path,
        platform: Platform,
        block_size: int,
        group: ParallelGroup,
        attention_backend: str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> ModelRunner:
        """The model of `model_dir` on `platform` (its int8 activations included)."""
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        weights = Weights(model_dir, platform, group)
        attention = get_attention_backend(attention_backend, platform)
        model = get_model_class(config.model_type).load(config, weights, attention)
        if platform.int8_activations:
            count = gguf.use_int8_activations(model)
            logger.info("int8 activations: %d layers multiply GGUF blocks in int8", count)
        model.prepare()
        return cls(model, config, block_size, platform, kv_cache_dtype)

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        spec = self.model.kv_cache_spec(self.block_size)
        if self.kv_cache_dtype == "int8":
            return dataclasses.replace(spec, dtype=torch.int8)
        return spec

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = None  # free the old cache before the new one is allocated
        self.kv_cache = KVCache(
            self.kv_cache_spec, num_blocks, self.device, native=self.platform.native_ops
        )

    @torch.inference_mode()
    def forward(self, sequences: list[SequenceInput]) -> list[torch.Tensor]:
        """Each sequence's logits [n, V] float32: n = 1 (last token) or its new-token count."""
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not allocated: call Warmup first")
        input_ids = self._tensor([t for s in sequences for t in s.token_ids])  # [T]
        positions = self._tensor(
            [p for s in sequences for p in range(s.start_pos, s.context_len)]
        )  # [T]
        logits_indices, num_logits = self._logits_indices(sequences)  # [N]
        metadata = self._metadata(sequences)
        logits = self.model(input_ids, positions, self.kv_cache, metadata, logits_indices)
        return list(logits.split(num_logits))

    def _metadata(self, sequences: list[SequenceInput]) -> AttentionMetadata:
        max_blocks = max(len(s.block_table) for s in sequences)
        padded = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in sequences]
        return AttentionMetadata(
            slots=self._tensor([slot for s in sequences for slot in s.slots]),
            query_lens=[len(s.token_ids) for s in sequences],
            context_lens=self._tensor([s.context_len for s in sequences]),
            block_tables=self._tensor(padded),  # [B, max_blocks]
            block_size=self.block_size,
            max_context_len=max(s.context_len for s in sequences),
        )

    def _logits_indices(self, sequences: list[SequenceInput]) -> tuple[torch.Tensor, list[int]]:
        indices: list[int] = []
        num_logits: list[int] = []
        end = 0
        for s in sequences:
            start, end = end, end + len(s.token_ids)
            rows = range(start, end) if s.all_logits else [end - 1]
            indices.extend(rows)
            num_logits.append(len(rows))
        return self._tensor(indices), num_logits

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
