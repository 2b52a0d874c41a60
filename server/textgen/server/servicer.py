"""The gRPC servicer: transport only, the work is in `Shard`.

RPCs that touch the model or batches are serialised by one lock and run in
one worker thread, so the event loop stays free to answer Health during a
long forward. Errors become status codes; the process never dies of a bad
request. After a Prefill or Decode, the shard's run-ahead step (see `Shard`)
takes the lock next, while the reply is on its way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from textgen.proto import generate_pb2, generate_pb2_grpc
from textgen.server.errors import InvalidRequestError, NotReadyError
from textgen.server.shard import Shard
from textgen.server.tracing import ShardTracing

logger = logging.getLogger(__name__)

T = TypeVar("T")

_STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotReadyError: grpc.StatusCode.FAILED_PRECONDITION,
}


class TextGenerationServicer(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(
        self,
        shard: Shard,
        executor: ThreadPoolExecutor | None = None,
        tracing: ShardTracing | None = None,
    ) -> None:
        self.shard = shard
        self._tracing = tracing or ShardTracing.disabled()
        self._lock = asyncio.Lock()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="textgen-forward")
        self._ahead: set[asyncio.Task] = set()  # run-ahead steps under way

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def Info(self, request, context) -> generate_pb2.InfoResponse:
        return self.shard.info()

    async def Health(self, request, context) -> generate_pb2.HealthResponse:
        return generate_pb2.HealthResponse()

    async def ServiceDiscovery(self, request, context) -> generate_pb2.ServiceDiscoveryResponse:
        return generate_pb2.ServiceDiscoveryResponse(urls=self.shard.config.shard_urls())

    async def ClearCache(self, request, context) -> generate_pb2.ClearCacheResponse:
        batch_id = request.id if request.HasField("id") else None
        await self._run(context, lambda: self.shard.clear_cache(batch_id))
        return generate_pb2.ClearCacheResponse()

    async def FilterBatch(self, request, context) -> generate_pb2.FilterBatchResponse:
        ids = list(request.request_ids)
        batch = await self._run(context, lambda: self.shard.filter_batch(request.batch_id, ids))
        return generate_pb2.FilterBatchResponse(batch=batch)

    async def Warmup(self, request, context) -> generate_pb2.WarmupResponse:
        return await self._run(context, lambda: self.shard.warmup(request))

    async def Prefill(self, request, context) -> generate_pb2.PrefillResponse:
        with self._tracing.rpc("Prefill", context) as span:
            cached = request.cached_batch if request.HasField("cached_batch") else None
            reply = await self._run(
                context,
                lambda: self.shard.prefill(request.batch, request.token_masks, cached),
            )
            self._tracing.phases(span, reply)
        self._run_ahead()
        return reply

    async def Decode(self, request, context) -> generate_pb2.DecodeResponse:
        with self._tracing.rpc("Decode", context) as span:
            batches, masks = list(request.batches), request.token_masks
            reply = await self._run(
                context,
                lambda: self.shard.decode(batches, masks),
                ready=lambda: self.shard.computed_ahead(batches, masks),
            )
            self._tracing.phases(span, reply, reply.concat_ns)
        self._run_ahead()
        return reply

    def _run_ahead(self) -> None:
        """Queue the shard's run-ahead step behind the lock, if it has one to take."""
        if not self.shard.can_run_ahead:
            return
        task = asyncio.get_running_loop().create_task(self._ahead_step())
        self._ahead.add(task)
        task.add_done_callback(self._ahead.discard)

    async def _ahead_step(self) -> None:
        async with self._lock:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.shard.run_ahead
                )
            except Exception:  # the batch is as it was: the router's Decode computes it
                logger.exception("run-ahead step failed")

    async def _run(
        self, context, work: Callable[[], T], ready: Callable[[], T | None] = lambda: None
    ) -> T:
        """Run `work` alone on the worker thread; map its errors to a status code.

        `ready`, asked first under the lock: a result already at hand (no thread hop).
        """
        async with self._lock:
            try:
                answer = ready()
                if answer is not None:
                    return answer
                return await asyncio.get_running_loop().run_in_executor(self._executor, work)
            except tuple(_STATUS_CODES) as e:
                code = next(c for t, c in _STATUS_CODES.items() if isinstance(e, t))
                logger.warning("%s: %s", code.name, e)
                await context.abort(code, str(e))
            except Exception as e:
                logger.exception("internal error")
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("context.abort returned")  # pragma: no cover
