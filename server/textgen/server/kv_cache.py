"""The paged KV cache of one shard.

    key_caches[layer]   [num_blocks, block_size, num_kv_heads, head_dim]
    value_caches[layer] [num_blocks, block_size, num_kv_heads, head_dim]

    slot s = block_id * block_size + offset  ->  flat view [num_slots, H, D]

The router owns the block ids (block 0 is its health-probe block, an ordinary
block here); the shard only writes and reads the slots it is told to. Heads
are this shard's local KV heads, so the budget is per shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one block, from which the budget turns into a block count."""

    num_layers: int
    num_kv_heads: int  # local to this shard
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Key and value, every layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def num_blocks_for(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # NOTE: zeros, not empty: padded gathers read unwritten slots, and a
        # masked-out NaN would still poison the attention output (0 * NaN).
        layers = range(spec.num_layers)
        self.key_caches = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in layers]
        self.value_caches = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in layers]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.spec.block_size

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.key_caches[index], self.value_caches[index])


@dataclass(frozen=True)
class LayerCache:
    """One layer's key and value blocks, as the attention backend sees them."""

    key: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value: torch.Tensor  # [num_blocks, block_size, Hkv, D]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views indexed by slot: [num_slots, Hkv, D]."""
        num_slots = self.key.shape[0] * self.key.shape[1]
        return (
            self.key.view(num_slots, *self.key.shape[2:]),
            self.value.view(num_slots, *self.value.shape[2:]),
        )
