"""The router's configuration: one frozen dataclass, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from textgen.router.watermark import DEFAULT_WATERMARK_KEY, WatermarkConfig

API_KEY_ENV = "TEXTGEN_API_KEY"
"""One API key, from the environment: a flag's value is visible to every user in `ps`."""


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router is started with; `textgen-router` flags mirror these fields."""

    model_dir: str
    """Local directory holding the tokenizer and config.json (resolved by the launcher)."""
    master_shard_uds_path: str
    """Rank 0's unix socket path; the other shards are found through ServiceDiscovery."""
    model_id: str = ""
    """The name /info reports; defaults to model_dir."""
    hostname: str = "0.0.0.0"
    port: int = 8080
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    max_batch_prefill_tokens: int = 4145
    max_batch_total_tokens: int | None = None
    """KV tokens in flight at once; None means as many as the shards' cache holds."""
    max_batch_size: int | None = None
    max_concurrent_requests: int = 128
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    prefill_chunk_tokens: int | None = None
    """Prompt tokens a step computes while requests decode (chunked prefill); None: off."""
    prefix_caching: bool = True
    """Share the KV blocks of prompt prefixes between requests (`--no-prefix-caching`: off)."""
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    """Largest `top_n_tokens` a request may ask for (TGI's default)."""
    max_best_of: int = 2
    """Largest `best_of` (TGI's default); 1 turns best_of off."""
    max_new_tokens_default: int = 1024
    """max_new_tokens when a request gives none (TGI's default), capped by max_total_tokens."""
    payload_limit: int = 2_000_000
    """Largest request body in bytes; larger ones get 413."""
    json_output: bool = False
    otlp_endpoint: str | None = None
    """OTLP collector for traces: gRPC (http://host:4317) or HTTP (http://host:4318/v1/traces)."""
    otlp_service_name: str = "textgen"
    """Traces name the router `{otlp_service_name}.router`."""
    watermark_gamma: float = 0.5
    """Fraction of the vocabulary in each step's green list."""
    watermark_delta: float = 2.0
    """Bias added to green logits of requests with `parameters.watermark`."""
    watermark_key: str = DEFAULT_WATERMARK_KEY
    """Secret the green lists are seeded from; the default is public (see README)."""
    watermark_z_threshold: float = 4.0
    """z-score above which /watermark/detect says a text is watermarked."""
    disable_grammar_support: bool = False
    """Refuse `grammar`, `response_format` and tools (422, as TGI's flag)."""
    grammar_compile_timeout_s: float = 5.0
    """A grammar not compiled in this time is refused (422); it is cached once it is done."""

    api_key_file: str | None = None
    """File of API keys, one per line; with TEXTGEN_API_KEY (one key), what requests must carry."""
    cors_allow_origin: str | None = None
    """Comma-separated web origins allowed to call the router ("*": any); None: no CORS."""
    graceful_termination_timeout: float = 90.0
    """Seconds requests in flight may run after SIGTERM before they are ended (TGI's default)."""
    stream_keepalive_interval: float = 10.0
    """Seconds of silence after which an SSE stream gets a keep-alive comment."""

    def __post_init__(self) -> None:
        self.watermark  # noqa: B018 -- WatermarkConfig checks gamma, delta and the key
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("max_input_tokens must be < max_total_tokens")
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise ValueError("max_batch_prefill_tokens must be >= max_input_tokens")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.waiting_served_ratio < 0.0:
            raise ValueError("waiting_served_ratio must be >= 0")
        if self.max_best_of < 1 or self.max_top_n_tokens < 0:
            raise ValueError("max_best_of must be >= 1 and max_top_n_tokens >= 0")
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError("grammar_compile_timeout_s must be > 0")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be >= 1")
        if self.graceful_termination_timeout < 0 or self.stream_keepalive_interval <= 0:
            raise ValueError(
                "graceful_termination_timeout must be >= 0 and stream_keepalive_interval > 0"
            )

    @property
    def cors_allow_origins(self) -> tuple[str, ...]:
        origins = (self.cors_allow_origin or "").split(",")
        return tuple(origin.strip() for origin in origins if origin.strip())

    @property
    def watermark(self) -> WatermarkConfig:
        return WatermarkConfig(
            self.watermark_key,
            self.watermark_gamma,
            self.watermark_delta,
            self.watermark_z_threshold,
        )
