"""Start-up and shutdown of one shard process: load, bind, serve until signalled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from textgen.proto import generate_pb2_grpc
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.servicer import TextGenerationServicer
from textgen.server.shard import Shard
from textgen.server.tracing import ShardTracing

logger = logging.getLogger(__name__)

# Prefill logprobs of long prompts exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 2**20
SHUTDOWN_GRACE_S = 5.0


async def serve(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT; the socket file is removed on the way out."""
    # NOTE: the platform is decided here, once; only CPU exists so far. A CUDA
    # platform takes device cuda:{rank} and the nccl backend.
    device = torch.device("cpu")
    group = ParallelGroup.initialize(
        config.rank, config.world_size, config.master_addr, config.master_port, backend="gloo"
    )
    # NOTE: the model is loaded on the thread that will run every forward. torch work
    # on a second thread leaves an OpenMP team behind that slows the forward thread's
    # own team down (decode at batch 1 with 2 threads: 23 ms vs 28.5 ms measured).
    executor = ThreadPoolExecutor(1, thread_name_prefix="textgen-forward")
    try:
        loading = executor.submit(_load, config, group, device)
        shard = await asyncio.wrap_future(loading)
        logger.info("loaded %s from %s", shard.runner.config.model_type, config.model_dir)
        with _signals_set(asyncio.Event()) as stop:
            await run_server(config, shard, stop, executor)
    finally:
        executor.shutdown(wait=True)
        group.shutdown()


def _load(config: ServerConfig, group: ParallelGroup, device: torch.device) -> Shard:
    """On the forward thread: its thread count (OpenMP's is per thread), then the model."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    return Shard.load(config, group, device)


async def run_server(
    config: ServerConfig,
    shard: Shard,
    stop: asyncio.Event,
    executor: ThreadPoolExecutor | None = None,
) -> None:
    """Serve `shard` on its unix socket until `stop` is set; model work runs on `executor`."""
    tracing = ShardTracing.from_endpoint(
        config.otlp_endpoint, f"{config.otlp_service_name}.server", config.rank
    )
    servicer = TextGenerationServicer(shard, executor=executor, tracing=tracing)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    _remove_socket(config.socket_path)  # a stale file from a killed shard blocks the bind
    server.add_insecure_port(f"unix://{config.socket_path}")
    await server.start()
    logger.info("serving on unix://%s", config.socket_path)
    try:
        await stop.wait()
        logger.info("stopping")
        await server.stop(SHUTDOWN_GRACE_S)
    finally:
        servicer.close()
        tracing.shutdown()
        _remove_socket(config.socket_path)


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event) -> Iterator[asyncio.Event]:
    """Set `stop` on SIGTERM or SIGINT while inside the block."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
