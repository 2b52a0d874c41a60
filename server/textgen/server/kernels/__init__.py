"""Small C kernels for the CPU shard, built once with the host's compiler and loaded by ctypes.

Each kernel is a plain C file next to this module (with shared headers beside it). The
first shard to need one compiles it with `cc -O3 -march=native` into a cache folder
keyed by the sources, the compiler flags and the CPU, so later starts load the built
library at once. No compiler, a failed build or TEXTGEN_NATIVE_KERNELS=0 leaves the
loaders (`paged_attention()` and the rest) returning None, and the callers keep their
torch path: the kernels are a speed-up, never a requirement.

Cache folder: $TEXTGEN_KERNEL_CACHE, else ~/.cache/textgen/kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).resolve().parent
# NOTE: reassociation lets reductions vectorize; the kernels never rely on signed zeros
# or traps, and keep infinities and NaNs (no -ffast-math).
_FLAGS = (
    "-O3",
    "-march=native",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    # OpenMP through the libgomp.so.1 torch has already loaded: one shared thread team.
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
)


def enabled() -> bool:
    return os.environ.get("TEXTGEN_NATIVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "textgen" / "kernels"
    return Path(os.environ.get("TEXTGEN_KERNEL_CACHE", default))


def build(name: str) -> Path:
    """Compile `<name>.c` (if not already built for this source and CPU): the library path.

    Raises RuntimeError when no compiler is found or the build fails.
    """
    source = _SOURCE_DIR / f"{name}.c"
    wanted = os.environ.get("CC")
    compiler = shutil.which(wanted) if wanted else shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(f"no C compiler: {wanted or 'cc or gcc'} not found")
    key = hashlib.sha256()
    key.update(source.read_bytes())
    for header in sorted(_SOURCE_DIR.glob("*.h")):  # included by the sources
        key.update(header.read_bytes())
    key.update(" ".join((compiler, *_FLAGS, platform.machine(), _cpu_flags())).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: built under a temporary name and renamed, so that shards starting together
    # never load a half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building {source.name} failed:\n{result.stderr.strip()}")
        os.replace(built, target)
    return target


@functools.cache
def paged_attention() -> ctypes.CDLL | None:
    """The paged decode attention library, or None where it cannot be built here."""
    return _load(
        "paged_attention",
        textgen_paged_decode=[
            ctypes.c_void_p,  # q
            ctypes.c_int64,  # q row stride
            *[ctypes.c_void_p] * 4,  # key, value, out, block_tables
            ctypes.c_int64,  # table_stride
            ctypes.c_void_p,  # context_lens
            *[ctypes.c_int64] * 8,  # seqs, heads, kv heads, head_dim, block size, 3 strides
            ctypes.c_float,  # scale
            ctypes.c_int,  # kind of q and out
            ctypes.c_int,  # kind of the cache
            *[ctypes.c_void_p] * 2,  # key and value scales of an int8 cache
            ctypes.c_void_p,  # scratch
            ctypes.c_int64,  # scratch floats per thread
            ctypes.c_int,  # threads
        ],
        textgen_kv_store_int8=[
            *[ctypes.c_void_p, ctypes.c_int64] * 2,  # k and v rows, their token strides
            ctypes.c_int,  # kind of k and v
            ctypes.c_void_p,  # slots
            *[ctypes.c_int64] * 4,  # tokens, kv heads, head_dim, block size
            *[ctypes.c_void_p] * 4,  # key, value, key scales, value scales
            ctypes.c_int,  # threads
        ],
    )


@functools.cache
def gguf_linear() -> ctypes.CDLL | None:
    """The GGUF-block matrix product library, or None where it cannot be built here."""
    return _load(
        "gguf_linear",
        textgen_gguf_linear=[
            ctypes.c_void_p,  # x
            ctypes.c_int64,  # x row stride
            ctypes.c_void_p,  # weight blocks
            ctypes.c_int,  # ggml type
            ctypes.c_void_p,  # y
            ctypes.c_int64,  # y row stride
            *[ctypes.c_int64] * 3,  # m, n, k
            ctypes.c_int,  # kind
            ctypes.c_int,  # threads
        ],
    )


@functools.cache
def int8_linear() -> ctypes.CDLL | None:
    """The int8 (VNNI) product over GGUF blocks, or None where it cannot be built or run here."""
    library = _load(
        "int8_linear",
        textgen_int8_available=[],
        textgen_int8_pack=[
            ctypes.c_void_p,  # GGUF blocks
            ctypes.c_int,  # ggml type
            *[ctypes.c_int64] * 2,  # n, k
            *[ctypes.c_void_p] * 3,  # u, d_w, m_w
        ],
        textgen_int8_linear=[
            ctypes.c_void_p,  # x (bf16)
            ctypes.c_int64,  # x row stride
            *[ctypes.c_void_p] * 3,  # u, d_w, m_w
            ctypes.c_void_p,  # y (bf16)
            ctypes.c_int64,  # y row stride
            *[ctypes.c_int64] * 3,  # m, n, k
            ctypes.c_int,  # gated: silu(gate) * up of a fused gate/up weight
            ctypes.c_void_p,  # scratch
            ctypes.c_int,  # threads
        ],
    )
    if library is None or not library.textgen_int8_available():
        return None  # built without AVX-512 VNNI: nothing to run
    return library


@functools.cache
def token_ops() -> ctypes.CDLL | None:
    """RMSNorm, rotary embedding, SiLU-and-multiply and logits row statistics, or None."""
    return _load(
        "token_ops",
        textgen_rms_norm=[
            ctypes.c_void_p,  # x
            ctypes.c_int64,  # x row stride
            *[ctypes.c_void_p] * 2,  # residual added to x first (or None), the sum's rows
            ctypes.c_void_p,  # weight
            ctypes.c_void_p,  # out
            *[ctypes.c_int64] * 2,  # tokens, hidden
            ctypes.c_float,  # eps
            ctypes.c_int,  # threads
        ],
        textgen_rotary=[
            ctypes.c_void_p,  # q
            *[ctypes.c_int64] * 2,  # q row stride, q heads
            ctypes.c_void_p,  # k
            *[ctypes.c_int64] * 4,  # k row stride, k heads, tokens, head dim
            *[ctypes.c_void_p] * 3,  # positions, cos, sin
            ctypes.c_int64,  # positions in the tables
            ctypes.c_int,  # threads
        ],
        textgen_silu_and_mul=[
            *[ctypes.c_void_p, ctypes.c_int64],  # gate and up rows, their stride
            ctypes.c_void_p,  # out
            *[ctypes.c_int64] * 2,  # tokens, intermediate size
            ctypes.c_int,  # threads
        ],
        textgen_row_stats=[
            ctypes.c_void_p,  # logits
            *[ctypes.c_int64] * 2,  # rows, cols
            *[ctypes.c_void_p] * 2,  # argmax, lse
            ctypes.c_int,  # threads
        ],
    )


def _load(name: str, **functions: list) -> ctypes.CDLL | None:
    """Build and load `<name>.c`, declaring each function's argument types (all return int)."""
    if not enabled():
        return None
    try:
        library = ctypes.CDLL(str(build(name)))
    except (OSError, RuntimeError) as error:
        logger.warning("native kernel %s unavailable, using the torch path: %s", name, error)
        return None
    for function, argtypes in functions.items():
        entry = getattr(library, function)
        entry.restype = ctypes.c_int
        entry.argtypes = argtypes
    return library


def _cpu_flags() -> str:
    """The CPU's feature flags, so a cache folder shared between machines stays correct."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
