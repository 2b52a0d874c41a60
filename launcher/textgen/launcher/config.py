"""The launcher's configuration: one frozen dataclass, the CLI is generated from it.

Token limits depend on the model (`max_position_embeddings`), so they are
settled in a second step, `TokenLimits.derive`, once the model is resolved.
Defaults follow TGI:

    max_total_tokens         = min(max_position_embeddings, 4096)
    max_input_tokens         = max_total_tokens - 1
    max_batch_prefill_tokens = max_input_tokens + 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "int8")
MAX_TOTAL_TOKENS_CAP = 4096
PREFILL_HEADROOM_TOKENS = 50
# Chunked prefill's default (round 12 on a 2-core Zen 3, against whole prompts): a 20-word
# request behind a 3,500-word prompt got its first token in 3.8 s instead of 13.2 s, the
# decoding streams' longest stall fell from 13.9 s to 3.0 s, and 16 streams lost 6.5 % of
# their throughput (256-token chunks: 1.4 s, 1.6 s, and 14 %).
DEFAULT_PREFILL_CHUNK_TOKENS = 512
# Config keys that name the context length, in the order transformers' configs use them.
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


class ConfigError(ValueError):
    """An invalid launcher setting; the message is meant for the user as is."""


# Help for each LauncherConfig field; the field's name, type and default make the rest of the flag.
FLAG_HELP = {
    "model_id": "hub id, model directory or .gguf file; default: built-in SmolLM2-135M-Instruct",
    "revision": "hub revision (branch, tag or commit)",
    "cache_dir": "where converted models live; default: $TEXTGEN_CACHE or ~/.cache/textgen",
    "num_shard": "number of shards (tensor-parallel ranks); on CPU they share the cores",
    "port": "HTTP port of the router",
    "hostname": "HTTP address of the router",
    "max_input_tokens": "prompt tokens per request; default: max_total_tokens - 1",
    "max_total_tokens": "prompt + generated tokens; default: min(max_position_embeddings, 4096)",
    "max_batch_prefill_tokens": "prompt tokens per prefill; default: max_input_tokens + 50",
    "max_batch_total_tokens": "tokens per batch; default: sized from the shards' KV cache",
    "max_batch_size": "requests per batch; default: unlimited",
    "max_concurrent_requests": "requests in flight before the router answers 429",
    "waiting_served_ratio": "waiting/running ratio that triggers a prefill",
    "max_waiting_tokens": "decode steps a waiting request may be postponed",
    "prefill_chunk_tokens": "prompt tokens a step computes while requests decode; longer"
    " prompts are prefilled in chunks over several steps, and short newcomers go first;"
    " 0: whole prompts (measured in benchmark/RESULTS.md, round 12)",
    "prefix_caching": "share the KV blocks of prompt prefixes between requests (a radix tree"
    " of blocks in the router, least recently used evicted when room is needed)",
    "max_stop_sequences": "stop sequences per request",
    "max_top_n_tokens": "largest top_n_tokens a request may ask for",
    "max_best_of": "largest best_of a request may ask for (1 turns best_of off)",
    "payload_limit": "largest request body in bytes (larger ones get 413)",
    "dtype": "default: bfloat16 on CUDA and on CPUs with native bf16, else float32",
    "shard_uds_path": "shard r listens on unix://{path}-{r}",
    "kv_cache_memory_gib": "memory each shard gives its paged KV cache",
    "int8_activations": "multiply a GGUF model's weight blocks with activations rounded to int8"
    " per 32 features, as llama.cpp does: faster steps, logits a little further from float32"
    " than bf16's (see README); default: on when --dtype is not given and the CPU has no"
    " native bf16 (float32 is chosen), off otherwise",
    "kv_cache_dtype": "auto: keys and values in the model's dtype; int8: each row of head_dim"
    " values as int8 with a float32 scale, about half the bytes per token (see README)",
    "master_addr": "torch.distributed rendezvous address",
    "master_port": "torch.distributed rendezvous port; default: a free port",
    "json_output": "log JSON lines instead of plain text (launcher, router and shards)",
    "otlp_endpoint": "export traces over OTLP: gRPC (http://host:4317) or HTTP (.../v1/traces)",
    "otlp_service_name": "traces name the router {name}.router and the shards {name}.server",
    "watermark_gamma": "green-list fraction of the vocabulary; default: 0.5",
    "watermark_delta": "bias added to green logits; default: 2.0",
    "watermark_key": "secret seeding the green lists; default: a public constant (see README)",
    "watermark_z_threshold": "z-score above which /watermark/detect says watermarked; default: 4.0",
    "disable_grammar_support": "refuse grammar, response_format and tools (422)",
    "api_key": "the key requests must carry (Authorization: Bearer, or x-api-key); prefer"
    " the TEXTGEN_API_KEY environment variable or --api-key-file: a flag shows in `ps`",
    "api_key_file": "file of API keys, one per line (# starts a comment); any of them is accepted",
    "cors_allow_origin": "web origins allowed to call the server, comma-separated or repeated"
    " (* for any); default: none, no CORS headers",
    "graceful_termination_timeout": "seconds requests in flight may run after SIGTERM before"
    " they are ended with an error",
    "stream_keepalive_interval": "seconds of silence after which a stream gets an SSE comment",
}
FLAG_CHOICES = {"dtype": DTYPES, "kv_cache_dtype": KV_CACHE_DTYPES}


@dataclass(frozen=True)
class LauncherConfig:
    model_id: str | None = None
    revision: str | None = None
    cache_dir: Path | None = None
    num_shard: int = 1
    port: int = 8080
    hostname: str = "0.0.0.0"
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_concurrent_requests: int = 128
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    prefix_caching: bool = True
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    payload_limit: int = 2_000_000
    dtype: str | None = None
    shard_uds_path: str = "/tmp/textgen-server"
    kv_cache_memory_gib: float = 1.0
    int8_activations: bool | None = None
    kv_cache_dtype: str = "auto"
    master_addr: str = "localhost"
    master_port: int | None = None
    json_output: bool = False
    otlp_endpoint: str | None = None
    otlp_service_name: str = "textgen"
    # None: the router's default (textgen.router.watermark.WatermarkConfig).
    watermark_gamma: float | None = None
    watermark_delta: float | None = None
    watermark_key: str | None = None
    watermark_z_threshold: float | None = None
    disable_grammar_support: bool = False
    api_key: str | None = None
    api_key_file: Path | None = None
    cors_allow_origin: list[str] | None = None
    graceful_termination_timeout: float = 90.0
    stream_keepalive_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.num_shard < 1:
            raise ConfigError("--num-shard must be >= 1")
        master_port = 1 if self.master_port is None else self.master_port
        if not 0 < self.port < 65536 or not 0 < master_port < 65536:
            raise ConfigError("--port and --master-port must be between 1 and 65535")
        if self.waiting_served_ratio < 0:
            raise ConfigError("--waiting-served-ratio must be >= 0")
        if self.kv_cache_memory_gib <= 0:
            raise ConfigError("--kv-cache-memory-gib must be > 0")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.graceful_termination_timeout < 0 or self.stream_keepalive_interval <= 0:
            raise ConfigError(
                "--graceful-termination-timeout must be >= 0 and --stream-keepalive-interval > 0"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}")
        self._check_positive()
        self._check_given_limits()

    def _check_positive(self) -> None:
        names = (
            "max_input_tokens", "max_total_tokens", "max_batch_prefill_tokens",
            "max_batch_total_tokens", "max_batch_size", "max_concurrent_requests",
            "max_best_of", "payload_limit",
        )  # fmt: skip
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.prefill_chunk_tokens < 0:
            raise ConfigError("--prefill-chunk-tokens must be >= 0 (0: whole prompts)")
        if self.max_waiting_tokens < 0 or self.max_stop_sequences < 0:
            raise ConfigError("--max-waiting-tokens and --max-stop-sequences must be >= 0")
        if self.max_top_n_tokens < 0:
            raise ConfigError("--max-top-n-tokens must be >= 0")

    def _check_given_limits(self) -> None:
        # Limits given on the command line are checked before the (slow) model
        # resolution; defaults are checked by TokenLimits once the model is known.
        total, max_input = self.max_total_tokens, self.max_input_tokens
        prefill = self.max_batch_prefill_tokens
        if total is not None and max_input is not None and max_input >= total:
            raise ConfigError(
                f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({total})"
            )
        if prefill is not None and max_input is not None and prefill < max_input:
            raise ConfigError(
                f"--max-batch-prefill-tokens ({prefill}) must be >= "
                f"--max-input-tokens ({max_input})"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LauncherConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per LauncherConfig field, with TGI's name and the field's default."""
    hints = typing.get_type_hints(LauncherConfig)
    for f in dataclasses.fields(LauncherConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = FLAG_HELP[f.name]
        if hints[f.name] is bool:  # off by default: --flag; on by default: --flag / --no-flag
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, action=action, default=f.default, help=help_text)
            continue
        if hints[f.name] == bool | None:  # --flag / --no-flag; None: the default's rule
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind = _value_type(hints[f.name])
        if typing.get_origin(kind) is list:  # repeated, and each value comma-separated
            parser.add_argument(flag, type=_comma_list, action="extend", help=help_text)
            continue
        choices = FLAG_CHOICES.get(f.name)
        parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _value_type(hint: Any) -> type:
    """`int | None` -> int: the type a flag's string converts to."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


@dataclass(frozen=True)
class TokenLimits:
    """Per-request and per-batch token budgets handed to the router."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int

    def __post_init__(self) -> None:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ConfigError(
                f"max_input_tokens ({self.max_input_tokens}) must be < "
                f"max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise ConfigError(
                f"max_batch_prefill_tokens ({self.max_batch_prefill_tokens}) must be >= "
                f"max_input_tokens ({self.max_input_tokens})"
            )

    @classmethod
    def derive(cls, config: LauncherConfig, max_position_embeddings: int) -> TokenLimits:
        total = config.max_total_tokens
        if total is None:
            total = min(max_position_embeddings, MAX_TOTAL_TOKENS_CAP)
        max_input = config.max_input_tokens if config.max_input_tokens is not None else total - 1
        prefill = config.max_batch_prefill_tokens
        if prefill is None:
            prefill = max_input + PREFILL_HEADROOM_TOKENS
        return cls(max_input, total, prefill)


def read_context_length(model_dir: Path) -> int:
    """The model's context length from config.json, or the 4096-token cap if it names none."""
    config = json.loads((model_dir / "config.json").read_text())
    for key in CONTEXT_LENGTH_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return MAX_TOTAL_TOKENS_CAP
