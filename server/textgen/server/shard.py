"""The shard's RPC logic on plain protobuf messages: batches in, generations out.

The servicer adds only transport concerns (serialisation of RPCs, status
codes). Every shard of a group runs the same batches with the same seeds, so
all ranks hold identical request states; rank 0's generations are read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from textgen.proto import generate_pb2
from textgen.server.batch import Batch, RequestState
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.errors import InvalidRequestError, NotReadyError
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.platform import Platform
from textgen.server.sampling import SamplingOutput, SamplingParams, sample
from textgen.server.validation import (
    ShardLimits,
    check_block_table,
    check_new_batch,
    check_prefill_request,
    check_warmup,
)
from textgen.server.watermark import WatermarkParams

logger = logging.getLogger(__name__)

# Prompt tokens in the warm-up's prefill: more than a small step's (the GGUF-block products
# take up to 4), split into sequences of at most max_input_tokens.
WARMUP_PREFILL_TOKENS = 256
# Batches of at most this many requests have their next decode step computed ahead.
RUN_AHEAD_MAX_BATCH = 4


@dataclass
class _Ahead:
    """A decode step computed before the router asked for it, and how to take it back."""

    batch_id: int
    reply: generate_pb2.DecodeResponse
    # Per request: its state, num_cached and generator state before the step.
    before: list[tuple[RequestState, int, torch.Tensor]]

    def undo(self) -> None:
        for state, num_cached, generator in self.before:
            state.token_ids.pop()
            state.num_cached = num_cached
            state.generator.set_state(generator)


class Shard:
    """The shard's batches and steps.

    Run-ahead: after a step that leaves a small batch (at most RUN_AHEAD_MAX_BATCH
    requests, no grammar masks, none finished by its length or an EOS), the servicer
    calls `run_ahead`, which computes that batch's next decode step while the reply
    travels to the router and the router hands out its tokens. A Decode of exactly that
    batch without masks is then answered with the step already computed; any other call
    that touches the batch first takes the step back (each request's last token, cached
    count and generator state restored). The step's key and value rows stay in the
    cache: they sit at the position the next real step writes with the same token, and
    nothing reads a position before a step has written it. A single stream's step then
    costs the forward, not the forward plus the round trip and the router's work.
    """

    def __init__(self, runner: ModelRunner, config: ServerConfig) -> None:
        self.runner = runner
        self.config = config
        self.batches: dict[int, Batch] = {}
        self._next: int | None = None  # the batch a run-ahead step would advance
        self._ahead: _Ahead | None = None

    @classmethod
    def load(cls, config: ServerConfig, group: ParallelGroup, device: torch.device) -> Shard:
        platform = Platform.detect(device, config.dtype, int8_activations=config.int8_activations)
        logger.info("platform: %s", platform.describe())
        if config.int8_activations and not platform.int8_activations:
            logger.warning(
                "--int8-activations: no int8 product here; the products stay as they are"
            )
        runner = ModelRunner.load(
            Path(config.model_dir),
            platform,
            config.block_size,
            group,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        return cls(runner, config)

    @property
    def platform(self) -> Platform:
        return self.runner.platform

    # -- facts --------------------------------------------------------------

    def info(self) -> generate_pb2.InfoResponse:
        hf = self.runner.config
        return generate_pb2.InfoResponse(
            model_type=hf.model_type,
            dtype=str(self.platform.dtype).removeprefix("torch."),
            device_type=self.platform.device.type,
            block_size=self.config.block_size,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            world_size=self.config.world_size,
        )

    @property
    def limits(self) -> ShardLimits:
        if self.runner.kv_cache is None:
            raise NotReadyError("the KV cache is not allocated: call Warmup first")
        hf = self.runner.config
        return ShardLimits(
            hf.vocab_size,
            hf.max_position_embeddings,
            self.config.block_size,
            self.runner.kv_cache.num_blocks,
        )

    # -- Warmup -------------------------------------------------------------

    def warmup(self, request: generate_pb2.WarmupRequest) -> generate_pb2.WarmupResponse:
        """Size the cache from the budget, then run a prefill and a decode step.

        The cache's size is arithmetic (the budget over a block's bytes). The steps are
        there so that the first request runs as fast as the second: they go through
        `prefill` and `decode` as a request's steps do, so every path a step can take (the
        products of a prefill's many tokens and of a decode step's few, the prefill and
        decode attention, the sampler, the replies' protobufs) has run once, with its
        libraries' one-time set-up behind it. A prefill of WARMUP_PREFILL_TOKENS takes the
        same paths as one of the largest allowed; on a CPU the largest would only cost
        start-up time (minutes at 4,000 tokens), and there is no device memory whose limit
        it would find.
        """
        check_warmup(request, self.runner.config.max_position_embeddings)
        block_size = self.config.block_size
        spec = self.runner.kv_cache_spec
        num_blocks = spec.num_blocks_for(self.config.kv_cache_memory_bytes)
        # NOTE: +1: block 0 is the router's health-probe block.
        needed = math.ceil(request.max_total_tokens / block_size) + 1
        if num_blocks < needed:
            raise InvalidRequestError(
                f"a KV budget of {self.config.kv_cache_memory_gib} GiB holds {num_blocks} "
                f"blocks of {spec.bytes_per_block} bytes; one sequence of "
                f"{request.max_total_tokens} tokens needs {needed}"
            )
        self.clear_cache(None)
        self.runner.allocate_kv_cache(num_blocks)
        batch = _warmup_batch(request, num_blocks, block_size, WARMUP_PREFILL_TOKENS)
        prefilled = self.prefill(batch)
        self.decode([prefilled.batch])
        self.clear_cache(None)
        return generate_pb2.WarmupResponse(num_blocks=num_blocks, block_size=block_size)

    # -- Prefill ------------------------------------------------------------

    def prefill(
        self,
        batch: generate_pb2.Batch,
        token_masks: Sequence[generate_pb2.TokenMask] = (),
        cached: generate_pb2.CachedBatch | None = None,
    ) -> generate_pb2.PrefillResponse:
        """Prefill `batch`; with `cached`, that running batch decodes in the same forward.

        The running requests go first (one token each, the attention's decode path),
        then the new prompts; the reply's batch holds both under `batch.id`. A request
        given one chunk of its prompt (`chunk_len`) that does not reach the prompt's
        end only fills its KV cache: no generation, and it stays out of the batch.
        """
        start = time.monotonic_ns()
        if cached is not None:
            self._take_back(cached.id)
        masks = _token_masks(token_masks)
        limits = self.limits
        check_new_batch(batch, set(self.batches))
        for request in batch.requests:
            check_prefill_request(request, limits)
        running: list[RequestState] = []
        if cached is not None:
            running = self._batch(cached.id).requests
            clashes = {s.id for s in running} & {r.id for r in batch.requests}
            if clashes:
                raise InvalidRequestError(f"requests {sorted(clashes)} are already running")
            for state in running:
                check_block_table(state.id, state.block_table, state.length, limits)
        inputs = [self._prefill_input(r) for r in batch.requests]
        # Requests whose prompt is complete after this step (not a leading chunk).
        whole = [
            i for i, r in enumerate(batch.requests) if inputs[i].context_len == len(r.input_ids)
        ]
        states = [_new_state(batch.requests[i]) for i in whole]
        logits = self.runner.forward([self._decode_input(s) for s in running] + inputs)
        forward_done = time.monotonic_ns()
        everyone = running + states
        rows = list(range(len(running))) + [len(running) + i for i in whole]
        generations = []
        if everyone:
            last_logits = torch.stack([logits[row][-1] for row in rows])  # [B_running + B, V]
            requests = [s.sampling_request(masks.get(s.id)) for s in everyone]
            generations = _generations(everyone, self._sample(last_logits, requests))
        for n, i in enumerate(whole):
            request = batch.requests[i]
            if request.prefill_logprobs:
                prompt, row = list(request.input_ids), len(running) + i
                tokens = _prefill_tokens(prompt, logits[row], inputs[i].start_pos)
                generations[len(running) + n].prefill_tokens.CopyFrom(tokens)
        if cached is not None:
            del self.batches[cached.id]
        joined = None
        if everyone:
            self.batches[batch.id] = joined = Batch(batch.id, everyone)
            self._may_run_ahead(joined, masks)
        done = time.monotonic_ns()
        return generate_pb2.PrefillResponse(
            generations=generations,
            batch=joined.to_proto() if joined is not None else None,
            forward_ns=forward_done - start,
            decode_ns=done - forward_done,
            total_ns=done - start,
        )

    def _prefill_input(self, request: generate_pb2.Request) -> SequenceInput:
        prompt = list(request.input_ids)
        # NOTE: a fully cached prompt still recomputes its last token: its logits
        # are the first step's distribution.
        cache_len = min(request.cache_len, len(prompt) - 1)
        end = len(prompt)
        if request.chunk_len:
            end = min(end, cache_len + request.chunk_len)
        blocks = list(request.blocks)
        slots = list(request.slots) or [
            blocks[p // self.config.block_size] * self.config.block_size
            + p % self.config.block_size
            for p in range(len(prompt))
        ]
        return SequenceInput(
            token_ids=prompt[cache_len:end],
            start_pos=cache_len,
            slots=slots[cache_len:end],
            block_table=blocks,
            all_logits=request.prefill_logprobs,
        )

    # -- Decode -------------------------------------------------------------

    def decode(
        self,
        cached: list[generate_pb2.CachedBatch],
        token_masks: Sequence[generate_pb2.TokenMask] = (),
    ) -> generate_pb2.DecodeResponse:
        reply = self.computed_ahead(cached, token_masks)
        if reply is not None:
            return reply
        for c in cached:
            self._take_back(c.id)
        return self._decode(cached, token_masks)

    def computed_ahead(
        self,
        cached: list[generate_pb2.CachedBatch],
        token_masks: Sequence[generate_pb2.TokenMask] = (),
    ) -> generate_pb2.DecodeResponse | None:
        """The reply to this Decode if `run_ahead` computed it (taken: asked once)."""
        ahead = self._ahead
        if ahead is None or [c.id for c in cached] != [ahead.batch_id] or len(token_masks):
            return None
        self._ahead = None
        self._may_run_ahead(self.batches[ahead.batch_id], {})
        return ahead.reply

    def _decode(
        self,
        cached: list[generate_pb2.CachedBatch],
        token_masks: Sequence[generate_pb2.TokenMask] = (),
    ) -> generate_pb2.DecodeResponse:
        start = time.monotonic_ns()
        masks = _token_masks(token_masks)
        if len({c.id for c in cached}) != len(cached):
            raise InvalidRequestError("decode got the same batch twice")
        if not cached:
            raise InvalidRequestError("decode got no batches")
        batch = Batch.concatenate([self._batch(c.id) for c in cached])
        concat_done = time.monotonic_ns()
        limits = self.limits
        for state in batch.requests:
            check_block_table(state.id, state.block_table, state.length, limits)
        logits = self.runner.forward([self._decode_input(s) for s in batch.requests])
        forward_done = time.monotonic_ns()
        requests = [s.sampling_request(masks.get(s.id)) for s in batch.requests]
        output = self._sample(torch.cat(logits), requests)
        generations = _generations(batch.requests, output)
        # NOTE: the inputs are replaced only once the step has succeeded, so a
        # failed Decode leaves every batch as it was.
        for c in cached:
            del self.batches[c.id]
        self.batches[batch.id] = batch
        self._may_run_ahead(batch, masks)
        done = time.monotonic_ns()
        return generate_pb2.DecodeResponse(
            generations=generations,
            batch=batch.to_proto(),
            forward_ns=forward_done - concat_done,
            decode_ns=done - forward_done,
            total_ns=done - start,
            concat_ns=concat_done - start,
        )

    # -- run-ahead ----------------------------------------------------------

    def _may_run_ahead(self, batch: Batch, masks: dict[int, bytes]) -> None:
        """Note `batch` for `run_ahead` when its next step can be computed ahead."""
        self._next = None
        if self.config.world_size > 1 or masks or len(batch.requests) > RUN_AHEAD_MAX_BATCH:
            return
        for state in batch.requests:
            generated, last = state.length - state.prompt_len, state.token_ids[-1]
            if generated >= state.max_new_tokens or last in state.params.eos_token_ids:
                return  # the router ends it: its batch changes before the next step
        self._next = batch.id

    @property
    def can_run_ahead(self) -> bool:
        return self._next is not None and self._ahead is None

    def run_ahead(self) -> None:
        """Compute the noted batch's next decode step now, to be answered by `decode`."""
        if not self.can_run_ahead or self._next not in self.batches:
            return
        batch_id, self._next = self._next, None
        states = self.batches[batch_id].requests
        before = [(s, s.num_cached, s.generator.get_state()) for s in states]
        try:
            reply = self._decode([generate_pb2.CachedBatch(id=batch_id)])
        except InvalidRequestError:
            return  # the router's Decode meets the same refusal and reports it
        # NOTE: one step ahead at most: the next is noted once this one is answered.
        self._ahead, self._next = _Ahead(batch_id, reply, before), None

    def _take_back(self, batch_id: int | None) -> None:
        """Undo the step computed ahead if it advanced `batch_id` (None: any batch)."""
        ahead = self._ahead
        if ahead is not None and batch_id in (None, ahead.batch_id):
            self._ahead = None
            ahead.undo()

    def _sample(self, logits: torch.Tensor, requests: list) -> SamplingOutput:
        return sample(logits, requests, native=self.platform.native_cpu)

    def _decode_input(self, state: RequestState) -> SequenceInput:
        position = state.length - 1  # the last sampled token is not cached yet
        return SequenceInput(
            token_ids=[state.token_ids[-1]],
            start_pos=position,
            slots=[state.slot(position, self.config.block_size)],
            block_table=state.block_table,
        )

    # -- FilterBatch / ClearCache -------------------------------------------

    def filter_batch(
        self, batch_id: int, request_ids: list[int]
    ) -> generate_pb2.CachedBatch | None:
        """Keep the given requests; keeping none drops the batch (returns None)."""
        self._take_back(batch_id)
        batch = self._batch(batch_id)
        if not request_ids:
            del self.batches[batch_id]
            return None
        try:
            self.batches[batch_id] = batch = batch.filter(request_ids)
        except KeyError as e:
            raise InvalidRequestError(str(e.args[0])) from None
        return batch.to_proto()

    def clear_cache(self, batch_id: int | None) -> None:
        """Drop one batch (an unknown id is already dropped) or every batch."""
        self._take_back(batch_id)
        self._next = None
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def _batch(self, batch_id: int) -> Batch:
        if batch_id not in self.batches:
            raise InvalidRequestError(f"batch {batch_id} is not on the shard")
        return self.batches[batch_id]


def _token_masks(token_masks: Sequence[generate_pb2.TokenMask]) -> dict[int, bytes]:
    """Per request id, its allowed-token bitmask (whole int32 words, at least one)."""
    masks = {}
    for mask in token_masks:
        if not mask.bitmask or len(mask.bitmask) % 4:
            raise InvalidRequestError(
                f"request {mask.request_id}: a token mask must be whole int32 words, "
                f"got {len(mask.bitmask)} bytes"
            )
        masks[mask.request_id] = mask.bitmask
    return masks


def _new_state(request: generate_pb2.Request) -> RequestState:
    try:
        params = SamplingParams.from_proto(request.parameters)
        watermark = (
            WatermarkParams.from_proto(request.watermark) if request.HasField("watermark") else None
        )
    except ValueError as e:
        raise InvalidRequestError(f"request {request.id}: {e}") from None
    return RequestState(
        id=request.id,
        token_ids=list(request.input_ids),
        prompt_len=len(request.input_ids),
        block_table=list(request.blocks),
        max_new_tokens=request.max_new_tokens,
        params=params,
        generator=params.make_generator(),
        top_n_tokens=request.top_n_tokens,
        watermark=watermark,
    )


def _generations(
    states: list[RequestState], output: SamplingOutput
) -> list[generate_pb2.Generation]:
    """One Generation per request; records the chosen token in its state."""
    generations = []
    for i, state in enumerate(states):
        token = generate_pb2.Tokens(ids=[output.next_ids[i]], logprobs=[output.logprobs[i]])
        generation = generate_pb2.Generation(request_id=state.id, tokens=token)
        if state.top_n_tokens:
            top = generate_pb2.Tokens(ids=output.top_ids[i], logprobs=output.top_logprobs[i])
            generation.top_tokens.append(top)
        generations.append(generation)
        state.append(output.next_ids[i])
    return generations


def _prefill_tokens(prompt: list[int], logits: torch.Tensor, cache_len: int) -> generate_pb2.Tokens:
    """Logprob of each prompt token given its prefix; NaN where no logits were computed.

    `logits` [L - cache_len, V] are those of positions cache_len..L-1; the row
    of position p scores token p + 1. The first token and every cached one
    (whose predecessor was not recomputed) get NaN.
    """
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # [L - cache_len - 1, V]
    targets = torch.tensor(prompt[cache_len + 1 :], dtype=torch.long).unsqueeze(1)
    values = logprobs.gather(1, targets).squeeze(1).tolist()
    return generate_pb2.Tokens(ids=prompt, logprobs=[math.nan] * (cache_len + 1) + values)


def _warmup_batch(
    request: generate_pb2.WarmupRequest, num_blocks: int, block_size: int, limit: int
) -> generate_pb2.Batch:
    """Greedy requests of min(max_prefill_tokens, limit) prompt tokens in all, each at most
    max_input_tokens and one more to generate, on blocks 1 and up (block 0 is the router's
    health-probe block; the cache holds one sequence of max_total_tokens at least)."""
    total = min(request.max_prefill_tokens or request.max_input_tokens, limit)
    longest = min(request.max_input_tokens, total)
    lengths = [longest] * (total // longest)
    lengths += [total % longest] if total % longest else []
    requests, next_block = [], 1
    for i, length in enumerate(lengths):
        count = math.ceil((length + 1) / block_size)
        blocks = [1 + (next_block - 1 + j) % (num_blocks - 1) for j in range(count)]
        next_block += count
        requests.append(
            generate_pb2.Request(
                id=i,
                input_ids=[0] * length,
                parameters=generate_pb2.SamplingParameters(),  # greedy
                blocks=blocks,
                max_new_tokens=1,
            )
        )
    return generate_pb2.Batch(id=0, requests=requests)
