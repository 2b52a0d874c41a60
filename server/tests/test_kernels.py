"""The C kernels: how they are built, cached and switched off.

What they compute is tested against plain torch next to the code that calls them
(`test_cpu_decode_fast_paths.py`)."""

from __future__ import annotations

import pytest

from textgen.server import kernels


def test_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_KERNEL_CACHE", str(tmp_path))
    first = kernels.build("paged_attention")
    assert first.parent == tmp_path and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert kernels.build("paged_attention") == first
    assert first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left over


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler"):
        kernels.build("paged_attention")


def test_switched_off_by_environment(monkeypatch):
    kernels.paged_attention.cache_clear()
    monkeypatch.setenv("TEXTGEN_NATIVE_KERNELS", "0")
    try:
        assert kernels.paged_attention() is None
    finally:
        kernels.paged_attention.cache_clear()
