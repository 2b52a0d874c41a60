"""`textgen-router`: connect to the shards, warm them up, serve HTTP."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from textgen.proto import generate_pb2 as pb
from textgen.router import __version__
from textgen.router.allocator import BlockAllocator
from textgen.router.client import ShardClient
from textgen.router.config import API_KEY_ENV, RouterConfig
from textgen.router.grammar import GrammarCompiler, GrammarConfig
from textgen.router.http.app import RouterState, build_app
from textgen.router.http.guard import AccessPolicy, Lifecycle, read_key_file
from textgen.router.http.server import make_server
from textgen.router.infer import Infer
from textgen.router.logs import setup_logging
from textgen.router.metrics import make_registry
from textgen.router.queue import Queue
from textgen.router.request import TokenizerInfo
from textgen.router.scheduler import Scheduler, SchedulerConfig
from textgen.router.telemetry import RouterMetrics, TokenLimits
from textgen.router.tracing import RouterTracing, wrap_app
from textgen.router.validation import Validation, ValidationLimits
from textgen.router.watermark import Detector

logger = logging.getLogger("textgen.router")


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser("textgen-router", description=__doc__)
    for field in dataclasses.fields(RouterConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = field.type if isinstance(field.type, str) else field.type.__name__
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        else:
            parse = float if "float" in kind else int if "int" in kind else str
            parser.add_argument(flag, type=parse, default=field.default)
    args = parser.parse_args(argv)
    try:
        return RouterConfig(**vars(args))
    except ValueError as error:
        parser.error(str(error))


def load_tokenizer(model_dir: str) -> TokenizerInfo:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.exists():
        configured = json.loads(generation_config.read_text()).get("eos_token_id")
        eos |= set(configured if isinstance(configured, list) else [configured]) - {None}
    return TokenizerInfo(tokenizer, frozenset(eos), frozenset(tokenizer.all_special_ids))


async def start(config: RouterConfig, tracing: RouterTracing | None = None) -> RouterState:
    """Connect to the shards, size the KV cache through Warmup, and start the batching loop."""
    client = await ShardClient.connect(config.master_shard_uds_path)
    shard_info = await client.info()
    logger.info("connected to %d shard(s); warming up", client.num_shards)
    started = time.monotonic()
    num_blocks = await client.warmup(
        pb.WarmupRequest(
            max_input_tokens=config.max_input_tokens,
            max_total_tokens=config.max_total_tokens,
            max_prefill_tokens=config.max_batch_prefill_tokens,
            max_batch_size=config.max_batch_size or 0,
        )
    )
    allocator = BlockAllocator(num_blocks, shard_info.block_size, config.prefix_caching)
    max_batch_total_tokens = _max_batch_total_tokens(config, allocator)
    logger.info(
        "warmup done in %.1fs: %d KV blocks of %d tokens, max_batch_total_tokens=%d",
        time.monotonic() - started,
        num_blocks,
        shard_info.block_size,
        max_batch_total_tokens,
    )
    queue = Queue(allocator)
    registry = CollectorRegistry(auto_describe=True)
    metrics = RouterMetrics(registry, TokenLimits(config.max_input_tokens, config.max_total_tokens))
    scheduler_config = SchedulerConfig(
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        max_batch_total_tokens=max_batch_total_tokens,
        max_batch_size=config.max_batch_size,
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        watermark=config.watermark,
    )
    tokenizer = load_tokenizer(config.model_dir)
    grammar = await _grammar_compiler(config, tokenizer, shard_info.vocab_size)
    scheduler = Scheduler(client, queue, allocator, scheduler_config, metrics, tracing, grammar)
    validation = Validation(
        lambda text, add_special_tokens=True: tokenizer.tokenizer(
            text, add_special_tokens=add_special_tokens
        )["input_ids"],
        ValidationLimits(
            max_input_tokens=config.max_input_tokens,
            max_total_tokens=config.max_total_tokens,
            max_stop_sequences=config.max_stop_sequences,
            max_top_n_tokens=config.max_top_n_tokens,
            max_new_tokens_default=config.max_new_tokens_default,
            max_best_of=config.max_best_of,
        ),
        grammar,
    )
    infer = Infer(validation, queue, tokenizer, config.max_concurrent_requests, metrics, tracing)
    info = _info(config, shard_info, max_batch_total_tokens)
    make_registry(queue, scheduler, allocator, registry)
    detector = Detector(config.watermark, _encode_plain(tokenizer), shard_info.vocab_size)
    return RouterState(
        infer,
        scheduler,
        client,
        info,
        config.payload_limit,
        registry,
        detector=detector,
        stream_keepalive_s=config.stream_keepalive_interval,
    )


def _encode_plain(tokenizer: TokenizerInfo) -> Callable[[str], list[int]]:
    """Token ids of a text without the special tokens a prompt would get (e.g. BOS)."""
    return lambda text: tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]


async def _grammar_compiler(
    config: RouterConfig, tokenizer: TokenizerInfo, vocab_size: int
) -> GrammarCompiler | None:
    if config.disable_grammar_support:
        return None
    grammar_config = GrammarConfig(compile_timeout_s=config.grammar_compile_timeout_s)
    return await asyncio.to_thread(
        GrammarCompiler.from_hf,
        tokenizer.tokenizer,
        vocab_size,
        tokenizer.eos_token_ids,
        grammar_config,
    )


def _max_batch_total_tokens(config: RouterConfig, allocator: BlockAllocator) -> int:
    capacity = allocator.max_tokens
    if config.max_total_tokens > capacity:
        raise SystemExit(
            f"error: the KV cache holds {capacity} tokens, less than --max-total-tokens "
            f"{config.max_total_tokens}; raise the shard's KV memory or lower the limit"
        )
    if config.max_batch_total_tokens is None:
        return capacity
    if config.max_batch_total_tokens > capacity:
        logger.warning(
            "--max-batch-total-tokens %d exceeds the KV cache (%d tokens); using %d",
            config.max_batch_total_tokens,
            capacity,
            capacity,
        )
        return capacity
    return config.max_batch_total_tokens


def _info(config: RouterConfig, shard: pb.InfoResponse, max_batch_total_tokens: int) -> dict:
    return {
        "model_id": config.model_id or config.model_dir,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "model_dtype": shard.dtype,
        "model_device_type": shard.device_type,
        "max_concurrent_requests": config.max_concurrent_requests,
        "max_best_of": config.max_best_of,
        "max_stop_sequences": config.max_stop_sequences,
        "max_input_tokens": config.max_input_tokens,
        "max_total_tokens": config.max_total_tokens,
        "max_batch_total_tokens": max_batch_total_tokens,
        "max_waiting_tokens": config.max_waiting_tokens,
        "max_batch_size": config.max_batch_size,
        "waiting_served_ratio": config.waiting_served_ratio,
        "prefix_caching": config.prefix_caching,
        "prefill_chunk_tokens": config.prefill_chunk_tokens,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "textgen-router",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }


def make_lifespan(
    config: RouterConfig, tracing: RouterTracing | None = None, lifecycle: Lifecycle | None = None
) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await start(config, tracing)
        app.state.router = state
        if lifecycle is not None:
            lifecycle.abort = state.infer.abort_all
        loop_task = asyncio.create_task(state.scheduler.run(), name="batching-loop")
        loop_task.add_done_callback(_exit_if_loop_died)
        try:
            yield
        finally:
            loop_task.remove_done_callback(_exit_if_loop_died)
            loop_task.cancel()
            await state.client.close()
            if tracing is not None:
                tracing.shutdown()

    return lifespan


def _exit_if_loop_died(task: Any) -> None:
    # The batching loop never returns; if it raised, the router cannot serve anything.
    if not task.cancelled() and task.exception() is not None:
        logger.critical("batching loop died", exc_info=task.exception())
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging(config.json_output)
    tracing = RouterTracing.from_endpoint(
        config.otlp_endpoint, f"{config.otlp_service_name}.router"
    )
    lifecycle = Lifecycle()
    try:
        policy = access_policy(config)
    except OSError as error:
        raise SystemExit(f"error: cannot read --api-key-file: {error}") from None
    app = build_app(make_lifespan(config, tracing, lifecycle), policy, lifecycle)
    server = make_server(
        wrap_app(app, tracing),
        config.hostname,
        config.port,
        lifecycle,
        config.graceful_termination_timeout,
    )
    server.run()


def access_policy(config: RouterConfig) -> AccessPolicy:
    keys = [os.environ.get(API_KEY_ENV, "").strip()]
    if config.api_key_file is not None:
        keys += read_key_file(config.api_key_file)
    return AccessPolicy(
        api_keys=tuple(key for key in keys if key),
        cors_allow_origins=config.cors_allow_origins,
    )
