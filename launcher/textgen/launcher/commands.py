"""Command lines of the launcher's children: the shards and the router.

The supervisor only sees the `ChildCommands` protocol, so tests substitute
small stand-in programs without starting real shards.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from textgen.launcher.config import LauncherConfig, TokenLimits


class ChildCommands(Protocol):
    """The argv of each child process the supervisor starts."""

    def shard(self, rank: int) -> list[str]: ...

    def router(self) -> list[str]: ...


def shard_uds_path(base: str, rank: int) -> str:
    """The unix socket shard `rank` listens on (without the `unix://` scheme)."""
    return f"{base}-{rank}"


def console_script(name: str, module: str) -> list[str]:
    """Run `name` from this interpreter's environment.

    The console script next to sys.executable is the venv's own; without one
    (e.g. a source checkout on PYTHONPATH) import the entry point directly.
    """
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


@dataclass(frozen=True)
class TextgenCommands:
    """The real children: `textgen-server serve` per rank and `textgen-router`."""

    config: LauncherConfig
    model_dir: Path
    model_name: str  # what the router reports as model_id in /info and /v1/models
    limits: TokenLimits
    dtype: str
    master_port: int  # the rendezvous port, settled (config.master_port or a free one)
    num_threads: int | None = None  # CPU threads per shard; None: the shards' default

    def shard(self, rank: int) -> list[str]:
        c = self.config
        argv = [
            *console_script("textgen-server", "textgen.server.cli"),
            "serve", str(self.model_dir),
            "--uds-path", c.shard_uds_path,
            "--rank", str(rank),
            "--world-size", str(c.num_shard),
            "--dtype", self.dtype,
            "--kv-cache-memory-gib", str(c.kv_cache_memory_gib),
            "--master-addr", c.master_addr,
            "--master-port", str(self.master_port),
            *observability_flags(c),
        ]  # fmt: skip
        if c.int8_activations is not None:  # else the shard's platform decides
            argv += ["--int8-activations" if c.int8_activations else "--no-int8-activations"]
        if c.kv_cache_dtype != "auto":
            argv += ["--kv-cache-dtype", c.kv_cache_dtype]
        return argv + _optional("--num-threads", self.num_threads)

    def router(self) -> list[str]:
        c, limits = self.config, self.limits
        argv = [
            *console_script("textgen-router", "textgen.router.main"),
            "--model-dir", str(self.model_dir),
            "--model-id", self.model_name,
            "--port", str(c.port),
            "--hostname", c.hostname,
            "--master-shard-uds-path", shard_uds_path(c.shard_uds_path, 0),
            "--max-input-tokens", str(limits.max_input_tokens),
            "--max-total-tokens", str(limits.max_total_tokens),
            "--max-batch-prefill-tokens", str(limits.max_batch_prefill_tokens),
        ]  # fmt: skip
        argv += _optional("--max-batch-total-tokens", c.max_batch_total_tokens)
        argv += _optional("--max-batch-size", c.max_batch_size)
        argv += _optional("--prefill-chunk-tokens", c.prefill_chunk_tokens or None)
        argv += [
            "--max-concurrent-requests", str(c.max_concurrent_requests),
            "--waiting-served-ratio", str(c.waiting_served_ratio),
            "--max-waiting-tokens", str(c.max_waiting_tokens),
            "--max-stop-sequences", str(c.max_stop_sequences),
            "--max-top-n-tokens", str(c.max_top_n_tokens),
            "--max-best-of", str(c.max_best_of),
            "--payload-limit", str(c.payload_limit),
        ]  # fmt: skip
        argv += _watermark_args(c)
        if c.disable_grammar_support:
            argv.append("--disable-grammar-support")
        if not c.prefix_caching:
            argv.append("--no-prefix-caching")
        argv += ["--graceful-termination-timeout", str(c.graceful_termination_timeout)]
        argv += ["--stream-keepalive-interval", str(c.stream_keepalive_interval)]
        argv += _optional("--api-key-file", c.api_key_file)
        if c.cors_allow_origin:
            argv += ["--cors-allow-origin", ",".join(c.cors_allow_origin)]
        return argv + observability_flags(c)


def observability_flags(c: LauncherConfig) -> list[str]:
    """The same tracing and log flags for every child."""
    argv = _optional("--otlp-endpoint", c.otlp_endpoint)
    if c.otlp_endpoint is not None:
        argv += ["--otlp-service-name", c.otlp_service_name]
    return argv + (["--json-output"] if c.json_output else [])


def _optional(flag: str, value: int | str | Path | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _watermark_args(c: LauncherConfig) -> list[str]:
    """The watermark flags given to the launcher; the router checks them and has the defaults."""
    values = {
        "--watermark-gamma": c.watermark_gamma,
        "--watermark-delta": c.watermark_delta,
        "--watermark-key": c.watermark_key,
        "--watermark-z-threshold": c.watermark_z_threshold,
    }
    given = [(flag, value) for flag, value in values.items() if value is not None]
    return [arg for flag, value in given for arg in (flag, str(value))]
