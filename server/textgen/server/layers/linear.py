"""Column- and row-parallel linear layers (Megatron style).

A column-parallel layer holds a slice of the output features and needs no
communication; a row-parallel layer holds a slice of the input features, so
its partial products are summed over the group. A column layer followed by a
row layer (q/k/v -> o, gate/up -> down) costs one all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from textgen.server.distributed import ParallelGroup
from textgen.server.weights import Weights


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output features (rows of W)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out_local, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def load(cls, weights: Weights, prefixes: list[str], bias: bool) -> ColumnParallelLinear:
        """Load one or several HF projections fused along the output features.

        Each projection is sliced on its own before concatenation, so every
        rank holds [q_local; k_local; v_local] and can split its output locally.
        """
        weight = torch.cat([weights.get_sharded(f"{p}.weight", dim=0) for p in prefixes])
        biases = [weights.get_sharded(f"{p}.bias", dim=0) for p in prefixes] if bias else None
        return cls(weight, None if biases is None else torch.cat(biases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)  # [T, out_local]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input features; partial sums are all-reduced."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, group: ParallelGroup
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in_local]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    @classmethod
    def load(cls, weights: Weights, prefix: str, bias: bool) -> RowParallelLinear:
        weight = weights.get_sharded(f"{prefix}.weight", dim=1)
        # NOTE: the bias is replicated and added after the reduction, exactly once.
        bias_tensor = weights.get(f"{prefix}.bias") if bias else None
        return cls(weight, bias_tensor, weights.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(nn.functional.linear(x, self.weight))  # [T, out]
        return out if self.bias is None else out + self.bias
