"""int8 activations on GGUF blocks (--int8-activations): the kernel, the layers, the model."""

from __future__ import annotations

import pytest
import torch
from conftest import INT8_LEVELS, cpu_platform
from gguf_testing import dequantized, make_blocks

from textgen.server import kernels
from textgen.server.distributed import ParallelGroup
from textgen.server.layers import gguf
from textgen.server.layers.activation import GatedActivation
from textgen.server.layers.linear import ColumnParallelLinear
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.weights import Weights

needs_int8 = pytest.mark.skipif(not INT8_LEVELS, reason="no int8 product on this CPU")


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] as the kernel sees it: int8 per 32 features, scale max|x| / 127, float64."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, 1), 0)
    q = (blocks * inverse).round()  # half to even, as the kernel's conversion
    assert q.abs().max() <= 127
    return (q.double() * scale.double()).reshape(x.shape)  # exact: 8 bits times a float


def _unpacked(values: torch.Tensor) -> torch.Tensor:
    """A packed weight's per-block floats [N / 16, K / 32, 16] back to [N, K / 32]."""
    n, kb = values.shape
    return values.view(n // 16, kb, 16).permute(0, 2, 1).reshape(n, kb)


def _float32_bound(x: torch.Tensor, weight: gguf.Int8Weight) -> torch.Tensor:
    """How far the kernel's float32 result may lie from the exact product of the rounded
    activations and the weight, [T, N].

    Each block b adds two terms, d_w d_x (sum u q) and m_w (d_x sum q), each with at most
    two roundings (the scale's product or s_x, then the FMA), to an accumulator of 2 kb
    terms: at most (2 kb + 2) 2^-24 of the sum of the terms' sizes (Higham), and a term's
    size is at most (|d_w| u_max + |m_w|) times the block's sum of |x| (u_max 15 for the
    4-bit types, 255 for Q8_0's offset bytes, of which the AVX2 path uses 128)."""
    kb = weight.in_features // 32
    u_max = 255 if weight.kind == "Q8_0" else 15
    per_block = _unpacked(weight.scales).abs().double() * u_max + _unpacked(weight.offsets).abs()
    x_blocks = _rounded(x).abs().view(x.shape[0], kb, 32).sum(-1)  # [T, kb]
    return (2 * kb + 2) * 2**-24 * (x_blocks @ per_block.T)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("num_tokens", [5, 8, 13, 130])  # tails of the 8-token tile and 128 chunk
@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (96, 576)])
def test_kernel_equals_the_product_of_rounded_activations_and_exact_weights(
    kind, num_tokens, shape, int8_isa
):
    out_features, in_features = shape
    torch.manual_seed(num_tokens * in_features + out_features)
    blocks = make_blocks(torch.randn(out_features, in_features) * 0.1, kind)
    weight = gguf.pack_int8(blocks)
    x = torch.randn(num_tokens, in_features).to(torch.bfloat16)
    out = gguf.int8_linear(x, weight)
    expected = _rounded(x) @ dequantized(blocks).double().T
    assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, out_features)
    # integer block sums are exact; float32 accumulation, then one rounding to bf16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("num_tokens", [5, 8, 13, 130])
@pytest.mark.parametrize("shape", [(16, 32), (96, 576)])
def test_float32_activations_round_only_to_int8(kind, num_tokens, shape, int8_isa):
    out_features, in_features = shape
    torch.manual_seed(num_tokens * in_features + out_features)
    blocks = make_blocks(torch.randn(out_features, in_features) * 0.1, kind)
    weight = gguf.pack_int8(blocks)
    x = torch.randn(num_tokens, in_features) * 2
    out = gguf.int8_linear(x, weight)
    assert out.dtype == torch.float32 and out.shape == (num_tokens, out_features)
    expected = _rounded(x) @ dequantized(blocks).double().T
    assert ((out.double() - expected).abs() <= _float32_bound(x, weight)).all()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("num_tokens", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [576, 288])  # 18 blocks; 9 (an odd pair, a tail)
@pytest.mark.parametrize("path", ["packed rows", "blocks"])
def test_small_steps_with_int8_activations(kind, num_tokens, dtype, in_features, path, int8_isa):
    """Steps of up to 4 tokens: gemv's packed rows of 4-bit blocks (Q8_0 has none), or
    the GGUF blocks themselves, each block dotted in integers."""
    torch.manual_seed(num_tokens)
    blocks = make_blocks(torch.randn(48, in_features) * 0.1, kind)
    x = (torch.randn(num_tokens, in_features) * 2).to(dtype)
    weight = gguf.pack_int8(blocks)
    assert (weight.rows is not None) == (kind != "Q8_0")
    if path == "blocks":
        out = kernels.gguf_linear(x, blocks.data, kind, int8_activations=True)
    else:
        out = gguf.gguf_linear(x, blocks, weight)
    assert out.dtype == dtype and out.shape == (num_tokens, 48)
    expected = _rounded(x) @ dequantized(blocks).double().T
    bound = _float32_bound(x, weight)  # the same terms, summed otherwise
    if dtype == torch.bfloat16:  # and rounded once to bf16
        bound = bound + expected.abs() * 2**-8
    assert ((out.double() - expected).abs() <= bound).all()


def test_rounding_activations_stays_close_to_the_exact_product(int8_isa):
    torch.manual_seed(0)
    blocks = make_blocks(torch.randn(64, 576) * 0.05, "Q4_1")
    x = torch.randn(40, 576).to(torch.bfloat16)
    out = gguf.int8_linear(x, gguf.pack_int8(blocks)).double()
    exact = x.double() @ dequantized(blocks).double().T
    # int8 per 32 features: relative error of the products well under 1 %
    assert ((out - exact).norm() / exact.norm()).item() < 0.01


def test_kernel_reads_strided_rows_and_zero_rows(int8_isa):
    torch.manual_seed(1)
    blocks = make_blocks(torch.randn(32, 64), "Q8_0")
    weight = gguf.pack_int8(blocks)
    wide = torch.randn(9, 100).to(torch.bfloat16)
    wide[3] = 0  # an all-zero row has scale 0: zeros out, not NaN
    x = wide[:, 10:74]  # row stride 100
    out = gguf.int8_linear(x, weight)
    torch.testing.assert_close(out, gguf.int8_linear(x.contiguous(), weight), rtol=0, atol=0)
    assert torch.equal(out[3], torch.zeros(32, dtype=torch.bfloat16))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("num_tokens", [5, 13, 130])
def test_gated_output_equals_the_silu_pass_over_the_plain_product(kind, num_tokens, int8_isa):
    torch.manual_seed(num_tokens)
    inter = 48  # three 16-feature tiles per half
    blocks = make_blocks(torch.randn(2 * inter, 96) * 0.5, kind)  # gate rows, then up rows
    weight = gguf.pack_int8(blocks)
    x = (torch.randn(num_tokens, 96) * 3).to(torch.bfloat16)
    plain = gguf.int8_linear(x, weight)  # [T, 2I]
    gated = gguf.int8_linear(x, weight, gated=True)
    expected = torch.nn.functional.silu(plain[:, :inter]) * plain[:, inter:]  # bf16 throughout
    assert gated.shape == (num_tokens, inter) and gated.dtype == torch.bfloat16
    assert (plain[:, :inter] < 0).any()  # both branches of the SiLU are taken
    assert torch.equal(gated, expected)
    # float32: the same silu as the native SiLU pass (an exp of its own, a few ulps from
    # torch's), applied to the same float32 tiles
    plain = gguf.int8_linear(x.float(), weight)
    assert torch.equal(gguf.int8_linear(x.float(), weight, gated=True), kernels.silu_and_mul(plain))


def test_gated_activation_fuses_only_where_the_kernel_gives_the_same_bits(int8_isa):
    torch.manual_seed(3)
    act = GatedActivation("silu", native=True)
    x = torch.randn(gguf.MAX_TOKENS + 3, 64).to(torch.bfloat16)
    blocks = make_blocks(torch.randn(64, 64) * 0.3, "Q4_1")
    layer = ColumnParallelLinear(torch.zeros(64, 64, dtype=torch.bfloat16), None, blocks)
    assert gguf.use_int8_activations(layer) == 1
    expected = act(layer(x))
    calls = []
    original = gguf.int8_linear

    def recording(x, weight, gated=False):
        calls.append(gated)
        return original(x, weight, gated)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "int8_linear", recording)
        assert torch.equal(act.project(x, layer), expected)
        assert calls == [True]  # one pass, the [T, 2I] product never written
        calls.clear()
        act.project(x[: gguf.MAX_TOKENS], layer)  # a small step: the GGUF-block kernel
        assert calls == []
        # 24 features per half: not whole tiles, so the plain product and the SiLU pass
        odd = ColumnParallelLinear(
            torch.zeros(48, 64, dtype=torch.bfloat16),
            None,
            make_blocks(torch.randn(48, 64), "Q4_1"),
        )
        gguf.use_int8_activations(odd)
        assert torch.equal(act.project(x, odd), act(odd(x)))
        assert calls == [False, False]


@needs_int8
def test_the_int8_path_takes_large_steps_only():
    weight = gguf.pack_int8(make_blocks(torch.randn(16, 32), "Q4_1"))
    step = gguf.MAX_TOKENS + 1
    assert gguf.applies_int8(torch.zeros(step, 32, dtype=torch.bfloat16), weight)
    assert gguf.applies_int8(torch.zeros(step, 32), weight)
    assert not gguf.applies_int8(torch.zeros(gguf.MAX_TOKENS, 32, dtype=torch.bfloat16), weight)
    assert not gguf.applies_int8(torch.zeros(step, 32, dtype=torch.bfloat16), None)
    assert gguf.pack_int8(make_blocks(torch.randn(8, 32), "Q4_1")) is None  # 8 rows: not 16-wide
    assert gguf.pack_int8(None) is None


def _logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    """Every position's logits of one prefill: [len(prompt), V] float32."""
    runner.allocate_kv_cache(len(prompt) // 16 + 1)
    table = list(range(len(prompt) // 16 + 1))
    sequence = SequenceInput(prompt, 0, list(range(len(prompt))), table, all_logits=True)
    return runner.forward([sequence])[0]


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_model_with_int8_activations_stays_close_to_float32(
    real_model_dir, dtype, int8_isa
):
    platform = cpu_platform(dtype)
    if dtype == torch.bfloat16 and not platform.native_bf16:
        pytest.skip("this CPU has no native bf16")
    int8_platform = cpu_platform(dtype, int8_activations=True)
    assert int8_platform.int8_activations
    int8 = ModelRunner.load(real_model_dir, int8_platform, 16, ParallelGroup())
    layers = [m for m in int8.model.modules() if getattr(m, "int8", None) is not None]
    assert len(layers) == 4 * 30 + 1  # qkv, o, gate/up, down per layer, and the output layer
    plain = ModelRunner.load(real_model_dir, platform, 16, ParallelGroup())
    assert all(getattr(m, "int8", None) is None for m in plain.model.modules())

    torch.manual_seed(0)
    prompt = torch.randint(100, 20000, (120,)).tolist()
    reference = _logits(
        ModelRunner.load(real_model_dir, cpu_platform(torch.float32), 16, ParallelGroup()), prompt
    )

    def distance(logits: torch.Tensor) -> tuple[float, float]:
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
            reduction="batchmean",
        ).item()  # fmt: skip
        return agree, kl

    int8_agree, int8_kl = distance(_logits(int8, prompt))
    _, plain_kl = distance(_logits(plain, prompt))
    # measured on this prompt: top-1 agreement 0.91, KL 0.007 in bf16 (bf16 alone: 0.002)
    assert int8_agree > 0.85 and int8_kl < 0.02, (int8_agree, int8_kl, plain_kl)
    assert plain_kl < int8_kl  # the rounding is real: the path ran


@pytest.mark.parametrize(
    "name", ["model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"]
)
def test_split_weights_give_the_same_product(real_model_dir, name, int8_isa):
    """Tensor parallelism: two ranks' halves (row- or vocabulary-split) on block bounds."""
    bf16 = cpu_platform(torch.bfloat16)
    full = Weights(real_model_dir, bf16, ParallelGroup())
    halves = [Weights(real_model_dir, bf16, ParallelGroup(r, 2)) for r in (0, 1)]
    whole = gguf.pack_int8(full.blocks(name))
    torch.manual_seed(2)
    x = torch.randn(24, whole.in_features).to(torch.bfloat16)
    expected = gguf.int8_linear(x, whole).float()
    if name.endswith("down_proj.weight"):  # row-parallel: input columns split, partials summed
        parts = []
        for w in halves:
            start, stop = w.shard_range(name, 1)
            parts.append(
                gguf.int8_linear(
                    x[:, start:stop], gguf.pack_int8(w.blocks(name, columns=(start, stop)))
                )
            )
        # each rank rounds its own 32-feature blocks exactly as the whole does; what differs
        # is the rounding of each partial and of the whole to bf16, half a step each
        step = max(p.float().abs().max().item() for p in parts) * 2**-8
        total = sum(p.float() for p in parts)
        torch.testing.assert_close(total, expected, rtol=0, atol=3 * step)
    else:  # the output layer: vocabulary rows split, logits gathered
        rows = [
            gguf.int8_linear(x, gguf.pack_int8(w.blocks(name, rows=w.shard_range(name, 0))))
            for w in halves
        ]
        assert torch.equal(torch.cat(rows, dim=-1).float(), expected)


def test_a_level_without_an_int8_product_says_so_and_the_layers_keep_their_products():
    """The baseline build multiplies in floats only: no int8 level, no switched layer."""
    previous = kernels.selected_isa()
    kernels.select_isa("baseline")
    try:
        assert kernels.int8_isa() is None
        assert not cpu_platform(torch.bfloat16).int8_products
        blocks = make_blocks(torch.randn(16, 32), "Q4_1")
        weight = gguf.pack_int8(blocks)  # one layout for every level: packing works
        with pytest.raises(RuntimeError, match="no int8 product"):
            gguf.int8_linear(torch.zeros(8, 32, dtype=torch.bfloat16), weight)
    finally:
        kernels.select_isa(previous)
