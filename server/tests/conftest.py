"""Shared fixtures: the native operators' ISA levels, the real default model and tiny
random-weight Llamas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from textgen.server import kernels
from textgen.server.platform import Platform

CPU = torch.device("cpu")


@pytest.fixture(scope="session", autouse=True)
def start_up_platform() -> Platform:
    """The platform as a shard's start-up decides it: TEXTGEN_CPU_ISA, when set, selects
    the level every test below runs on unless it asks for another (`isa`)."""
    return Platform.detect(CPU)


@pytest.fixture(params=kernels.isa_levels() or ["unbuilt"])
def isa(request) -> str:
    """Each ISA level of the native operators this CPU runs, selected for one test.

    On an AVX-512 machine a kernel test runs on the baseline, AVX2 and both AVX-512
    builds; on an AVX2 machine on the first two.
    """
    assert kernels.available(), "the native operators must be built (make install builds them)"
    previous = kernels.selected_isa()
    kernels.select_isa(request.param)
    yield request.param
    kernels.select_isa(previous)


def _int8_levels() -> list[str]:
    """The levels that have an int8 product of their own."""
    if not kernels.available():
        return []
    previous, levels = kernels.selected_isa(), []
    for level in kernels.isa_levels():
        kernels.select_isa(level)
        if kernels.int8_isa() == level:
            levels.append(level)
    kernels.select_isa(previous)
    return levels


INT8_LEVELS = _int8_levels()


@pytest.fixture(params=INT8_LEVELS or [pytest.param("none", marks=pytest.mark.skip("no int8"))])
def int8_isa(request) -> str:
    """Each ISA level with an int8 product of its own, selected for one test."""
    previous = kernels.selected_isa()
    kernels.select_isa(request.param)
    yield request.param
    kernels.select_isa(previous)


def cpu_platform(dtype: torch.dtype, int8_activations: bool = False) -> Platform:
    """The CPU platform of a shard of `dtype` here, at the ISA level selected now."""
    isa = kernels.selected_isa() if kernels.available() else "none"
    return Platform.detect(CPU, str(dtype).removeprefix("torch."), isa, int8_activations)


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
