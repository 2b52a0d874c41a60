"""Matrix products that read a GGUF model's quantized blocks directly (small batches, CPU).

A model converted from GGUF keeps its Q4_0/Q4_1/Q8_0 blocks beside the dequantized
weights (see `Weights.blocks`); a CPU shard with the native operators loads them. At a
handful of tokens per step a linear layer is bound by the bytes it reads, and the blocks
are 2 to 3.5 times smaller than bf16 weights (3.5 to 7 times than float32), so the
native operator (`kernels.gguf_linear`) is the faster path there; above `MAX_TOKENS`
tokens, the dense product on the dequantized weights is faster and is used instead.

The blocks dequantize to exactly the model's float32 weights and the kernel sums in
float32, so in float32 this path computes what the dense product computes, in another
order of summation, and in bf16 it is closer to the float32 model than bf16 weights are.

Above `MAX_TOKENS`, a shard started with `--int8-activations` multiplies in integers
instead (kernels/int8_linear.c): each token's features are rounded to int8 per block of
32, as llama.cpp does for GGUF models, and dotted with the weight blocks by the CPU's
VNNI instructions, at 1.1 to 1.45 times the rate of the bf16 product
(benchmark/scripts/int8_linear.py). The weights stay exact; the activations' rounding
moves the logits further from float32 than bf16 does (README, "int8 activations").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from textgen.server import kernels
from textgen.server.weights import GGUFBlocks

# Up to this many tokens the kernel beats oneDNN's bf16 product (default model, 2 threads,
# all linears of a step: 6.9 vs 15.3 ms at 1 token, 11.7 vs 13.9 ms at 4, 24 vs 16 ms at 8).
MAX_TOKENS = 4


def concat_rows(parts: list[GGUFBlocks | None]) -> GGUFBlocks | None:
    """Several projections fused along the output features; None unless all share a type."""
    if not parts or any(p is None for p in parts) or len({p.kind for p in parts}) != 1:
        return None
    return GGUFBlocks(torch.cat([p.data for p in parts]).contiguous(), parts[0].kind)


def applies(x: torch.Tensor, blocks: GGUFBlocks | None) -> bool:
    """True when `x` [T, in] should go through `gguf_linear` rather than the dense product."""
    return blocks is not None and x.shape[0] <= MAX_TOKENS


def gguf_linear(
    x: torch.Tensor, blocks: GGUFBlocks, int8: Int8Weight | None = None, gated: bool = False
) -> torch.Tensor:
    """x [T, in] @ W^T with W given as blocks: [T, out], x's dtype.

    `int8`: the layer's int8 weight when it runs on int8 activations; x is then rounded to
    int8 per 32 features, and its 4-bit weights read as `kernels.gemv_int8` lays them out.
    `gated`: W is a fused gate/up projection; [T, out / 2], silu(gate) * up.
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    if int8 is not None and int8.rows is not None:
        return kernels.gemv_int8(x, int8.rows, int8.in_features, gated)
    return kernels.gguf_linear(x, blocks.data, blocks.kind, int8 is not None, gated)


@dataclass(frozen=True)
class Int8Weight:
    """GGUF blocks re-laid for the int8 products: for `int8_linear` (kernels.int8_pack) u8
    values [N, K] in the kernel's tile order and each block's scale and offset [N, K / 32]
    float32; for small steps of 4-bit blocks, `kernels.gemv_pack`'s rows."""

    values: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    kind: str  # the GGUF type the blocks came from
    rows: torch.Tensor | None = None  # Q4_0 / Q4_1 only

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def in_features(self) -> int:
        return self.values.shape[1]


def pack_int8(blocks: GGUFBlocks | None) -> Int8Weight | None:
    """`blocks` in the int8 kernel's layout; None where the shape does not fit it."""
    if blocks is None or blocks.data.shape[0] % 16:
        return None
    data = blocks.data.contiguous()
    rows = kernels.gemv_pack(data, blocks.kind) if blocks.kind in ("Q4_0", "Q4_1") else None
    return Int8Weight(*kernels.int8_pack(data, blocks.kind), blocks.kind, rows)


def use_int8_activations(model: nn.Module) -> int:
    """Give every layer of `model` that holds GGUF blocks its int8 weights: the count."""
    count = 0
    for module in model.modules():
        if hasattr(module, "int8") and getattr(module, "blocks", None) is not None:
            module.int8 = pack_int8(module.blocks)
            count += module.int8 is not None
    return count


def applies_int8(x: torch.Tensor, weight: Int8Weight | None) -> bool:
    """True when `x` [T, in] should go through `int8_linear` (steps above MAX_TOKENS)."""
    return weight is not None and x.shape[0] > MAX_TOKENS


def int8_linear(x: torch.Tensor, weight: Int8Weight, gated: bool = False) -> torch.Tensor:
    """x [T, in] @ W^T, x rounded to int8 per 32 features: [T, out], x's dtype.

    `gated`: W is a fused gate/up projection (gate rows, then up rows) and the result is
    [T, out / 2], silu(gate) * up, equal to the SiLU pass over the plain product.
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    return kernels.int8_linear(x, weight.values, weight.scales, weight.offsets, weight.kind, gated)
