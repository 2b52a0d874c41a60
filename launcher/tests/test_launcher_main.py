"""The CLI: model-dependent settings, one-line errors, log formats."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textgen.launcher.config import LauncherConfig
from textgen.launcher.log import JsonFormatter, PlainFormatter
from textgen.launcher.main import prepare


@pytest.mark.slow
def test_prepare_derives_limits_from_the_model(tiny_model_dir: Path) -> None:
    config = LauncherConfig(model_id=str(tiny_model_dir), dtype="bfloat16", port=9001)
    commands = prepare(config)
    assert commands.model_dir == tiny_model_dir
    assert commands.model_name == str(tiny_model_dir)
    argv = commands.router()
    # The tiny model's context is 256 tokens: 255 in, 256 total, 255 + 50 per prefill.
    assert argv[argv.index("--max-input-tokens") + 1] == "255"
    assert argv[argv.index("--max-total-tokens") + 1] == "256"
    assert argv[argv.index("--max-batch-prefill-tokens") + 1] == "305"
    assert commands.shard(0)[commands.shard(0).index("--dtype") + 1] == "bfloat16"


@pytest.mark.slow
def test_prepare_names_the_default_model(default_model_dir: Path, model_cache: Path) -> None:
    commands = prepare(LauncherConfig(cache_dir=model_cache, dtype="float32"))
    assert commands.model_dir == default_model_dir
    assert commands.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert commands.limits.max_total_tokens == 4096  # min(8192, 4096)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-shard", "0"], "error: --num-shard must be >= 1"),
        (["--max-input-tokens", "10", "--max-total-tokens", "10"], "error: --max-input-tokens"),
    ],
)
def test_cli_config_error_is_one_line(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "textgen.launcher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TEXTGEN_CACHE": "/nonexistent"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)


def test_log_formats() -> None:
    record = logging.LogRecord("textgen.launcher", logging.INFO, "", 0, "Shard ready", (), None)
    assert PlainFormatter().format(record).endswith(" INFO textgen_launcher: Shard ready")
    line = json.loads(JsonFormatter().format(record))
    assert line["fields"] == {"message": "Shard ready"}
    assert line["level"] == "INFO" and line["timestamp"].endswith("Z")
