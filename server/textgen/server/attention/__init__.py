"""Attention backends behind one interface, picked once at start-up by name."""

from __future__ import annotations

from textgen.server.attention.backend import AttentionBackend, AttentionMetadata
from textgen.server.attention.cpu import CpuAttention
from textgen.server.platform import Platform

_BACKENDS: dict[str, type[AttentionBackend]] = {
    "cpu": CpuAttention,
}


def get_attention_backend(name: str, platform: Platform) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"no attention backend {name!r}; have {sorted(_BACKENDS)}")
    return _BACKENDS[name](platform)


__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
