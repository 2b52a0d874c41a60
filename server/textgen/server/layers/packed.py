"""bf16 matrix products on CPU through oneDNN with weights reordered once at load.

`F.linear` on bf16 CPU tensors re-lays the weight out for oneDNN on every call; for the
small matrices of a decode step that costs more than the product itself (measured on the
default model, one thread: 33 ms of matmuls per decode step at batch 1, 20 ms packed;
51 -> 30 ms at batch 16). The packed weight is an opaque oneDNN tensor; results are
bit-identical to `F.linear`. Only bf16 on CPUs with native bf16 is packed: float32 keeps
the plain path the greedy correctness tests compare against transformers.
"""

from __future__ import annotations

import os

import torch

# NOTE: the batch-size hint only tunes the layout; any batch size works with it.
_BATCH_HINT = 64


def packing_enabled(weight: torch.Tensor) -> bool:
    """True when `weight` can be packed here; TEXTGEN_PACKED_LINEAR=0 turns it off."""
    return (
        os.environ.get("TEXTGEN_PACKED_LINEAR", "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN layout of `weight` [out, in], or None when packing does not apply."""
    if not packing_enabled(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T + b with W packed by `pack`: [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
