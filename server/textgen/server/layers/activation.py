"""The gated MLP's activation: act(gate) * up on a fused gate/up projection's output.

For SiLU with the native operators it is one pass (`kernels.silu_and_mul`) that rounds
where torch rounds `silu(gate) * up`, instead of three passes over a prefill's
activations.
Where the gate/up projection runs through the int8 kernel (--int8-activations), that
kernel applies the same arithmetic to its own output tiles (`project`), and the
[T, 2I] product never goes to memory.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from textgen.server import kernels
from textgen.server.layers import gguf
from textgen.server.layers.linear import ColumnParallelLinear


class GatedActivation(nn.Module):
    def __init__(self, hidden_act: str, native: bool = False) -> None:
        super().__init__()
        self.act = ACT2FN[hidden_act]
        self.native = native and hidden_act == "silu"  # the native operator's arithmetic

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I] (gate, then up) -> [T, I]."""
        if self.native and gate_up.stride(1) == 1:
            return kernels.silu_and_mul(gate_up)
        gate, up = gate_up.split(gate_up.shape[1] // 2, dim=-1)
        return self.act(gate) * up

    def project(self, x: torch.Tensor, gate_up_proj: ColumnParallelLinear) -> torch.Tensor:
        """x [T, in] -> this activation of `gate_up_proj(x)`, [T, I]."""
        weight, blocks = gate_up_proj.int8, gate_up_proj.blocks
        if not self.native or gate_up_proj.bias is not None:  # SiLU, the kernels' arithmetic
            return self(gate_up_proj(x))
        if gguf.applies(x, blocks):  # a small step: the same bits, one call
            return gguf.gguf_linear(x, blocks, weight, gated=True)
        if gguf.applies_int8(x, weight) and weight.out_features % 32 == 0:
            # whole 16-feature tiles in each half: the same bits, the [T, 2I] product unwritten
            return gguf.int8_linear(x, weight, gated=True)
        return self(gate_up_proj(x))
