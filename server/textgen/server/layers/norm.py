"""RMSNorm, computed in float32 like the reference implementation.

In bf16 on CPU it is one native call (kernels/token_ops.c) that rounds where the
torch path rounds, instead of eight torch ops (five passes over a prefill's rows);
`add_and_norm` takes a decoder layer's residual add into the same pass.
"""

from __future__ import annotations

import torch
from torch import nn

from textgen.server import kernels
from textgen.server.weights import Weights


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps
        native = weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
        self.native = kernels.token_ops() if native else None

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float) -> RMSNorm:
        return cls(weights.get(f"{prefix}.weight"), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and _native_applies(x):
            return self._native(x, None)[0]
        return self._torch(x)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual connection and the next norm.

        Natively one pass, rounding the sum to bf16 as torch's add does.
        """
        if self.native is not None and _native_applies(x) and _native_applies(residual):
            return self._native(x, residual.contiguous())
        added = x + residual
        return self._torch(added), added

    def _native(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = torch.empty(x.shape, dtype=x.dtype)
        added = torch.empty(x.shape, dtype=x.dtype) if residual is not None else None
        tokens, hidden = x.shape
        self.native.textgen_rms_norm(
            x.data_ptr(), x.stride(0),
            None if residual is None else residual.data_ptr(),
            None if added is None else added.data_ptr(),
            self.weight.data_ptr(), out.data_ptr(), tokens, hidden, self.eps,
            torch.get_num_threads(),
        )  # fmt: skip
        return out, added

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the variance is taken in float32 even for half-precision
        # activations, then cast back before the weight, as transformers does.
        x32 = x.float()  # [T, hidden]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _native_applies(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
