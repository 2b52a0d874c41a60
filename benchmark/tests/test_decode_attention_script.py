"""decode_attention.py (the attention figures in RESULTS.md) must still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "decode_attention.py"


@pytest.mark.parametrize("layout", [["--resident"], ["--scattered"]])
def test_decode_attention_script_prints_a_row_per_shape(layout):
    argv = ["--threads", "1", "--batch-size", "2", "--context", "5", "20", "--runs", "1"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, *layout],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["2", "5"], ["2", "20"]]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)  # ms, GB/s
