"""accuracy.py (the accuracy figures in RESULTS.md and the README) must still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "accuracy.py"


def test_accuracy_script_prints_a_row_per_text():
    argv = [sys.executable, str(SCRIPT), "--tokens", "48", "--kv-cache-dtype", "int8"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["README.md", "benchmark/RESULTS.md", "benchmark/README.md"]
    for _, agreement, kl in rows:
        assert 0 < float(agreement.rstrip("%")) <= 100 and float(kl) > 0  # the int8 cache rounds
