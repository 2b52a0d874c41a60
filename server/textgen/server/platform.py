"""What a shard computes on, decided once at start-up and passed down.

`Platform.detect` reads the machine (device, the CPU's ISA level among the native
operators' builds, native bf16, an int8 product) and the shard's settings, resolves the
default dtype and whether a GGUF model's products take int8 activations, and returns one
frozen description. The model runner, the layers, the KV
cache, the attention backend and the sampler take their fast paths from it; none of them
asks the machine or the environment again.

The ISA level is the best the CPU runs, unless TEXTGEN_CPU_ISA names another (`none`
switches the native operators off; `avx2` on an AVX-512 machine runs the AVX2 builds, as
ATEN_CPU_CAPABILITY does for torch's own kernels).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from textgen.server import kernels
from textgen.server.config import AUTO_DTYPE, DTYPES

ISA_ENV = "TEXTGEN_CPU_ISA"
AUTO = "auto"
NO_KERNELS = "none"
# Dtypes the native operators take.
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Platform:
    """One shard's device, precision and native operators."""

    device: torch.device
    dtype: torch.dtype  # activations and dense weights
    isa: str | None  # the native operators' ISA level in use; None: not used here
    native_bf16: bool  # bf16 products in hardware (AVX512_BF16 or AMX; any CUDA device)
    int8_isa: str | None = None  # the level the int8 product runs on; None: none here
    int8_activations: bool = False  # GGUF blocks times activations rounded to int8

    @classmethod
    def detect(
        cls,
        device: torch.device,
        dtype: str = AUTO_DTYPE,
        isa: str = AUTO,
        int8_activations: bool | None = None,
    ) -> Platform:
        """This machine as `device` sees it; `dtype` and `isa` "auto" choose the best.

        `int8_activations` None: on where the dtype is left to the platform and it takes
        float32 for want of native bf16. There the dense float32 products are the slow
        part, and a GGUF model's own arithmetic, as llama.cpp runs it on such CPUs, is
        2 to 3 times faster (benchmark/RESULTS.md); with native bf16, or a dtype asked
        for, the products keep that dtype unless int8 is asked for too.

        Selects the ISA level in the operators' library (process-wide, once).
        """
        native_bf16 = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        resolved = default_dtype(device, native_bf16) if dtype == AUTO_DTYPE else DTYPES[dtype]
        if int8_activations is None:
            int8_activations = dtype == AUTO_DTYPE and not native_bf16
        level = _isa_level(device, os.environ.get(ISA_ENV, AUTO) if isa == AUTO else isa)
        if level is None:
            return cls(device, resolved, None, native_bf16)
        kernels.select_isa(level)
        platform = cls(device, resolved, level, native_bf16, kernels.int8_isa())
        if int8_activations and platform.int8_products:
            return dataclasses.replace(platform, int8_activations=True)
        return platform

    @property
    def native_cpu(self) -> bool:
        """The native operators are loaded (the sampler's float32 row statistics)."""
        return self.isa is not None

    @property
    def native_ops(self) -> bool:
        """The native operators (attention, per-token ops, GGUF products) serve this shard."""
        return self.isa is not None and self.dtype in _NATIVE_DTYPES

    @property
    def gguf_blocks(self) -> bool:
        """A GGUF model's blocks are read directly (small steps; larger with int8)."""
        return self.native_ops

    @property
    def int8_products(self) -> bool:
        """Steps above a few tokens can multiply GGUF blocks by int8 activations."""
        return self.native_ops and self.int8_isa is not None

    @property
    def packed_bf16_linear(self) -> bool:
        """bf16 weights are reordered once for oneDNN's bf16 product (layers/packed.py)."""
        return (
            self.device.type == "cpu"
            and self.dtype == torch.bfloat16
            and self.native_bf16
            and torch.backends.mkldnn.is_available()
        )

    def describe(self) -> str:
        """One log line."""
        dtype = str(self.dtype).removeprefix("torch.")
        native = f"native CPU operators {self.isa}" if self.isa else "no native CPU operators"
        int8 = f", int8 products {self.int8_isa}" if self.int8_isa else ""
        int8 += " (int8 activations)" if self.int8_activations else ""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.device.type} {dtype}, {native}{int8}, {bf16}"


def default_dtype(device: torch.device, native_bf16: bool) -> torch.dtype:
    """bf16 where it is computed in hardware (it halves the bytes moved); float32 elsewhere,
    where bf16 products would be emulated several times slower."""
    return torch.bfloat16 if device.type == "cuda" or native_bf16 else torch.float32


def _isa_level(device: torch.device, wanted: str) -> str | None:
    """The operators' level for `wanted` ("auto", "none" or a level name), or None."""
    if device.type != "cpu" or wanted == NO_KERNELS or not kernels.available():
        return None
    levels = kernels.isa_levels()
    if wanted == AUTO:
        return levels[-1]
    if wanted not in levels:
        raise ValueError(f"{ISA_ENV}={wanted}: this CPU runs the kernels of {levels}")
    return wanted
