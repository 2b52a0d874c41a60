"""The int8-activation measurements in RESULTS.md come from two scripts; both must still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from textgen.server import kernels

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.skipif(
    not kernels.available() or kernels.int8_isa() is None, reason="no int8 product on this CPU"
)


def _run(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_int8_linear_script_prints_a_row_per_shape():
    out = _run(str(SCRIPTS / "int8_linear.py"), "--threads", "1", "--tokens", "8", "--runs", "1")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("8 x")]
    assert [row[:5] for row in rows] == [
        ["8", "x", "576", "x", "960"],
        ["8", "x", "576", "x", "576"],
        ["8", "x", "576", "x", "3072"],
        ["8", "x", "1536", "x", "576"],
    ]
    assert all(float(row[5]) > 0 and float(row[6]) > 0 for row in rows)  # int8, bf16 GOP/s


def test_decode_step_script_takes_int8_activations():
    """On the default model, resolved as the launcher resolves it."""
    out = _run(
        str(SCRIPTS / "decode_step.py"), "--threads", "1",
        "--int8-activations", "--prefill-prompts", "2", "--batch-size", "8", "--runs", "1",
    )  # fmt: skip
    assert "(int8 activations)" in out
    assert "prefill 2 x 200" in out and "decode batch 8" in out
