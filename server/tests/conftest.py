"""Shared fixtures: the real default model and tiny random-weight Llamas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors dir, resolved like the launcher does."""
    from textgen.launcher.model import resolve_model

    return resolve_model(None)


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        initializer_range=0.2,  # large weights: logits far from zero test more
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_llama(path: Path, **overrides) -> LlamaForCausalLM:
    """Save a random tiny Llama to `path` and return transformers' model of it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def make_tiny_llama(tmp_path_factory):
    """Factory: config overrides -> (checkpoint dir, transformers model)."""

    def make(**overrides) -> tuple[Path, LlamaForCausalLM]:
        path = tmp_path_factory.mktemp("tiny-llama")
        return path, save_tiny_llama(path, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_llama(make_tiny_llama) -> tuple[Path, LlamaForCausalLM]:
    return make_tiny_llama()
