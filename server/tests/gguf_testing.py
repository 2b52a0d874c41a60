"""GGUF blocks for the kernel tests: quantized with the `gguf` package, and back."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from textgen.server.weights import GGUFBlocks


def make_blocks(weight: torch.Tensor, kind: str) -> GGUFBlocks:
    data = quantize(weight.numpy(), GGMLQuantizationType[kind])  # uint8 [out, bytes]
    return GGUFBlocks(torch.from_numpy(data), kind)


def dequantized(blocks: GGUFBlocks) -> torch.Tensor:
    kind = GGMLQuantizationType[blocks.kind]
    return torch.from_numpy(dequantize(blocks.data.numpy(), kind).copy())  # float32 [out, in]
