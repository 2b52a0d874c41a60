"""LauncherConfig and TokenLimits: TGI's defaults and the checks on bad settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from textgen.launcher.config import (
    ConfigError,
    LauncherConfig,
    TokenLimits,
    read_context_length,
)
from textgen.launcher.main import build_parser


def parse(*argv: str) -> LauncherConfig:
    return LauncherConfig.from_args(build_parser().parse_args(list(argv)))


def test_cli_defaults_are_the_dataclass_defaults() -> None:
    assert parse() == LauncherConfig()
    config = LauncherConfig()
    assert (config.port, config.hostname, config.num_shard) == (8080, "0.0.0.0", 1)
    assert config.max_concurrent_requests == 128
    assert (config.waiting_served_ratio, config.max_waiting_tokens) == (0.3, 20)
    assert config.max_stop_sequences == 4
    assert config.shard_uds_path == "/tmp/textgen-server"
    assert config.kv_cache_memory_gib == 1.0


def test_flags_use_tgi_names_and_types() -> None:
    config = parse(
        "--model-id", "org/name", "--revision", "v1", "--cache-dir", "/c", "--port", "9000",
        "--max-input-tokens", "100", "--max-total-tokens", "200",
        "--max-batch-prefill-tokens", "300", "--max-batch-total-tokens", "4000",
        "--max-batch-size", "8", "--waiting-served-ratio", "1.5", "--dtype", "bfloat16",
        "--kv-cache-memory-gib", "0.5", "--master-port", "29600", "--json-output",
    )  # fmt: skip
    assert config.model_id == "org/name" and config.cache_dir == Path("/c")
    assert (config.max_input_tokens, config.max_total_tokens) == (100, 200)
    assert config.max_batch_total_tokens == 4000 and config.max_batch_size == 8
    assert config.waiting_served_ratio == 1.5 and config.dtype == "bfloat16"
    assert config.kv_cache_memory_gib == 0.5 and config.json_output


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LauncherConfig().port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_shard": 0}, "--num-shard must be >= 1"),
        ({"master_port": 70000}, "--master-port"),
        ({"port": 0}, "--port"),
        ({"dtype": "int8"}, "--dtype"),
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
        ({"waiting_served_ratio": -0.1}, "--waiting-served-ratio"),
        ({"max_batch_size": 0}, "--max-batch-size must be > 0"),
        ({"kv_cache_memory_gib": 0.0}, "--kv-cache-memory-gib"),
        ({"max_input_tokens": 10, "max_total_tokens": 10}, "must be < --max-total-tokens"),
        ({"max_input_tokens": 10, "max_batch_prefill_tokens": 9}, "must be >= --max-input"),
    ],
)
def test_invalid_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LauncherConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("context_length", "expected"),
    [(8192, (4095, 4096, 4145)), (2048, (2047, 2048, 2097)), (4096, (4095, 4096, 4145))],
)
def test_default_limits_follow_tgi(context_length: int, expected: tuple[int, int, int]) -> None:
    limits = TokenLimits.derive(LauncherConfig(), context_length)
    assert dataclasses.astuple(limits) == expected


def test_given_limits_win() -> None:
    config = LauncherConfig(max_input_tokens=10, max_total_tokens=20, max_batch_prefill_tokens=15)
    assert dataclasses.astuple(TokenLimits.derive(config, 8192)) == (10, 20, 15)
    assert dataclasses.astuple(TokenLimits.derive(LauncherConfig(max_total_tokens=64), 8)) == (
        63, 64, 113,
    )  # fmt: skip


def test_input_limit_beyond_default_total_is_an_error() -> None:
    with pytest.raises(ConfigError, match="max_input_tokens \\(5000\\) must be <"):
        TokenLimits.derive(LauncherConfig(max_input_tokens=5000), 8192)


def test_prefill_below_derived_input_is_an_error() -> None:
    with pytest.raises(ConfigError, match="max_batch_prefill_tokens \\(100\\) must be >="):
        TokenLimits.derive(LauncherConfig(max_batch_prefill_tokens=100), 8192)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 2048}, 2048),
        ({"n_positions": 1024}, 1024),
        ({"model_type": "mystery"}, 4096),
    ],
)
def test_read_context_length(tmp_path: Path, config: dict[str, object], expected: int) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_context_length(tmp_path) == expected
