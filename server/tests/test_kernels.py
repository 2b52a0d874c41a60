"""The native operators as torch sees them: their ISA levels, schemas, fake tensors, checks,
and the platform that chooses them.

What each one computes is tested against plain torch next to the code that calls it
(`test_cpu_decode_fast_paths.py`, `test_gguf_linear.py`, `test_int8_linear.py`,
`test_kv_cache_int8.py`, `test_sampling.py`)."""

from __future__ import annotations

import platform

import pytest
import torch
from gguf_testing import make_blocks

from textgen.server import kernels
from textgen.server.platform import ISA_ENV, Platform

CPU = torch.device("cpu")


def test_the_operators_are_built_and_every_cpu_runs_the_baseline():
    assert kernels.available(), "the native operators must be built (make install builds them)"
    levels = kernels.isa_levels()
    assert levels[0] == "baseline"
    if platform.machine() == "x86_64":
        assert "avx2" in levels  # every CPU these tests run on has AVX2
        assert set(levels) <= {"baseline", "avx2", "avx512", "avx512_bf16"}


def test_a_level_the_cpu_cannot_run_is_refused():
    with pytest.raises(ValueError, match="no kernels are built"):
        kernels.select_isa("avx9000")
    if "avx512" not in kernels.isa_levels() and platform.machine() == "x86_64":
        with pytest.raises(ValueError, match="cannot run"):
            kernels.select_isa("avx512")


def test_the_platform_takes_the_best_level_or_the_one_it_is_told(monkeypatch):
    previous = kernels.selected_isa()
    try:
        monkeypatch.delenv(ISA_ENV, raising=False)
        best = Platform.detect(CPU, "float32")
        assert best.isa == kernels.isa_levels()[-1] == kernels.selected_isa()
        assert best.native_ops and best.gguf_blocks
        monkeypatch.setenv(ISA_ENV, "baseline")
        forced = Platform.detect(CPU, "float32")
        assert forced.isa == "baseline" == kernels.selected_isa()
        assert forced.int8_isa is None  # no int8 product in the baseline build
        monkeypatch.setenv(ISA_ENV, "none")
        off = Platform.detect(CPU, "float32")
        assert off.isa is None and not off.native_ops and not off.gguf_blocks
        assert "no native CPU operators" in off.describe()
        monkeypatch.setenv(ISA_ENV, "avx9000")
        with pytest.raises(ValueError, match=ISA_ENV):
            Platform.detect(CPU, "float32")
    finally:
        kernels.select_isa(previous)


def test_the_default_dtype_follows_native_bf16():
    detected = Platform.detect(CPU)
    assert detected.dtype == (torch.bfloat16 if detected.native_bf16 else torch.float32)
    assert Platform.detect(CPU, "bfloat16").dtype == torch.bfloat16
    assert not Platform.detect(CPU, "float16").native_ops  # the operators take f32 and bf16


def test_int8_activations_by_default_only_where_float32_is_chosen_for_want_of_bf16():
    detected = Platform.detect(CPU)
    assert detected.int8_activations == (not detected.native_bf16 and detected.int8_products)
    asked = Platform.detect(CPU, "float32")  # a dtype asked for: its own arithmetic
    assert not asked.int8_activations
    assert Platform.detect(CPU, "float32", int8_activations=True).int8_activations == (
        asked.int8_products
    )
    assert not Platform.detect(CPU, int8_activations=False).int8_activations
    assert not Platform.detect(CPU, isa="none", int8_activations=True).int8_activations
    if detected.int8_activations:
        assert "(int8 activations)" in detected.describe()


def _cases() -> dict[str, tuple]:
    """One valid call of each operator."""
    torch.manual_seed(0)
    key = torch.randn(4, 4, 2, 16)
    blocks = make_blocks(torch.randn(32, 64), "Q4_1")
    return {
        "paged_decode": (
            torch.randn(2, 4, 16),
            key,
            torch.randn_like(key),
            torch.tensor([[0, 1], [2, 3]]),
            torch.tensor([5, 8]),
            0.25,
            None,
            None,
        ),
        "kv_store_int8": (
            torch.randn(3, 2, 16),
            torch.randn(3, 2, 16),
            torch.tensor([0, 5, 9]),
            torch.zeros(4, 4, 2, 16, dtype=torch.int8),
            torch.zeros(4, 4, 2, 16, dtype=torch.int8),
            torch.zeros(4, 2, 4),
            torch.zeros(4, 2, 4),
        ),
        "kv_store": (
            torch.randn(3, 2, 16),
            torch.randn(3, 2, 16),
            torch.tensor([0, 5, 9]),
            torch.zeros(4, 4, 2, 16),
            torch.zeros(4, 4, 2, 16),
        ),
        "gguf_linear": (torch.randn(3, 64), blocks.data, kernels.GGML_TYPE_IDS["Q4_1"]),
        "int8_pack": (blocks.data, kernels.GGML_TYPE_IDS["Q4_1"]),
        "gemv_pack": (blocks.data, kernels.GGML_TYPE_IDS["Q4_1"]),
        "rms_norm": (torch.randn(3, 16), torch.rand(16), 1e-5),
        "add_rms_norm": (torch.randn(3, 16), torch.randn(3, 16), torch.rand(16), 1e-5),
        "rotary_": (
            torch.randn(3, 4, 8),
            torch.randn(3, 2, 8),
            torch.tensor([0, 1, 7]),
            torch.rand(8, 8),
            torch.rand(8, 8),
        ),
        "silu_and_mul": (torch.randn(3, 32),),
        "row_stats": (torch.randn(3, 50),),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_schemas_and_fake_tensors_agree_with_the_operators(name):
    """torch's own checker: the schema's mutation annotations and the fake (meta) shapes."""
    assert kernels.available()
    op = getattr(torch.ops.textgen, name).default
    torch.library.opcheck(op, _cases()[name], test_utils=("test_schema", "test_faketensor"))


def test_the_int8_operators_schemas_and_fake_tensors():
    if kernels.int8_isa() is None:
        pytest.skip("no int8 product on this CPU")
    torch.manual_seed(1)
    blocks = make_blocks(torch.randn(32, 64), "Q4_1")
    values, scales, offsets = kernels.int8_pack(blocks.data, "Q4_1")
    rows = kernels.gemv_pack(blocks.data, "Q4_1")
    x = torch.randn(3, 64)
    cases = {
        "int8_linear": (torch.randn(9, 64), values, scales, offsets, 3, True),
        "gemv_int8": (x, rows, 64, False),
        "gguf_linear": (x, blocks.data, 3, True, True),
    }
    for name, args in cases.items():
        op = getattr(torch.ops.textgen, name).default
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    ("name", "change", "error", "message"),
    [
        ("paged_decode", {4: torch.tensor([5, 9])}, IndexError, "outside its block table"),
        ("paged_decode", {3: torch.tensor([[0, 1], [2, 4]])}, IndexError, "outside the cache"),
        ("paged_decode", {0: torch.randn(2, 3, 16)}, ValueError, "multiple of the KV heads"),
        ("paged_decode", {0: torch.randn(2, 4, 16).double()}, ValueError, "float32 or bfloat16"),
        ("kv_store_int8", {2: torch.tensor([0, 5, 32])}, IndexError, "outside the cache"),
        ("kv_store", {2: torch.tensor([-1, 5, 9])}, IndexError, "outside the cache"),
        ("kv_store", {3: torch.zeros(4, 4, 2, 16).double()}, ValueError, "key_cache"),
        ("gguf_linear", {0: torch.randn(3, 96)}, ValueError, "features"),
        ("gguf_linear", {2: 7}, ValueError, "ggml type 7"),
        ("rotary_", {2: torch.tensor([0, 1, 8])}, IndexError, "past the rotary table"),
        ("rms_norm", {1: torch.rand(8)}, ValueError, "features"),
        ("silu_and_mul", {0: torch.randn(3, 31)}, ValueError, "halves"),
    ],
)
def test_bad_arguments_raise_before_any_kernel_runs(name, change, error, message):
    """Every operator checks shapes, dtypes and indices itself: nothing out of bounds is read."""
    assert kernels.available()
    args = list(_cases()[name])
    for index, value in change.items():
        args[index] = value
    with pytest.raises(error, match=message):
        getattr(torch.ops.textgen, name)(*args)


def test_the_operators_run_on_torch_threads():
    """One thread or two: the same result (each output row is computed by one thread)."""
    assert kernels.available()
    x = torch.randn(300, 64)
    weight = torch.rand(64)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernels.rms_norm(x, weight, 1e-5)
        torch.set_num_threads(2)
        assert torch.equal(kernels.rms_norm(x, weight, 1e-5), alone)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sequence_spread_over_its_kv_heads_gives_the_same_bits(isa, dtype):
    """Fewer sequences than threads: each KV head's query group is an item of its own (the
    step of a single stream uses both threads); each head computes what it does alone."""
    torch.manual_seed(5)
    key = torch.randn(8, 16, 3, 64).to(dtype)
    value = torch.randn_like(key)
    q = torch.randn(1, 9, 64).to(dtype)
    tables, lens = torch.tensor([[3, 0, 6, 1, 2]]), torch.tensor([71])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernels.paged_decode(q, key, value, tables, lens, 0.125)
        torch.set_num_threads(2)
        spread = kernels.paged_decode(q, key, value, tables, lens, 0.125)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(spread, alone)
