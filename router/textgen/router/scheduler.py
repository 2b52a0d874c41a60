"""Continuous batching: the loop that drives the shards.

Design note. One batch runs on the shards at a time. Between two decode steps
the loop asks the queue for newcomers; if any fit (TGI's policy, below) the next
step is a mixed one: a Prefill that carries the running batch, so the running
requests take their decode step in the same forward as the newcomers' prompts
and the shards return one batch holding both. A request thus joins the running
batch instead of waiting for it to drain, and the decodes ride along with the
prefill's large matrix products instead of waiting for them. After every step
each generated token goes to its request's entry, which decides whether it is
finished (EOS, stop sequence, length); its stream gets the token once the next step
has been sent to the shards (see `_publish`). Finished and cancelled requests leave the
batch through FilterBatch before the next step, and their KV blocks return to
the allocator at once.

Admission (TGI's `waiting_served_ratio` / `max_waiting_tokens`): while a
batch runs, newcomers are prefilled only when there are at least
`batch_size * waiting_served_ratio` of them, or when they have waited
`max_waiting_tokens` decode steps, whichever comes first, within the prefill
token budget and the KV budget. A mixed step lasts as long as its prefill, so
this trades the running requests' inter-token latency against the newcomers'
time to first token.

Chunked prefill (`prefill_chunk_tokens`): while requests are decoding, a step
computes at most that many prompt tokens, so no decode step waits behind a
whole prompt. A prompt that does not fit the step's budget is admitted with the
part that does (its KV blocks reserved whole) and continues in the next steps,
ahead of any newcomer, until its last chunk yields its first token. With no
request decoding the budget is `max_batch_prefill_tokens`, and the last prompt
that does not fit is chunked too, so a step fills its budget. A prompt that
cannot be chunked (its prompt logprobs are wanted) goes whole, in a step of its
own, rather than wait for every decode to end. While a prompt is part-way
through, a newcomer whose whole prompt fits in half the step's budget goes
first, so a short request waits one step, not every chunk of a long prompt.

Prefix cache (allocator.py): on admission the queue matches each prompt against
the cache; its cached blocks are shared and the request starts as if those
tokens were an earlier chunk (`entry.prefilled`), so the step plan, the shard's
`cache_len` and the budgets (which count only the tokens still to compute and
the blocks still to fill) treat a cached prefix and a computed chunk alike.
After every prefill step the blocks it completed are named in the cache, and a
request that ends leaves the blocks its output filled. A step's work is one
`StepPlan`: the chunks it computes (continued ones first), each with the
position it starts from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from textgen.proto import generate_pb2 as pb
from textgen.router.allocator import BlockAllocator
from textgen.router.client import ShardClient, StepResult
from textgen.router.errors import GenerationError
from textgen.router.grammar import GrammarCompiler
from textgen.router.queue import Budget, Queue, chunkable
from textgen.router.request import Entry, Token
from textgen.router.telemetry import RouterMetrics
from textgen.router.tracing import RouterTracing
from textgen.router.watermark import WatermarkConfig

logger = logging.getLogger("textgen.router.scheduler")
T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int | None
    max_batch_size: int | None
    waiting_served_ratio: float
    max_waiting_tokens: int
    prefill_chunk_tokens: int | None = None
    """Prompt tokens per step while requests decode; None: whole prompts, no chunks."""
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    """Key, gamma and delta sent with requests that ask for `watermark`."""


@dataclass(frozen=True)
class PrefillChunk:
    """What one request's prompt computes in a step: positions `start` to `start + length`."""

    entry: Entry
    start: int
    """Prompt tokens already in the KV cache: shared from the prefix cache or computed by
    earlier chunks (the shard's `cache_len`)."""
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length >= self.entry.request.input_len


@dataclass(frozen=True)
class StepPlan:
    """The prompt work of one step: every chunk it computes, continued chunks first.

    `newcomers` left the queue for this step, their blocks allocated (cached ones first).
    """

    chunks: tuple[PrefillChunk, ...]
    newcomers: tuple[Entry, ...]

    @property
    def entries(self) -> list[Entry]:
        return [chunk.entry for chunk in self.chunks]


@dataclass
class RunningBatch:
    """A batch cached on the shards and the entries of its requests, in the same set."""

    cached: pb.CachedBatch
    entries: dict[int, Entry]
    delivered_at: float = 0.0
    """Monotonic time its requests got their last token (inter-token latency starts here)."""

    @property
    def max_tokens(self) -> int:
        return sum(entry.request.max_total_tokens for entry in self.entries.values())

    @property
    def kv_tokens(self) -> int:
        return sum(kv_tokens(entry) for entry in self.entries.values())


class Scheduler:
    def __init__(
        self,
        client: ShardClient,
        queue: Queue,
        allocator: BlockAllocator,
        config: SchedulerConfig,
        metrics: RouterMetrics | None = None,
        tracing: RouterTracing | None = None,
        grammar: GrammarCompiler | None = None,
    ) -> None:
        self._client = client
        self._grammar = grammar
        self._queue = queue
        self._allocator = allocator
        self._config = config
        self._watermark = config.watermark.to_proto()
        self._batch_ids = itertools.count()
        self._prefilling: list[Entry] = []
        """Admitted requests whose prompt is part-way through a chunked prefill."""
        self._held: list[Entry] = []
        """Entries whose new tokens wait for `_publish` (sent after the next step's request)."""
        self.last_step_ok = 0.0
        """Monotonic time of the last step that succeeded (read by /health)."""
        self.num_running = 0
        self.current_max_tokens = 0
        self._metrics = metrics or RouterMetrics.standalone()
        self._tracing = tracing or RouterTracing.disabled()

    async def run(self) -> None:
        while True:
            await self._queue.wait()
            if not await self._run_until_empty():
                # Nothing could start (only cancelled entries, or no KV room): poll.
                await asyncio.sleep(0.01)

    async def _run_until_empty(self) -> bool:
        """Step until nothing runs or is being prefilled; False if no step ran."""
        running: RunningBatch | None = None
        waiting_steps = 0
        stepped = False
        while True:
            self.num_running = len(running.entries) if running is not None else 0
            self.current_max_tokens = running.max_tokens if running is not None else 0
            plan = self._next_prefill(running, waiting_steps)
            if plan.chunks:
                reason = None
                if running is not None:
                    waited_out = waiting_steps >= self._config.max_waiting_tokens
                    reason = "wait_exceeded" if waited_out else "backpressure"
                    running = await self._drop_done(running)
                # NOTE: queued requests wait on while only continued chunks run.
                waiting_steps = 0 if plan.newcomers else waiting_steps + 1
                running = await self._prefill(plan, reason, running)
            elif running is not None:
                running = await self._decode(running)
                waiting_steps += 1
            else:
                break
            stepped = True
        self._publish()
        self.num_running = 0
        self.current_max_tokens = 0
        return stepped

    def _next_prefill(self, running: RunningBatch | None, waiting_steps: int) -> StepPlan:
        """The next step's prompt work: continued chunks, and newcomers from the queue.

        While a long prompt is part-way through, newcomers whose whole prompt fits in
        half the step's budget go first, so a short request is not held behind every
        chunk of a long one; the long prompt keeps at least the other half, so a flow
        of short requests cannot starve it.
        """
        for entry in [e for e in self._prefilling if e.cancelled]:
            self._prefilling.remove(entry)
            self._release(entry)
        budget = self._budget(running, waiting_steps)
        tokens = budget.prefill_tokens
        newcomers: list[Entry] = []
        if self._prefilling:
            # NOTE: no waiting_served_ratio here: this step prefills anyway, so joining it
            # costs the running requests no extra pause.
            half = tokens - tokens // 2
            short = dataclasses.replace(budget, prefill_tokens=half, min_size=None)
            newcomers = self._queue.next_batch(short, chunked=False) or []
            tokens -= sum(entry.request.input_len - entry.prefilled for entry in newcomers)
        chunks = [
            PrefillChunk(e, e.prefilled, e.request.input_len - e.prefilled) for e in newcomers
        ]
        for entry in self._prefilling:
            if tokens > 0:
                length = min(entry.request.input_len - entry.prefilled, tokens)
                chunks.append(PrefillChunk(entry, entry.prefilled, length))
                tokens -= length
        if tokens > 0 and not newcomers:
            chunked = self._config.prefill_chunk_tokens is not None
            budget = dataclasses.replace(budget, prefill_tokens=tokens)
            newcomers = self._queue.next_batch(budget, chunked) or []
            for entry in newcomers:
                rest = entry.request.input_len - entry.prefilled  # after its cached blocks
                length = min(rest, tokens) if chunkable(entry) else rest
                chunks.append(PrefillChunk(entry, entry.prefilled, length))
                tokens -= length
        for entry in newcomers:
            self._metrics.prefix_cache_used(entry)
        return StepPlan(tuple(chunks), tuple(newcomers))

    def _budget(self, running: RunningBatch | None, waiting_steps: int) -> Budget:
        config = self._config
        total = config.max_batch_total_tokens
        reserved = sum(kv_tokens(entry) for entry in self._prefilling)
        if total is not None:
            total -= reserved
        if running is None:
            max_size = config.max_batch_size
            if max_size is not None:
                max_size -= len(self._prefilling)
            return Budget(None, max_size, config.max_batch_prefill_tokens, total)
        size = len(running.entries)
        min_size = None
        if waiting_steps < config.max_waiting_tokens:
            min_size = int(size * config.waiting_served_ratio)
        max_size = None
        if config.max_batch_size is not None:
            max_size = config.max_batch_size - size - len(self._prefilling)
        if total is not None:
            total -= running.kv_tokens
        prefill_tokens = config.max_batch_prefill_tokens
        if config.prefill_chunk_tokens is not None:
            prefill_tokens = min(prefill_tokens, config.prefill_chunk_tokens)
        whole = config.max_batch_prefill_tokens
        return Budget(min_size, max_size, prefill_tokens, total, whole_prompt_tokens=whole)

    async def _prefill(
        self,
        plan: StepPlan,
        concat_reason: str | None = None,
        running: RunningBatch | None = None,
    ) -> RunningBatch | None:
        """Compute the plan's chunks; a `running` batch decodes in the same forward."""
        now = time.monotonic()
        newcomers, entries = list(plan.newcomers), plan.entries
        for entry in newcomers:
            entry.timings.batched = now
        self._tracing.queued(newcomers)
        if newcomers:
            self._metrics.batch_formed(len(newcomers), concat_reason)
        batch = pb.Batch(
            id=next(self._batch_ids),
            requests=[_to_proto(chunk, self._watermark) for chunk in plan.chunks],
            size=len(entries),
            max_tokens=sum(entry.request.max_total_tokens for entry in entries),
        )
        everyone = dict(running.entries) if running is not None else {}
        everyone.update((entry.id, entry) for entry in entries)
        batch_ids = [batch.id] + ([running.cached.id] if running is not None else [])
        self._metrics.step_started("prefill")
        try:
            with self._tracing.step("prefill", entries):
                masks = self._token_masks(everyone.values())
                cached = running.cached if running is not None else None
                result = await self._sent(self._client.prefill(batch, masks, cached))
        except Exception as error:  # a shard error, or a bug: fail the step, keep serving
            self._metrics.step_failed("prefill")
            self._prefilling = [e for e in self._prefilling if e.id not in everyone]
            await self._fail(list(everyone.values()), batch_ids, error)
            return None
        delivered = time.monotonic()
        if running is not None:
            self._metrics.tokens_waited(delivered - running.delivered_at, len(running.entries))
        for chunk in plan.chunks:
            entry = chunk.entry
            entry.prefilled = chunk.start + chunk.length
            self._cache_computed(entry)
            if not chunk.completes_prompt:  # more chunks to come
                del everyone[entry.id]
                if entry not in self._prefilling:
                    self._prefilling.append(entry)
            elif entry in self._prefilling:
                self._prefilling.remove(entry)
        joined = await self._advance(everyone, result)
        self._metrics.step_done("prefill", result, now, delivered)
        return joined

    async def _decode(self, running: RunningBatch) -> RunningBatch | None:
        live = await self._drop_done(running)
        if live is None:
            return None
        entries = live.entries
        started = time.monotonic()
        self._metrics.step_started("decode")
        try:
            with self._tracing.step("decode", entries.values()):
                masks = self._token_masks(entries.values())
                result = await self._sent(self._client.decode([live.cached], masks))
        except Exception as error:  # a shard error, or a bug: fail the step, keep serving
            self._metrics.step_failed("decode")
            await self._fail(list(entries.values()), [live.cached.id], error)
            return None
        delivered = time.monotonic()
        self._metrics.tokens_waited(delivered - live.delivered_at, len(entries))
        joined = await self._advance(entries, result)
        self._metrics.step_done("decode", result, started, delivered)
        return joined

    async def _advance(self, entries: dict[int, Entry], result: StepResult) -> RunningBatch | None:
        self.last_step_ok = time.monotonic()
        for generation in result.generations:
            entry = entries[generation.request_id]
            if not entry.done:
                _deliver(entry, generation)
                self._held.append(entry)
        if result.batch is None:
            return None
        return await self._drop_done(RunningBatch(result.batch, entries, self.last_step_ok))

    async def _drop_done(self, running: RunningBatch) -> RunningBatch | None:
        """Free finished and cancelled requests and filter them out of the shards' batch."""
        done = [entry for entry in running.entries.values() if entry.done]
        if not done:
            return running
        for entry in done:
            self._release(entry)
            del running.entries[entry.id]
        try:
            filtered = self._client.filter_batch(running.cached.id, list(running.entries))
            cached = await self._sent(filtered)
        except grpc.aio.AioRpcError as error:
            await self._fail(list(running.entries.values()), [running.cached.id], error)
            return None
        if cached is None or not running.entries:
            return None
        return RunningBatch(cached, running.entries, running.delivered_at)

    async def _fail(self, entries: list[Entry], batch_ids: list[int], error: Exception) -> None:
        self._publish()
        if isinstance(error, grpc.aio.AioRpcError):
            message = error.details()
            logger.error("step failed for %d request(s): %s", len(entries), message)
        else:
            message = f"{type(error).__name__}: {error}"
            logger.exception("step failed for %d request(s)", len(entries), exc_info=error)
        for entry in entries:
            entry.fail(GenerationError(f"Request failed during generation: {message}"))
            self._release(entry, keep=False)
        for batch_id in batch_ids:
            try:
                await self._client.clear_cache(batch_id)
            except grpc.aio.AioRpcError as clear_error:
                logger.error("clearing batch %d failed: %s", batch_id, clear_error.details())

    async def _sent(self, reply: Awaitable[T]) -> T:
        """Await a shard call already sent, handing out the held tokens meanwhile."""
        self._publish()
        return await reply

    def _publish(self) -> None:
        """Hand the last step's tokens to the requests' streams.

        Called once the next request to the shards has been created (`_sent`): the
        wake-ups of the streaming handlers (which format and write every request's
        event) then queue behind that request's send on the event loop, so the shards
        start the next step at once and the handlers run while it computes.
        """
        for entry in self._held:
            entry.release()
        self._held.clear()

    def _token_masks(self, entries: Iterable[Entry]) -> list[pb.TokenMask]:
        """The next step's allowed tokens of every request that has a grammar."""
        guides = [(entry.id, entry.guide) for entry in entries if entry.guide is not None]
        if not guides:
            return []
        assert self._grammar is not None, "validation compiles grammars only when enabled"
        return self._grammar.token_masks(guides)

    def _cache_computed(self, entry: Entry) -> None:
        """Name in the prefix cache the request's full blocks whose KV is computed."""
        if entry.allocation is not None:
            tokens, computed = entry.computed_tokens()
            self._allocator.cache(entry.allocation, tokens, computed)

    def _release(self, entry: Entry, keep: bool = True) -> None:
        """Free the request's blocks; with `keep`, its computed blocks stay in the prefix
        cache (a request whose step failed keeps nothing)."""
        if entry.allocation is not None:
            if keep:
                self._cache_computed(entry)
            self._allocator.free(entry.allocation)
            entry.allocation = None


def kv_tokens(entry: Entry) -> int:
    """KV tokens the request may come to hold in blocks of its own (not shared)."""
    cached = entry.allocation.cached_tokens if entry.allocation is not None else 0
    return entry.request.max_total_tokens - cached


def _to_proto(chunk: PrefillChunk, watermark: pb.WatermarkParameters) -> pb.Request:
    entry, request = chunk.entry, chunk.entry.request
    assert entry.allocation is not None, "the queue allocates blocks before batching"
    message = pb.Request(
        id=entry.id,
        input_ids=request.input_ids,
        parameters=request.sampling_proto(entry.info.eos_token_ids),
        top_n_tokens=request.top_n_tokens,
        blocks=entry.allocation.blocks,
        slots=entry.allocation.slots(request.input_len),
        prefill_logprobs=request.decoder_input_details,
        max_new_tokens=request.stopping.max_new_tokens,
        watermark=watermark if request.watermark else None,
        cache_len=chunk.start,
        chunk_len=0 if chunk.completes_prompt else chunk.length,
    )
    message.parameters.logit_bias.update(request.logit_bias)
    return message


def _deliver(entry: Entry, generation: pb.Generation) -> None:
    if entry.request.decoder_input_details and generation.HasField("prefill_tokens"):
        prefill = generation.prefill_tokens
        entry.set_prefill(list(prefill.ids), list(prefill.logprobs))
    tokens = generation.tokens
    for index, (token_id, logprob) in enumerate(zip(tokens.ids, tokens.logprobs, strict=True)):
        top: tuple[Token, ...] = ()
        if index < len(generation.top_tokens):
            top = _top_tokens(entry, generation.top_tokens[index])
        entry.add_token(token_id, logprob, top, hold=True)
        if entry.done:
            break


def _top_tokens(entry: Entry, tokens: pb.Tokens) -> tuple[Token, ...]:
    info = entry.info
    decode = info.tokenizer.decode
    return tuple(
        info.token(i, decode([i], skip_special_tokens=False), lp)
        for i, lp in zip(tokens.ids, tokens.logprobs, strict=True)
    )
