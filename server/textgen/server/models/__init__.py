"""Model architectures, chosen by `config.model_type` through a registry."""

from __future__ import annotations

from textgen.server.models.causal_lm import CausalLM
from textgen.server.models.llama import LlamaForCausalLM

_MODELS: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
}


def get_model_class(model_type: str) -> type[CausalLM]:
    if model_type not in _MODELS:
        raise ValueError(f"model_type {model_type!r} is not supported; have {sorted(_MODELS)}")
    return _MODELS[model_type]


__all__ = ["CausalLM", "get_model_class"]
