"""textgen's native CPU operators: typed torch ops (`torch.ops.textgen.*`) over C kernels.

The operators are a C++ extension (`_C`, from `csrc/ops.cpp`) built when textgen is
installed, against the torch installed beside it. ops.cpp holds each operator's schema and
checks every argument (shapes, dtypes, strides, block ids, positions) before a kernel sees
it; the kernels (`csrc/*.c`) are compiled once per ISA level, a portable baseline and on
x86-64 AVX2 and two AVX-512 levels, and the level is chosen at run time: the best this CPU
runs unless `select_isa` says otherwise. They run on torch's intra-op threads.

The shard's platform (`textgen.server.platform`) decides once at start-up whether and at
which level the operators serve; the layers follow that decision and keep a torch path
for everything else. Each operator has a fake (meta) implementation below, so torch's
tracing and `torch.library.opcheck` see its output shapes.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger(__name__)

# ggml's type ids of the GGUF block formats the operators read.
GGML_TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


@functools.cache
def available() -> bool:
    """True when the operators are built and loaded (registers them on first call)."""
    try:
        importlib.import_module("textgen.server.kernels._C")
    except ImportError as error:
        logger.warning(
            "textgen's native CPU operators are not built (%s): the shard runs its torch paths. "
            "Install textgen with `pip install --no-build-isolation` after torch to build them.",
            error,
        )
        return False
    _register_fakes()
    return True


def isa_levels() -> list[str]:
    """The ISA levels this CPU runs among those built, lowest first ([] when not built)."""
    return list(torch.ops.textgen.isa_levels()) if available() else []


def select_isa(level: str) -> None:
    """Run every operator on `level`'s kernels from now on (ValueError if the CPU cannot)."""
    torch.ops.textgen.select_isa(level)


def selected_isa() -> str:
    return torch.ops.textgen.selected_isa()


def int8_isa() -> str | None:
    """The level the int8 product runs on (at or below the selected one), or None."""
    return torch.ops.textgen.int8_isa() or None


def paged_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over the paged cache, read in place: [B, Hq, D].

    q [B, Hq, D] float32 or bf16 (heads contiguous, any row stride); caches [num_blocks,
    block_size, Hkv, D] of q's dtype, or int8 with float32 scales [num_blocks, Hkv,
    block_size]; block_tables [B, max_blocks] and context_lens [B] int64.
    """
    return torch.ops.textgen.paged_decode(
        q, key_cache, value_cache, block_tables, context_lens, scale, key_scale, value_scale
    )


def kv_store(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
) -> None:
    """New keys and values [T, Hkv, D] copied into a cache of their dtype at slots [T]."""
    torch.ops.textgen.kv_store(k, v, slots, key_cache, value_cache)


def kv_store_int8(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
) -> None:
    """New keys and values [T, Hkv, D] into an int8 cache at their slots [T]."""
    torch.ops.textgen.kv_store_int8(k, v, slots, key_cache, value_cache, key_scale, value_scale)


def gguf_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    kind: str,
    int8_activations: bool = False,
    gated: bool = False,
) -> torch.Tensor:
    """x [T, in] @ W^T with W as GGUF blocks [out, in / 32 * block bytes]: [T, out], x's dtype.

    `int8_activations`: x rounded to int8 per 32 features, each block dotted in integers.
    `gated`: W is a fused gate/up projection and the result [T, out / 2] is silu(gate) * up,
    the native SiLU pass over the product to the bit.
    """
    kind_id = GGML_TYPE_IDS[kind]
    return torch.ops.textgen.gguf_linear(x, blocks, kind_id, int8_activations, gated)


def int8_pack(blocks: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF blocks as the int8 product's weight: values [out, in] uint8, scales and offsets
    [out, in / 32] float32 (out a multiple of 16)."""
    return torch.ops.textgen.int8_pack(blocks, GGML_TYPE_IDS[kind])


def gemv_pack(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """Q4_0 / Q4_1 blocks [out, in / 32 * block bytes] as gemv_int8's rows (uint8)."""
    return torch.ops.textgen.gemv_pack(blocks, GGML_TYPE_IDS[kind])


def gemv_int8(
    x: torch.Tensor, rows: torch.Tensor, in_features: int, gated: bool = False
) -> torch.Tensor:
    """x [T, in] (a few tokens) rounded to int8 per 32 features, times `gemv_pack`ed rows:
    [T, out], x's dtype; `gated` as for `gguf_linear`."""
    return torch.ops.textgen.gemv_int8(x, rows, in_features, gated)


def int8_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    kind: str,
    gated: bool = False,
) -> torch.Tensor:
    """x [T, in] rounded to int8 per 32 features, times an `int8_pack`ed weight: [T, out].

    `gated`: the weight is a fused gate/up projection and the result [T, out / 2] is
    silu(gate) * up.
    """
    return torch.ops.textgen.int8_linear(x, values, scales, offsets, GGML_TYPE_IDS[kind], gated)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of rows x [T, H] (contiguous rows), x's dtype."""
    return torch.ops.textgen.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), in one pass."""
    return torch.ops.textgen.add_rms_norm(x, residual, weight, eps)


def rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place ("rotate half"), float32 tables."""
    torch.ops.textgen.rotary_(q, k, positions, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of rows x [T, 2I] (gate, then up): [T, I]."""
    return torch.ops.textgen.silu_and_mul(x)


def row_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each float32 row's argmax (first maximum) and log-sum-exp: [R] int64, [R] float32."""
    return torch.ops.textgen.row_stats(logits)


def llama_small_step(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    norms: list[torch.Tensor],
    rows: list[torch.Tensor],
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    key_scales: list[torch.Tensor],
    value_scales: list[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    intermediate: int,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama decoder stack over a step of a few tokens: (last mlp output, residual).

    The same kernels, threads and order as the single operators the layers call (rms_norm,
    gemv_int8 on int8 activations, rotary_, kv_store / kv_store_int8, paged_decode,
    silu_and_mul), so the same bits, in one call: float32 hidden [T, H]; per layer two
    norm weights (input, post-attention) and four `gemv_pack`ed products (qkv, o, gate/up,
    down); each token's block table and context length; an int8 cache's scales, or none.
    """
    return torch.ops.textgen.llama_small_step(
        hidden,
        positions,
        slots,
        block_tables,
        context_lens,
        norms,
        rows,
        key_caches,
        value_caches,
        key_scales,
        value_scales,
        cos,
        sin,
        num_heads,
        intermediate,
        eps,
        scale,
    )


def _register_fakes() -> None:
    """Output shapes of every operator, for torch's fake tensors (tracing, opcheck)."""

    def fake(name: str):
        return torch.library.register_fake(f"textgen::{name}")

    @fake("paged_decode")
    def _(q, key_cache, value_cache, block_tables, context_lens, scale, *scales):
        return q.new_empty(q.shape)

    @fake("kv_store_int8")
    def _(k, v, slots, key_cache, value_cache, key_scale, value_scale):
        return None

    @fake("gguf_linear")
    def _(x, blocks, ggml_type, int8_activations=False, gated=False):
        return x.new_empty(x.shape[0], blocks.shape[0] // 2 if gated else blocks.shape[0])

    @fake("kv_store")
    def _(k, v, slots, key_cache, value_cache):
        return None

    @fake("int8_pack")
    def _(blocks, ggml_type):
        block_bytes = {2: 18, 3: 20, 8: 34}[ggml_type]
        n, k = blocks.shape[0], blocks.shape[1] // block_bytes * 32
        scales = blocks.new_empty(n, k // 32, dtype=torch.float32)
        return blocks.new_empty(n, k), scales, scales.new_empty(scales.shape)

    @fake("gemv_pack")
    def _(blocks, ggml_type):
        block_bytes = {2: 18, 3: 20}[ggml_type]
        blocks_per_row = blocks.shape[1] // block_bytes
        row_bytes = (blocks_per_row + 1) // 2 * 32 + 4 * (-(-blocks_per_row // 8) * 8)
        return blocks.new_empty(blocks.shape[0], row_bytes)

    @fake("gemv_int8")
    def _(x, rows, in_features, gated=False):
        return x.new_empty(x.shape[0], rows.shape[0] // 2 if gated else rows.shape[0])

    @fake("int8_linear")
    def _(x, values, scales, offsets, ggml_type, gated=False):
        out = values.shape[0] // 2 if gated else values.shape[0]
        return x.new_empty(x.shape[0], out)

    @fake("rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape)

    @fake("add_rms_norm")
    def _(x, residual, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @fake("rotary_")
    def _(q, k, positions, cos, sin):
        return None

    @fake("silu_and_mul")
    def _(x):
        return x.new_empty(x.shape[0], x.shape[1] // 2)

    @fake("llama_small_step")
    def _(hidden, positions, slots, block_tables, context_lens, *rest):
        return hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape)

    @fake("row_stats")
    def _(logits):
        rows = logits.shape[0]
        return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows)
