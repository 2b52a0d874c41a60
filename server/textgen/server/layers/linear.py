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
from textgen.server.layers import gguf
from textgen.server.layers.packed import pack, packed_linear
from textgen.server.weights import GGUFBlocks, Weights

Range = tuple[int, int]  # [start, stop) of a rank's features


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output features (rows of W)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        blocks: GGUFBlocks | None = None,
        pack_bf16: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out_local, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed = pack(weight, pack_bf16)  # oneDNN layout for bf16 on CPU, else None
        self.blocks = blocks  # the same weight as GGUF blocks, for small batches
        self.int8: gguf.Int8Weight | None = None  # set by gguf.use_int8_activations

    @classmethod
    def load(
        cls,
        weights: Weights,
        prefixes: list[str],
        bias: bool,
        rows: list[Range] | None = None,
    ) -> ColumnParallelLinear:
        """Load one or several HF projections fused along the output features.

        Each projection is sliced on its own before concatenation, so every
        rank holds [q_local; k_local; v_local] and can split its output locally.
        `rows` gives each projection's output range on this rank (uneven
        splits); by default each one splits evenly.
        """
        ranges: list[Range | None] = list(rows) if rows is not None else [None] * len(prefixes)

        def fused(suffix: str) -> torch.Tensor:
            parts = zip(prefixes, ranges, strict=True)
            return torch.cat([_rows(weights, f"{p}.{suffix}", r) for p, r in parts])

        blocks = [
            weights.blocks(name, rows=r or weights.shard_range(name, 0))
            for name, r in zip([f"{p}.weight" for p in prefixes], ranges, strict=True)
        ]
        packs = weights.platform.packed_bf16_linear
        return cls(
            fused("weight"), fused("bias") if bias else None, gguf.concat_rows(blocks), packs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gguf.applies(x, self.blocks):
            out = gguf.gguf_linear(x, self.blocks, self.int8)  # [T, out_local]
            return out if self.bias is None else out + self.bias
        if gguf.applies_int8(x, self.int8):
            out = gguf.int8_linear(x, self.int8)  # [T, out_local]
            return out if self.bias is None else out + self.bias
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)  # [T, out_local]
        return nn.functional.linear(x, self.weight, self.bias)  # [T, out_local]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input features; partial sums are all-reduced."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: ParallelGroup,
        blocks: GGUFBlocks | None = None,
        pack_bf16: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in_local]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group
        self.packed = pack(weight, pack_bf16)  # oneDNN layout for bf16 on CPU, else None
        self.blocks = blocks  # the same weight as GGUF blocks, for small batches
        self.int8: gguf.Int8Weight | None = None  # set by gguf.use_int8_activations

    @classmethod
    def load(
        cls, weights: Weights, prefix: str, bias: bool, columns: Range | None = None
    ) -> RowParallelLinear:
        """`columns`: this rank's input range (uneven splits); by default an even split."""
        name = f"{prefix}.weight"
        columns = columns or weights.shard_range(name, 1)
        weight = weights.get_range(name, 1, *columns)
        # NOTE: the bias is replicated and added after the reduction, exactly once.
        bias_tensor = weights.get(f"{prefix}.bias") if bias else None
        blocks = weights.blocks(name, columns=columns)
        return cls(weight, bias_tensor, weights.group, blocks, weights.platform.packed_bf16_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gguf.applies(x, self.blocks):
            partial = gguf.gguf_linear(x, self.blocks, self.int8)  # [T, out]
        elif gguf.applies_int8(x, self.int8):
            partial = gguf.int8_linear(x, self.int8)  # [T, out]
        elif self.packed is not None:
            partial = packed_linear(x, self.packed, None)  # [T, out]
        else:
            partial = nn.functional.linear(x, self.weight)
        out = self.group.all_reduce(partial)  # [T, out]
        return out if self.bias is None else out + self.bias


def _rows(weights: Weights, name: str, rows: Range | None) -> torch.Tensor:
    if rows is None:
        return weights.get_sharded(name, dim=0)
    return weights.get_range(name, 0, *rows)
