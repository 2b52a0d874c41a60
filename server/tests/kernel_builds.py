"""A kernel of textgen.server.kernels built with other flags, as other CPUs would build it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

from textgen.server import kernels


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (False where it cannot be read)."""
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def build_variant(tmp_path: Path, name: str, *flags: str) -> ctypes.CDLL:
    """`kernels/<name>.c` compiled into `tmp_path` with `flags` (-march and -m options)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None, "the kernels' tests need a C compiler"
    source = Path(kernels.__file__).parent / f"{name}.c"
    built = tmp_path / f"{name}-variant.so"
    common = ["-O2", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
    subprocess.run([compiler, *common, *flags, str(source), "-o", str(built), "-lm"], check=True)
    return ctypes.CDLL(str(built))
