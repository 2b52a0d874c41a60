"""Llama-family decoder (Llama 2/3, SmolLM) over the paged KV cache.

q/k/v and gate/up are each one column-parallel projection loaded from the
separate HF tensors; o and down are row-parallel, so a layer costs two
all-reduces under tensor parallelism. Heads split by KV group, possibly
unevenly (see `sharding`), so each rank's attention is ordinary GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from textgen.server import kernels
from textgen.server.attention import AttentionBackend, AttentionMetadata
from textgen.server.kv_cache import KVCache, KVCacheSpec, LayerCache
from textgen.server.layers import (
    ColumnParallelLinear,
    GatedActivation,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    gguf,
)
from textgen.server.layers.rotary import RopeConfig
from textgen.server.models.causal_lm import CausalLM
from textgen.server.sharding import HeadSplit, ModelDims, balanced_range
from textgen.server.weights import Weights


@dataclass(frozen=True)
class LlamaShape:
    """Head counts local to this shard and where its heads sit in the checkpoint."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    heads: HeadSplit

    @classmethod
    def from_hf(cls, config, world_size: int, rank: int = 0) -> LlamaShape:
        head_dim = getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // config.num_attention_heads
        dims = ModelDims.from_hf(config)
        dims.check(world_size)
        heads = HeadSplit.for_rank(dims.num_heads, dims.num_kv_heads, world_size, rank)
        return cls(heads.num_heads, heads.num_kv_heads, head_dim, heads)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_rows(self) -> tuple[int, int]:
        """This rank's output features of q_proj (= input features of o_proj)."""
        start = self.heads.q_start * self.head_dim
        return start, start + self.q_size

    @property
    def kv_rows(self) -> tuple[int, int]:
        start = self.heads.kv_start * self.head_dim
        return start, start + self.kv_size


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config,
        weights: Weights,
        prefix: str,
        shape: LlamaShape,
        rotary: RotaryEmbedding,
        attention: AttentionBackend,
    ) -> None:
        super().__init__()
        bias = getattr(config, "attention_bias", False)
        qkv = [f"{prefix}.{name}" for name in ("q_proj", "k_proj", "v_proj")]
        rows = [shape.q_rows, shape.kv_rows, shape.kv_rows]
        self.qkv_proj = ColumnParallelLinear.load(weights, qkv, bias=bias, rows=rows)
        self.o_proj = RowParallelLinear.load(
            weights, f"{prefix}.o_proj", bias=bias, columns=shape.q_rows
        )
        self.shape = shape
        self.rotary = rotary
        self.attention = attention

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        shape, num_tokens = self.shape, hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([shape.q_size, shape.kv_size, shape.kv_size], dim=-1)
        q = q.view(num_tokens, shape.num_heads, shape.head_dim)  # [T, Hq, D]
        k = k.view(num_tokens, shape.num_kv_heads, shape.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, shape.num_kv_heads, shape.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.attention.forward(q, k, v, cache, metadata)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, shape.q_size))  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config, weights: Weights, prefix: str) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        gate_up = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        group = weights.group
        # NOTE: an uneven split is fine here: no collective sees the intermediate size.
        local = balanced_range(config.intermediate_size, group.world_size, group.rank)
        self.gate_up_proj = ColumnParallelLinear.load(weights, gate_up, bias=bias, rows=[local] * 2)
        self.down_proj = RowParallelLinear.load(
            weights, f"{prefix}.down_proj", bias=bias, columns=local
        )
        self.act = GatedActivation(config.hidden_act, weights.platform.native_ops)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.act.project(hidden, self.gate_up_proj)  # [T, I_local]
        return self.down_proj(inner)  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config,
        weights: Weights,
        prefix: str,
        shape: LlamaShape,
        rotary: RotaryEmbedding,
        attention: AttentionBackend,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm.load(weights, f"{prefix}.input_layernorm", eps)
        self.self_attn = LlamaAttention(
            config, weights, f"{prefix}.self_attn", shape, rotary, attention
        )
        self.post_attention_layernorm = RMSNorm.load(
            weights, f"{prefix}.post_attention_layernorm", eps
        )
        self.mlp = LlamaMLP(config, weights, f"{prefix}.mlp")

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cache: LayerCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output as (mlp output, residual): their sum is the hidden state.

        The sum is left to the next norm, which adds it in its own pass; the first layer
        takes the embeddings as `hidden` and no residual.
        """
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attn = self.self_attn(normed, positions, cache, metadata)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn, residual)
        return self.mlp(normed), residual  # [T, hidden] each


@dataclass(frozen=True)
class SmallStepWeights:
    """What `kernels.llama_small_step` reads: the decoder stack as one native call.

    Built where every layer's four products run on int8 activations against 4-bit rows
    (`gguf.Int8Weight.rows`), in float32, on one shard, over the native paged attention.
    """

    norms: list[torch.Tensor]  # per layer: input, post-attention [hidden] float32
    rows: list[torch.Tensor]  # per layer: qkv, o, gate/up, down, gemv_pack'ed
    cos: torch.Tensor  # [positions, D] float32
    sin: torch.Tensor
    num_heads: int
    intermediate: int
    eps: float
    scale: float

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> SmallStepWeights | None:
        """The model's, when its small steps can run as one call; else None."""
        first = model.layers[0]
        attention, rotary = first.self_attn.attention, first.self_attn.rotary
        if not (attention.native_cpu and model.cache_dtype == torch.float32 and rotary.native):
            return None
        norms, rows = [], []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not mlp.act.native or attn.o_proj.group.world_size > 1:
                return None
            if any(p.bias is not None or p.int8 is None or p.int8.rows is None for p in linears):
                return None
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            rows += [p.int8.rows for p in linears]
        return cls(
            norms=norms,
            rows=rows,
            cos=rotary.cos32,
            sin=rotary.sin32,
            num_heads=model.shape.num_heads,
            intermediate=first.mlp.down_proj.int8.in_features,
            eps=first.input_layernorm.eps,
            scale=model.shape.head_dim**-0.5,
        )

    def run(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over hidden [T, H]: (last mlp output, residual)."""
        per_token = metadata if metadata.is_decode else metadata.per_token
        scales = [] if kv_cache.key_scales[0] is None else kv_cache.key_scales
        return kernels.llama_small_step(
            hidden,
            positions,
            metadata.slots.contiguous(),
            per_token.block_tables,
            per_token.context_lens.contiguous(),
            self.norms,
            self.rows,
            kv_cache.key_caches,
            kv_cache.value_caches,
            scales,
            [] if not scales else kv_cache.value_scales,
            self.cos,
            self.sin,
            self.num_heads,
            self.intermediate,
            self.eps,
            self.scale,
        )


class LlamaForCausalLM(CausalLM):
    def __init__(
        self, config, weights: Weights, attention: AttentionBackend, prefix: str = "model"
    ) -> None:
        super().__init__()
        self.shape = LlamaShape.from_hf(config, weights.group.world_size, weights.group.rank)
        rotary = RotaryEmbedding(
            RopeConfig.from_hf(config, self.shape.head_dim),
            weights.dtype,
            weights.device,
            weights.platform.native_ops,
        )
        self.embed_tokens = VocabParallelEmbedding.load(weights, f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config, weights, f"{prefix}.layers.{i}", self.shape, rotary, attention
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm.load(weights, f"{prefix}.norm", config.rms_norm_eps)
        tied = getattr(config, "tie_word_embeddings", False)
        self.lm_head = ParallelLMHead.load(weights, "lm_head", self.embed_tokens, tied)
        self.cache_dtype = weights.dtype
        self.small_step: SmallStepWeights | None = None  # set by `prepare`

    @classmethod
    def load(cls, config, weights: Weights, attention: AttentionBackend) -> LlamaForCausalLM:
        return cls(config, weights, attention).eval()

    def prepare(self) -> None:
        self.small_step = SmallStepWeights.of(self)

    def kv_cache_spec(self, block_size: int) -> KVCacheSpec:
        return KVCacheSpec(
            num_layers=len(self.layers),
            num_kv_heads=self.shape.num_kv_heads,
            head_dim=self.shape.head_dim,
            block_size=block_size,
            dtype=self.cache_dtype,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        if self.small_step is not None and hidden.shape[0] <= gguf.MAX_TOKENS:
            hidden, residual = self.small_step.run(hidden, positions, kv_cache, metadata)
        else:
            for i, layer in enumerate(self.layers):
                hidden, residual = layer(hidden, residual, positions, kv_cache.layer(i), metadata)
        # NOTE: the norm is per token, so only the wanted rows need it and the head.
        hidden, _ = self.norm.add_and_norm(hidden[logits_indices], residual[logits_indices])
        return self.lm_head(hidden).float()  # [N, V]
