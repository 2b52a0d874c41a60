"""Tensor-parallel building blocks; each layer loads its own rank's slice."""

from textgen.server.layers.activation import GatedActivation
from textgen.server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from textgen.server.layers.linear import ColumnParallelLinear, RowParallelLinear
from textgen.server.layers.norm import RMSNorm
from textgen.server.layers.rotary import RotaryEmbedding

__all__ = [
    "ColumnParallelLinear",
    "GatedActivation",
    "ParallelLMHead",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
]
