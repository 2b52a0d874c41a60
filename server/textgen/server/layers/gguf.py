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
"""

from __future__ import annotations

import torch

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
