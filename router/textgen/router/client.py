"""gRPC client of the shards: every call goes to all of them at once.

Every shard runs the whole batch (tensor parallelism splits the work inside a
step), so a step is one concurrent call per shard; rank 0's reply carries the
generations. An error from any shard fails the step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from textgen.proto import generate_pb2 as pb
from textgen.proto.generate_pb2_grpc import TextGenerationServiceStub
from textgen.router.tracing import trace_metadata

# Prefill replies carry per-token logprobs for long prompts; keep well above gRPC's 4 MiB.
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]

T = TypeVar("T")


@dataclass(frozen=True)
class StepResult:
    generations: Sequence[pb.Generation]
    batch: pb.CachedBatch | None
    forward_ns: int
    total_ns: int
    decode_ns: int = 0
    """Sampling after the forward (TGI's "decode" timing)."""
    concat_ns: int = 0
    """Concatenating cached batches (Decode only)."""


class ShardClient:
    """The shards of one model, reached through rank 0's ServiceDiscovery."""

    def __init__(self, channels: list[grpc.aio.Channel]) -> None:
        self._channels = channels
        self._stubs = [TextGenerationServiceStub(channel) for channel in channels]

    @classmethod
    async def connect(cls, master_uds_path: str) -> ShardClient:
        master = grpc.aio.insecure_channel(f"unix://{master_uds_path}", options=_CHANNEL_OPTIONS)
        reply = await TextGenerationServiceStub(master).ServiceDiscovery(
            pb.ServiceDiscoveryRequest()
        )
        await master.close()
        channels = [grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS) for url in reply.urls]
        return cls(channels)

    @property
    def num_shards(self) -> int:
        return len(self._stubs)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def _all(self, method: str, request: object) -> list:
        return await self._start(method, request)

    def _start(self, method: str, request: object) -> Awaitable[list]:
        """Send `request` to every shard now; the awaitable gives their replies.

        The calls are created before this returns, so their sends are queued on the event
        loop ahead of anything the caller schedules next (see `Scheduler._publish`).
        """
        metadata = trace_metadata()
        calls = [getattr(stub, method)(request, metadata=metadata) for stub in self._stubs]
        return asyncio.gather(*calls)

    async def info(self) -> pb.InfoResponse:
        return (await self._all("Info", pb.InfoRequest()))[0]

    async def health(self) -> None:
        await self._all("Health", pb.HealthRequest())

    async def warmup(self, request: pb.WarmupRequest) -> int:
        """Run the largest step on every shard; return the KV blocks all of them can hold."""
        replies = await self._all("Warmup", request)
        return min(reply.num_blocks for reply in replies)

    # Prefill, Decode and FilterBatch are sent when called, not when awaited.

    def prefill(
        self,
        batch: pb.Batch,
        token_masks: Sequence[pb.TokenMask] = (),
        cached_batch: pb.CachedBatch | None = None,
    ) -> Awaitable[StepResult]:
        """Prefill `batch`; `cached_batch`, if given, decodes in the same forward."""
        request = pb.PrefillRequest(batch=batch, token_masks=token_masks, cached_batch=cached_batch)
        return _first(self._start("Prefill", request), _step_result)

    def decode(
        self, batches: list[pb.CachedBatch], token_masks: Sequence[pb.TokenMask] = ()
    ) -> Awaitable[StepResult]:
        request = pb.DecodeRequest(batches=batches, token_masks=token_masks)
        return _first(self._start("Decode", request), _step_result)

    def filter_batch(
        self, batch_id: int, request_ids: list[int]
    ) -> Awaitable[pb.CachedBatch | None]:
        request = pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        return _first(self._start("FilterBatch", request), _kept_batch)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest(id=batch_id))


async def _first(replies: Awaitable[list], convert: Callable[[Any], T]) -> T:
    """Rank 0's reply, converted (the shards' replies agree)."""
    return convert((await replies)[0])


def _kept_batch(reply: pb.FilterBatchResponse) -> pb.CachedBatch | None:
    return reply.batch if reply.HasField("batch") else None


def _step_result(reply: pb.PrefillResponse | pb.DecodeResponse) -> StepResult:
    batch = reply.batch if reply.HasField("batch") else None
    concat_ns = reply.concat_ns if isinstance(reply, pb.DecodeResponse) else 0
    return StepResult(
        reply.generations, batch, reply.forward_ns, reply.total_ns, reply.decode_ns, concat_ns
    )
