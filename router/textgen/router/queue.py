"""The waiting queue and its admission policy (TGI's `next_batch`)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from textgen.router.allocator import BlockAllocator
from textgen.router.request import Entry


@dataclass(frozen=True)
class Budget:
    """Limits on the batch that `next_batch` may form."""

    min_size: int | None
    """Return nothing unless at least this many requests can go (None: any number)."""
    max_size: int | None
    prefill_tokens: int
    """Prompt tokens the prefill may compute."""
    total_tokens: int | None
    """KV tokens (prompt + max_new_tokens) the new requests may reserve; None: no limit."""
    whole_prompt_tokens: int | None = None
    """With chunking: a prompt that cannot be chunked and exceeds `prefill_tokens` still
    goes whole, alone, up to this many tokens (else it would wait for every decode)."""


class Queue:
    def __init__(self, allocator: BlockAllocator) -> None:
        self._allocator = allocator
        self._entries: deque[Entry] = deque()
        self._not_empty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        entry.timings.queued = time.monotonic()
        self._entries.append(entry)
        self._not_empty.set()

    async def wait(self) -> None:
        """Return once the queue holds at least one entry."""
        await self._not_empty.wait()

    def next_batch(self, budget: Budget, chunked: bool = False) -> list[Entry] | None:
        """Take the longest prefix of the queue that fits the budget, allocating its blocks.

        First come, first served: the head of the queue is never overtaken, so a
        large request cannot be starved by a stream of small ones. `chunked`: the
        first prompt that does not fit the prefill budget is taken too (all of its
        blocks reserved) when it can be prefilled in chunks, or whole and alone when
        it cannot (`whole_prompt_tokens`); either way it goes last.

        Prefix cache: each request is matched against the cache first; its cached
        blocks are shared, `entry.prefilled` starts after them, and only the rest
        counts against the prefill and KV budgets. A request whose next uncached
        block another request of this batch computes waits for the next step,
        which will find that block cached (the `n` copies of a prompt, or users
        sending one system prompt at once, compute it once).
        """
        self._drop_cancelled()
        batch: list[Entry] = []
        prefill_tokens = total_tokens = 0
        computing: set[int] = set()
        for entry in self._entries:
            request = entry.request
            if budget.max_size is not None and len(batch) >= budget.max_size:
                break
            cached = self._cached_prefix(entry)
            chain = self._block_chain(entry, len(cached))
            if chain and chain[0] in computing:
                break
            cached_tokens = len(cached) * self._allocator.block_size
            new_tokens = request.input_len - cached_tokens
            partial = prefill_tokens + new_tokens > budget.prefill_tokens
            if partial and batch and prefill_tokens >= budget.prefill_tokens:
                break  # the budget is spent: not even a chunk of this prompt fits
            if partial and not (chunked and chunkable(entry)):
                alone = not batch and chunked and budget.whole_prompt_tokens is not None
                if not (alone and new_tokens <= budget.whole_prompt_tokens):
                    break
            kv_tokens = request.max_total_tokens - cached_tokens
            if budget.total_tokens is not None and total_tokens + kv_tokens > budget.total_tokens:
                break
            if not self._allocator.can_allocate(request.max_total_tokens, cached):
                break
            entry.allocation = self._allocator.allocate(request.max_total_tokens, cached)
            entry.prefilled = cached_tokens
            prefill_tokens += new_tokens
            total_tokens += kv_tokens
            computing.update(chain)
            batch.append(entry)
            if partial:
                break
        if not batch or (budget.min_size is not None and len(batch) < budget.min_size):
            self._release(batch)
            return None
        for _ in batch:
            self._entries.popleft()
        self._update_event()
        return batch

    def _cached_prefix(self, entry: Entry) -> tuple[int, ...]:
        """The cached blocks the request may share: at least its last prompt token is left
        to compute (its logits start the generation); none when every prompt token's
        logprob is wanted (decoder_input_details: the prompt is computed whole)."""
        if not chunkable(entry):
            return ()
        request = entry.request
        return self._allocator.lookup(request.input_ids, request.input_len - 1)

    def _block_chain(self, entry: Entry, start: int) -> list[int]:
        """A key for each full prompt block from block `start` on, naming the block with
        everything before it (equal keys: the same KV)."""
        if not self._allocator.prefix_caching:
            return []
        ids, bs = entry.request.input_ids, self._allocator.block_size
        keys, key = [], hash(tuple(ids[: start * bs]))
        for index in range(start, (len(ids) - 1) // bs):
            key = hash((key, ids[index * bs : (index + 1) * bs]))
            keys.append(key)
        return keys

    def _release(self, batch: list[Entry]) -> None:
        for entry in batch:
            if entry.allocation is not None:
                self._allocator.free(entry.allocation)
                entry.allocation = None
                entry.prefilled = 0

    def _drop_cancelled(self) -> None:
        if any(entry.cancelled for entry in self._entries):
            self._entries = deque(e for e in self._entries if not e.cancelled)
            self._update_event()

    def _update_event(self) -> None:
        if self._entries:
            self._not_empty.set()
        else:
            self._not_empty.clear()


def chunkable(entry: Entry) -> bool:
    """A prompt may be prefilled in chunks unless its per-token logprobs are wanted."""
    return not entry.request.decoder_input_details
