"""Packages live one folder per process (launcher/, router/, server/, ...), each
holding its part of the `textgen` namespace; map every package to its folder.

The shard's native CPU operators (`textgen.server.kernels._C`, `torch.ops.textgen`) are
built here, against the torch already installed, so install textgen with
`pip install --no-build-isolation` after torch (the Makefile does). Their C kernels are
compiled once per ISA level (a portable baseline, and on x86-64 AVX2 and two AVX-512
levels); the shard picks the best level its CPU runs at start-up, so one build serves
every x86-64 CPU. Without torch at build time the operators are left out and the shard
runs its torch paths (it says so in its log).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOTS = ("launcher", "router", "server", "proto", "benchmark")
KERNELS = Path("server/textgen/server/kernels/csrc")
KERNEL_SOURCES = ("paged_attention.c", "gguf_linear.c", "int8_linear.c", "token_ops.c")
# NOTE: ISO C: no contraction of a * b + c into an FMA that would round differently from
# torch's separate operations. Symbols stay inside the extension.
KERNEL_FLAGS = ["-O3", "-std=c11", "-fPIC", "-fvisibility=hidden"]
# Reassociation lets reductions vectorize; the kernels never rely on signed zeros or traps,
# and keep infinities and NaNs (no -ffast-math). Only where the CPU has FMA: exp's range
# reduction (vector_math.h) is kept exact by FMAs, which are never reassociated.
REASSOCIATE = ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_AVX2 = [*REASSOCIATE, "-mavx2", "-mfma", "-mf16c"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
# Level -> flags. NOTE: the names, order and CPU checks are ops.cpp's kBuilds.
X86_LEVELS = {
    "baseline": [],
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512_bf16": [*_AVX512, "-mavx512vnni", "-mavx512bf16"],
}


def isa_levels() -> dict[str, list[str]]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        # NOTE: a portable target whatever CFLAGS say, so the build runs on other CPUs.
        portable = ["-march=x86-64", "-mtune=generic"]
        return {level: [*portable, *flags] for level, flags in X86_LEVELS.items()}
    return {"baseline": REASSOCIATE}  # AArch64 and the like: FMA is baseline there


def compile_kernel(source: str, level: str, target: Path, flags: list[str]) -> None:
    """One C kernel for one ISA level, with the C compiler Python was built with (or $CC)."""
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [*compiler, *KERNEL_FLAGS, *flags, f"-DTEXTGEN_ISA={level}", f"-I{KERNELS}"]
    print(" ".join(command), "-c", source, flush=True)
    subprocess.run([*command, "-c", str(KERNELS / source), "-o", str(target)], check=True)


def kernel_extensions() -> tuple[list, dict]:
    """The operators' extension and the command that builds it; none without torch."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "textgen: torch is not importable at build time, so the native CPU operators are "
            "not built (install torch first, then textgen with --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}
    levels = isa_levels()

    class BuildKernels(BuildExtension):
        """Compiles the C kernels once per ISA level, then links them into the extension."""

        def build_extension(self, ext) -> None:
            jobs = [
                (source, level, Path(self.build_temp) / "kernels" / level / f"{source}.o")
                for level in levels
                for source in KERNEL_SOURCES
            ]
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                list(pool.map(lambda job: compile_kernel(*job, levels[job[1]]), jobs))
            ext.extra_objects = [*ext.extra_objects, *(str(job[2]) for job in jobs)]
            super().build_extension(ext)

    x86 = ["-DTEXTGEN_X86_BUILDS"] if len(levels) > 1 else []
    extension = CppExtension(
        "textgen.server.kernels._C",
        [str(KERNELS / "ops.cpp")],
        include_dirs=[str(KERNELS.resolve())],
        # OpenMP: at::parallel_for's pragmas, on the runtime torch has loaded.
        extra_compile_args=["-O3", "-fopenmp", *x86],
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildKernels}


package_dir = {
    package: f"{root}/{package.replace('.', '/')}"
    for root in ROOTS
    for package in find_namespace_packages(root, include=["textgen.*"], exclude=["*.csrc"])
}
ext_modules, cmdclass = kernel_extensions()
setup(
    packages=sorted(package_dir),
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
