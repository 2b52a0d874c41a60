"""bf16 matrix products on CPU through oneDNN with weights reordered once at load.

`F.linear` on bf16 CPU tensors re-lays the weight out for oneDNN on every call; for the
small matrices of a decode step that costs more than the product itself (measured on the
default model, one thread: 33 ms of matmuls per decode step at batch 1, 20 ms packed;
51 -> 30 ms at batch 16). The packed weight is an opaque oneDNN tensor; results are
bit-identical to `F.linear`. Only bf16 on CPUs with native bf16 is packed (the platform's
`packed_bf16_linear`): float32 keeps the plain path the greedy correctness tests compare
against transformers.
"""

from __future__ import annotations

import torch

# NOTE: the batch-size hint only tunes the layout; any batch size works with it.
_BATCH_HINT = 64


def pack(weight: torch.Tensor, enabled: bool) -> torch.Tensor | None:
    """The oneDNN layout of `weight` [out, in] where `enabled`, else None."""
    if not enabled or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T + b with W packed by `pack`: [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
