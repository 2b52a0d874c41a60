"""The launcher's watermark flags reach the router, which parses and checks them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from textgen.launcher.commands import TextgenCommands
from textgen.launcher.config import LauncherConfig, TokenLimits, add_arguments
from textgen.router.main import parse_args
from textgen.router.watermark import DEFAULT_WATERMARK_KEY


def router_argv(*launcher_flags: str) -> list[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = LauncherConfig.from_args(parser.parse_args(list(launcher_flags)))
    commands = TextgenCommands(
        config,
        Path("/models/smol"),
        "smol",
        TokenLimits.derive(config, 8192),
        "float32",
        master_port=1234,
    )
    argv = commands.router()
    return argv[argv.index("--model-dir") :]


def test_watermark_flags_pass_through_to_the_router() -> None:
    argv = router_argv(
        "--watermark-gamma", "0.25", "--watermark-delta", "3",
        "--watermark-key", "s3cret", "--watermark-z-threshold", "5",
    )  # fmt: skip
    watermark = parse_args(argv).watermark
    assert (watermark.gamma, watermark.delta, watermark.key, watermark.z_threshold) == (
        0.25, 3.0, "s3cret", 5.0,
    )  # fmt: skip


def test_router_defaults_apply_when_the_launcher_gets_no_watermark_flags() -> None:
    argv = router_argv()
    assert not [a for a in argv if a.startswith("--watermark")]
    watermark = parse_args(argv).watermark
    assert (watermark.gamma, watermark.delta, watermark.key, watermark.z_threshold) == (
        0.5, 2.0, DEFAULT_WATERMARK_KEY, 4.0,
    )  # fmt: skip


def test_router_rejects_a_gamma_outside_0_1() -> None:
    with pytest.raises(SystemExit):
        parse_args(router_argv("--watermark-gamma", "1.0"))
