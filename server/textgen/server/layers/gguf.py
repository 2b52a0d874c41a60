"""Matrix products that read a GGUF model's quantized blocks directly (small batches, CPU).

A model converted from GGUF keeps its Q4_0/Q4_1/Q8_0 blocks beside the dequantized
weights (see `Weights.blocks`); a bf16 shard on CPU loads them. At a handful of tokens
per step a linear layer is bound by the bytes it reads, and the blocks are 2 to 3.5
times smaller than bf16 weights, so the native kernel (kernels/gguf_linear.c) is the
faster path there; above `MAX_TOKENS` tokens, oneDNN's bf16 product on the dequantized
weights is faster and is used instead.

The blocks dequantize to exactly the model's float32 weights and the kernel sums in
float32, so this path is closer to the float32 model than bf16 weights are. It serves
bf16 activations only: float32 keeps the plain product the greedy tests compare with.
TEXTGEN_NATIVE_KERNELS=0 turns it off with the other native kernels.

Above `MAX_TOKENS`, a shard started with `--int8-activations` multiplies in integers
instead (kernels/int8_linear.c): each token's features are rounded to int8 per block of
32, as llama.cpp does for GGUF models, and dotted with the weight blocks by the CPU's
VNNI instructions, at 1.1 to 1.45 times the rate of the bf16 product
(benchmark/scripts/int8_linear.py). The weights stay exact; the activations' rounding
moves the logits further from float32 than bf16 does (README, "int8 activations").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from textgen.server import kernels
from textgen.server.weights import GGML_TYPES, GGUFBlocks

# Up to this many tokens the kernel beats oneDNN's bf16 product (default model, 2 threads,
# all linears of a step: 6.9 vs 15.3 ms at 1 token, 11.7 vs 13.9 ms at 4, 24 vs 16 ms at 8).
MAX_TOKENS = 4
_KIND_BF16 = 1


def concat_rows(parts: list[GGUFBlocks | None]) -> GGUFBlocks | None:
    """Several projections fused along the output features; None unless all share a type."""
    if not parts or any(p is None for p in parts) or len({p.kind for p in parts}) != 1:
        return None
    return GGUFBlocks(torch.cat([p.data for p in parts]).contiguous(), parts[0].kind)


def applies(x: torch.Tensor, blocks: GGUFBlocks | None) -> bool:
    """True when `x` [T, in] should go through `gguf_linear` rather than the dense product."""
    return blocks is not None and x.shape[0] <= MAX_TOKENS and x.dtype == torch.bfloat16


def gguf_linear(x: torch.Tensor, blocks: GGUFBlocks) -> torch.Tensor:
    """x [T, in] bf16 @ W^T with W given as blocks: [T, out] bf16."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_tokens, out_features = x.shape[0], blocks.data.shape[0]
    y = torch.empty(num_tokens, out_features, dtype=x.dtype)
    status = kernels.gguf_linear().textgen_gguf_linear(
        x.data_ptr(),
        x.stride(0),
        blocks.data.data_ptr(),
        GGML_TYPES[blocks.kind][0],
        y.data_ptr(),
        y.stride(0),
        num_tokens,
        out_features,
        blocks.in_features,
        _KIND_BF16,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"gguf_linear failed on {blocks.kind} blocks for input {tuple(x.shape)}")
    return y


@dataclass(frozen=True)
class Int8Weight:
    """GGUF blocks re-laid for `int8_linear`: u8 values [N/16, K/32, 8, 16, 4], and each
    block's scale and offset [N/16, K/32, 16] float32 (kernels/int8_linear.c)."""

    values: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    out_features: int
    in_features: int


def pack_int8(blocks: GGUFBlocks | None) -> Int8Weight | None:
    """`blocks` in the int8 kernel's layout; None where the kernel or the shape does not fit."""
    library = kernels.int8_linear()
    if blocks is None or library is None:
        return None
    n, k = blocks.data.shape[0], blocks.in_features
    data = blocks.data.contiguous()
    values = torch.empty(n * k, dtype=torch.uint8)
    scales = torch.empty(n * k // 32, dtype=torch.float32)
    offsets = torch.empty(n * k // 32, dtype=torch.float32)
    status = library.textgen_int8_pack(
        data.data_ptr(),
        GGML_TYPES[blocks.kind][0],
        n,
        k,
        values.data_ptr(),
        scales.data_ptr(),
        offsets.data_ptr(),
    )
    if status != 0:  # out features not a multiple of 16
        return None
    return Int8Weight(values, scales, offsets, n, k)


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
    return weight is not None and x.shape[0] > MAX_TOKENS and x.dtype == torch.bfloat16


_scratch = threading.local()  # each forward thread's quantized-activation buffer


def int8_linear(x: torch.Tensor, weight: Int8Weight, gated: bool = False) -> torch.Tensor:
    """x [T, in] bf16 @ W^T, x rounded to int8 per 32 features: [T, out] bf16.

    `gated`: W is a fused gate/up projection (gate rows, then up rows) and the result is
    [T, out / 2], bf16(silu(gate)) * up, equal to the SiLU pass over the plain product.
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    num_tokens = x.shape[0]
    # int8 rows, then two floats per 32 features; 8 more rows pad the kernel's last tile
    needed = (num_tokens + 8) * (weight.in_features + weight.in_features // 32 * 8)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < needed:
        # NOTE: kept and reused: a fresh buffer of megabytes per call costs page faults.
        buffer = _scratch.buffer = torch.empty(needed, dtype=torch.uint8)
    out_features = weight.out_features // 2 if gated else weight.out_features
    y = torch.empty(num_tokens, out_features, dtype=x.dtype)
    status = kernels.int8_linear().textgen_int8_linear(
        x.data_ptr(),
        x.stride(0),
        weight.values.data_ptr(),
        weight.scales.data_ptr(),
        weight.offsets.data_ptr(),
        y.data_ptr(),
        y.stride(0),
        num_tokens,
        weight.out_features,
        weight.in_features,
        int(gated),
        buffer.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"int8_linear failed for input {tuple(x.shape)}")
    return y
