"""Rotary position embedding (RoPE) with a precomputed cos/sin table.

Supported `rope_type`s: "default" and "llama3" (Llama 3.1 frequency scaling).
With the native operators, q and k are rotated in place with one call
(`kernels.rotary_`) on float32 tables, instead of a dozen torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from textgen.server import kernels


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float
    max_position: int
    rope_type: str = "default"
    # llama3 scaling only.
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported")

    @classmethod
    def from_hf(cls, config, head_dim: int) -> RopeConfig:
        """Read `rope_parameters` (transformers 5) or the older `rope_theta`/`rope_scaling`."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        params = params or dict(getattr(config, "rope_scaling", None) or {})
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        return cls(
            head_dim=head_dim,
            theta=float(theta),
            max_position=config.max_position_embeddings,
            rope_type=rope_type,
            factor=params.get("factor", 1.0),
            low_freq_factor=params.get("low_freq_factor", 1.0),
            high_freq_factor=params.get("high_freq_factor", 4.0),
            original_max_position=params.get("original_max_position_embeddings", 8192),
        )


class RotaryEmbedding(nn.Module):
    def __init__(
        self, config: RopeConfig, dtype: torch.dtype, device: torch.device, native: bool = False
    ) -> None:
        super().__init__()
        inv_freq = _inv_freq(config).to(device)  # [D/2]
        positions = torch.arange(config.max_position, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        # NOTE: computed in float32 and cast once, matching transformers' rounding.
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)
        self.native = native
        self.cos32 = emb.cos() if native else None  # [P, D] float32, for the native call
        self.sin32 = emb.sin() if native else None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their token positions [T].

        NOTE: the native path rotates q and k in place and returns them.
        """
        if self.native and _native_layout(q, k, positions):
            kernels.rotary_(q, k, positions, self.cos32, self.sin32)
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _native_layout(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> bool:
    """Heads that are contiguous rows of D (views of one fused qkv are)."""
    d = q.shape[2]
    return (
        q.dtype == k.dtype
        and q.stride()[1:] == (d, 1)
        and k.stride()[1:] == (d, 1)
        and positions.dtype == torch.int64
        and positions.is_contiguous()
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _inv_freq(config: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.theta**exponents)  # [D/2]
    return _llama3_scaled(inv_freq, config) if config.rope_type == "llama3" else inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, config: RopeConfig) -> torch.Tensor:
    """Llama 3.1: slow down low frequencies by `factor`, blend the middle band."""
    low_freq_wavelen = config.original_max_position / config.low_freq_factor
    high_freq_wavelen = config.original_max_position / config.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / config.factor, inv_freq)
    smooth = (config.original_max_position / wavelen - config.low_freq_factor) / (
        config.high_freq_factor - config.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / config.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
