"""Shared fixtures: the default model converted once per test run, and a tiny model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from textgen.launcher.model import resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINY_CONTEXT_LENGTH = 256


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A textgen cache dir shared by the whole run, so the default converts only once."""
    return tmp_path_factory.mktemp("textgen-cache")


@pytest.fixture(scope="session")
def default_model_dir(model_cache: Path) -> Path:
    return resolve_model(None, cache_dir=model_cache)  # ~25 s: GGUF -> safetensors


def write_tiny_model(out: Path, tokenizer_dir: Path, safetensors: bool = True) -> Path:
    """A random-weight 2-layer Llama with the default model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=TINY_CONTEXT_LENGTH,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    if safetensors:
        model.save_pretrained(out)
    else:
        config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_writer() -> Callable[..., Path]:
    """`write_tiny_model` for tests (conftest is not importable under importlib mode)."""
    return write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_model_dir)
