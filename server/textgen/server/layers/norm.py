"""RMSNorm, computed in float32 like the reference implementation.

With the native operators (the platform says) it is one call (`kernels.rms_norm`) that
rounds where the torch path rounds, instead of eight torch ops (five passes over a
prefill's rows); `add_and_norm` takes a decoder layer's residual add into the same pass.
"""

from __future__ import annotations

import torch
from torch import nn

from textgen.server import kernels
from textgen.server.weights import Weights


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, native: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps
        self.native = native  # the native operator serves this norm's rows

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float) -> RMSNorm:
        return cls(weights.get(f"{prefix}.weight"), eps, weights.platform.native_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and _rows(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        return self._torch(x)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a residual connection and the next norm.

        Natively one pass, rounding the sum as torch's add does.
        """
        if self.native and _rows(x) and _rows(residual):
            return kernels.add_rms_norm(x, residual.contiguous(), self.weight, self.eps)
        added = x + residual
        return self._torch(added), added

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the variance is taken in float32 even for half-precision
        # activations, then cast back before the weight, as transformers does.
        x32 = x.float()  # [T, hidden]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rows(x: torch.Tensor) -> bool:
    """[T, hidden] with contiguous rows: what the native operator takes."""
    return x.dim() == 2 and x.stride(1) == 1
