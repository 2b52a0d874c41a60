"""The paged KV cache of one shard.

    key_caches[layer]   [num_blocks, block_size, num_kv_heads, head_dim]
    value_caches[layer] [num_blocks, block_size, num_kv_heads, head_dim]

    slot s = block_id * block_size + offset  ->  flat view [num_slots, H, D]

The router owns the block ids (block 0 is its health-probe block, an ordinary
block here); the shard only writes and reads the slots it is told to. Heads
are this shard's local KV heads, so the budget is per shard.

An int8 cache (`--kv-cache-dtype int8`) keeps each token's row of head_dim values
as int8 with one float32 scale (`quantize_int8`), beside the blocks:

    key_scales[layer]   [num_blocks, num_kv_heads, block_size] float32
    value_scales[layer] [num_blocks, num_kv_heads, block_size] float32

a block's scales of one head side by side, as the decode kernel reads them. Readers
see the dequantized values, int8 * scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen.server import kernels


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one block, from which the budget turns into a block count."""

    num_layers: int
    num_kv_heads: int  # local to this shard
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the model's dtype, or torch.int8 with one float32 scale per row

    @property
    def bytes_per_block(self) -> int:
        """Key and value, every layer (an int8 cache's scales included)."""
        row = self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        if self.dtype == torch.int8:
            row += 4  # the row's float32 scale
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * row

    def num_blocks_for(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block


class KVCache:
    def __init__(
        self, spec: KVCacheSpec, num_blocks: int, device: torch.device, native: bool = False
    ) -> None:
        """`native`: rows are stored by the native operators."""
        self.spec = spec
        self.num_blocks = num_blocks
        self.native = native
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        # NOTE: zeros, not empty: padded gathers read unwritten slots, and a
        # masked-out NaN would still poison the attention output (0 * NaN).
        layers = range(spec.num_layers)
        self.key_caches = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in layers]
        self.value_caches = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in layers]
        self.key_scales: list[torch.Tensor | None] = [None] * spec.num_layers
        self.value_scales: list[torch.Tensor | None] = [None] * spec.num_layers
        if spec.dtype == torch.int8:
            scales = (num_blocks, spec.num_kv_heads, spec.block_size)
            self.key_scales = [torch.zeros(scales, device=device) for _ in layers]
            self.value_scales = [torch.zeros(scales, device=device) for _ in layers]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.spec.block_size

    def layer(self, index: int) -> LayerCache:
        return LayerCache(
            self.key_caches[index],
            self.value_caches[index],
            self.key_scales[index],
            self.value_scales[index],
            self.native,
        )


@dataclass(frozen=True)
class LayerCache:
    """One layer's key and value blocks, as the attention backend sees them."""

    key: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    # An int8 cache's scales, [num_blocks, Hkv, block_size] float32; None otherwise.
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    native: bool = False  # rows are stored (an int8 cache's quantized) by native operators

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    @property
    def block_size(self) -> int:
        return self.key.shape[1]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views indexed by slot: [num_slots, Hkv, D] (int8 for an int8 cache)."""
        num_slots = self.key.shape[0] * self.key.shape[1]
        return (
            self.key.view(num_slots, *self.key.shape[2:]),
            self.value.view(num_slots, *self.value.shape[2:]),
        )

    def store(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes new tokens' keys and values [T, Hkv, D] at their slots [T]."""
        key, value = self.flat()
        native = self.native and _native_rows(k) and _native_rows(v)
        if not self.quantized:
            if native and k.dtype == v.dtype == self.key.dtype:
                kernels.kv_store(k, v, slots.contiguous(), self.key, self.value)
            else:
                key.index_copy_(0, slots, k)
                value.index_copy_(0, slots, v)
            return
        if native:
            kernels.kv_store_int8(
                k, v, slots.contiguous(), self.key, self.value, self.key_scale, self.value_scale
            )
            return
        for cache, scales, rows in ((key, self.key_scale, k), (value, self.value_scale, v)):
            quantized, scale = quantize_int8(rows)
            cache.index_copy_(0, slots, quantized)
            scales[slots // self.block_size, :, slots % self.block_size] = scale

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values at `slots` (any shape S): [*S, Hkv, D] each.

        An int8 cache's rows come dequantized, as `dtype`; others as they are stored.
        """
        key, value = self.flat()
        if not self.quantized:
            return key[slots], value[slots]
        blocks, offsets = slots // self.block_size, slots % self.block_size
        return (
            _dequantize(key[slots], self.key_scale[blocks, :, offsets], dtype),
            _dequantize(value[slots], self.value_scale[blocks, :, offsets], dtype),
        )


def quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [..., D] as int8 [..., D] and one float32 scale each [...]:

        scale = max|x| / 127,   q = round_half_even(x * (127 / max|x|))

    and zeros (scale 0) for a row of zeros. The C store kernel computes the same, bit
    for bit.
    """
    x = rows.float()
    top = x.abs().amax(dim=-1)
    # NOTE: a true division: `127.0 / top` would be 127 * reciprocal(top), a rounding apart.
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    quantized = (x * inv.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return quantized, top / 127


def _dequantize(rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (rows.float() * scale.unsqueeze(-1)).to(dtype)


def _native_rows(rows: torch.Tensor) -> bool:
    """[T, Hkv, D] of float32 or bf16, heads contiguous within a token's row."""
    return rows.dtype in (torch.float32, torch.bfloat16) and rows.stride()[1:] == (rows.shape[2], 1)
