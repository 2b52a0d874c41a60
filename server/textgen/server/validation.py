"""Checks of the router's requests against the shard's limits, before any tensor work.

A bad request must become an INVALID_ARGUMENT error, never an IndexError deep
in the forward (or, worse, a silent write into another request's slot).
"""

from __future__ import annotations

from dataclasses import dataclass

from textgen.proto import generate_pb2
from textgen.server.errors import InvalidRequestError


@dataclass(frozen=True)
class ShardLimits:
    vocab_size: int
    max_position: int
    block_size: int
    num_blocks: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def check_new_batch(batch: generate_pb2.Batch, live_batch_ids: set[int]) -> None:
    if batch.id in live_batch_ids:
        raise InvalidRequestError(f"batch {batch.id} already exists on the shard")
    if not batch.requests:
        raise InvalidRequestError(f"batch {batch.id} has no requests")
    ids = [r.id for r in batch.requests]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"batch {batch.id} repeats request ids")


def check_prefill_request(request: generate_pb2.Request, limits: ShardLimits) -> None:
    prompt_len = len(request.input_ids)
    where = f"request {request.id}"
    if prompt_len == 0:
        raise InvalidRequestError(f"{where}: empty input_ids")
    if max(request.input_ids) >= limits.vocab_size:
        raise InvalidRequestError(f"{where}: token id out of the vocabulary ({limits.vocab_size})")
    if prompt_len > limits.max_position:
        raise InvalidRequestError(f"{where}: {prompt_len} tokens exceed {limits.max_position}")
    if request.cache_len > prompt_len:
        raise InvalidRequestError(f"{where}: cache_len {request.cache_len} > {prompt_len}")
    if request.chunk_len and request.prefill_logprobs:
        raise InvalidRequestError(f"{where}: prefill_logprobs needs the prompt in one chunk")
    check_block_table(request.id, list(request.blocks), prompt_len, limits)
    if request.slots:
        if len(request.slots) != prompt_len:
            num_slots = len(request.slots)
            raise InvalidRequestError(f"{where}: {num_slots} slots for {prompt_len} tokens")
        if max(request.slots) >= limits.num_slots:
            raise InvalidRequestError(f"{where}: slot out of range ({limits.num_slots} slots)")


def check_block_table(
    request_id: int, blocks: list[int], num_tokens: int, limits: ShardLimits
) -> None:
    """The table must cover `num_tokens` positions with blocks the cache has."""
    if len(blocks) * limits.block_size < num_tokens:
        raise InvalidRequestError(
            f"request {request_id}: {len(blocks)} blocks of {limits.block_size} "
            f"cannot hold {num_tokens} tokens"
        )
    if blocks and max(blocks) >= limits.num_blocks:
        raise InvalidRequestError(
            f"request {request_id}: block id out of range ({limits.num_blocks} blocks)"
        )
    if num_tokens > limits.max_position:
        raise InvalidRequestError(
            f"request {request_id}: position {num_tokens - 1} is past the model's "
            f"{limits.max_position} positions"
        )


def check_warmup(request: generate_pb2.WarmupRequest, max_position: int) -> None:
    if not 0 < request.max_input_tokens <= request.max_total_tokens:
        raise InvalidRequestError("warmup needs 0 < max_input_tokens <= max_total_tokens")
    if request.max_total_tokens > max_position:
        raise InvalidRequestError(
            f"max_total_tokens {request.max_total_tokens} exceeds the model's "
            f"{max_position} positions"
        )
