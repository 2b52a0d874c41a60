"""A generation request: its validated parameters and its state while in flight."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry.trace import INVALID_SPAN, Span

from textgen.proto import generate_pb2 as pb
from textgen.router.allocator import BlockAllocation
from textgen.router.detokenizer import IncrementalDetokenizer, Tokenizer
from textgen.router.errors import GenerationError, RouterError
from textgen.router.grammar import CompiledGrammar
from textgen.router.stop import StopSequenceMatcher

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False
    min_new_tokens: int = 0
    """EOS is masked on the shard and stop sequences are not matched before this many tokens."""


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed validation: tokenized, with every default filled in."""

    inputs: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    details: bool = True
    decoder_input_details: bool = False
    top_n_tokens: int = 0
    seed_was_given: bool = False
    best_of: int = 1
    return_full_text: bool = False
    watermark: bool = False
    adapter_id: str | None = None
    """Accepted as TGI does; with no adapters loaded every id falls back to the base model."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits (OpenAI's logit_bias; not a TGI parameter)."""
    grammar: CompiledGrammar | None = None
    """The grammar the output must match; each sequence gets its own matcher of it."""

    @property
    def input_len(self) -> int:
        return len(self.input_ids)

    def sampling_proto(self, eos_token_ids: frozenset[int]) -> pb.SamplingParameters:
        sampling, stopping = self.sampling, self.stopping
        return pb.SamplingParameters(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            typical_p=sampling.typical_p,
            min_p=sampling.min_p,
            do_sample=sampling.do_sample,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            min_new_tokens=stopping.min_new_tokens,
            eos_token_ids=sorted(eos_token_ids) if stopping.min_new_tokens else [],
        )

    @property
    def max_total_tokens(self) -> int:
        """KV tokens the request can occupy (the last sampled token is never fed back)."""
        return self.input_len + self.stopping.max_new_tokens


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class Ending:
    """What the last stream event of a request carries."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: tuple[Token, ...]
    input_length: int
    stop_sequence: str | None = None
    """The stop sequence that ended the request; `generated_text` ends with it, as in TGI."""


@dataclass(frozen=True)
class StreamEvent:
    token: Token
    top_tokens: tuple[Token, ...]
    ending: Ending | None = None


@dataclass
class Timings:
    received: float = field(default_factory=time.monotonic)
    queued: float = 0.0
    batched: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0


@dataclass
class TokenizerInfo:
    """What entries need of the tokenizer, resolved once at start-up."""

    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    special_token_ids: frozenset[int]

    def token(self, token_id: int, text: str, logprob: float) -> Token:
        return Token(token_id, text, logprob, token_id in self.special_token_ids)


class Entry:
    """One request from validation to its last token.

    The scheduler feeds it tokens; the HTTP handler reads `events`. An entry
    is finished once it has an ending or an error; `cancelled` is set by the
    handler when the client goes away and is read by the scheduler.
    """

    def __init__(self, request_id: int, request: ValidRequest, info: TokenizerInfo) -> None:
        self.id = request_id
        self.request = request
        self.info = info
        self.events: asyncio.Queue[StreamEvent | RouterError] = asyncio.Queue()
        self.allocation: BlockAllocation | None = None
        self.prefilled = 0
        """Prompt tokens already in the KV cache: shared from the prefix cache, or computed."""
        self.generated_ids: list[int] = []
        self.timings = Timings()
        self.cancelled = False
        self.finished = False
        self._text_parts: list[str] = []
        self._detokenizer = IncrementalDetokenizer(info.tokenizer, list(request.input_ids))
        self._stop = StopSequenceMatcher(request.stopping.stop_sequences)
        self._prefill: tuple[Token, ...] = ()
        self._matched_stop: str | None = None
        self.span: Span = INVALID_SPAN
        """The request's tracing span (a non-recording one when tracing is off)."""
        self.guide = None if request.grammar is None else request.grammar.new_guide()
        """The grammar's state: advanced by every token, it gives the next step's token mask."""
        self._held: list[StreamEvent] = []
        """Events `add_token(hold=True)` kept back until `release`."""

    @property
    def num_generated(self) -> int:
        return len(self.generated_ids)

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled

    def set_prefill(self, ids: list[int], logprobs: list[float]) -> None:
        decode = self.info.tokenizer.decode
        self._prefill = tuple(
            self.info.token(i, decode([i], skip_special_tokens=False), lp)
            for i, lp in zip(ids, logprobs, strict=True)
        )

    def add_token(
        self, token_id: int, logprob: float, top: tuple[Token, ...], hold: bool = False
    ) -> StreamEvent:
        """Record one generated token and queue its stream event (or, with `hold`, keep it
        back until `release`)."""
        now = time.monotonic()
        if self.num_generated == 0:
            self.timings.first_token = now
        self.generated_ids.append(token_id)
        token = self.info.token(token_id, self._detokenizer.step(token_id), logprob)
        if self.guide is not None and not self.guide.accept(token_id):
            # Only a shard that ignored the mask gets here: never return text the grammar refuses.
            self.fail(GenerationError(f"token {token_id} broke the grammar: {self.guide.error}"))
            return StreamEvent(token, top)
        if not token.special:
            self._text_parts.append(token.text)
        finish_reason = self._finish_reason(token)
        if finish_reason != "stop_sequence":
            self._matched_stop = None
        ending = None
        if finish_reason is not None:
            self.finished = True
            self.timings.finished = now
            ending = self._ending(finish_reason)
        event = StreamEvent(token, top, ending)
        if hold:
            self._held.append(event)
        else:
            self.events.put_nowait(event)
        return event

    def computed_tokens(self) -> tuple[list[int], int]:
        """The request's token sequence and how many of its positions have KV computed:
        the prompt's as far as prefilled, then every generated token but the last (its
        KV is written by the step that feeds it)."""
        tokens = [*self.request.input_ids, *self.generated_ids]
        return tokens, self.prefilled + max(self.num_generated - 1, 0)

    def release(self) -> None:
        """Queue the events held back, in order (waking the handler that streams them)."""
        for event in self._held:
            self.events.put_nowait(event)
        self._held.clear()

    def cancel(self, error: RouterError | None = None) -> None:
        """Drop the request at the scheduler's next step: its client went away, or `error`
        (the server's reason, which its handler answers with) ended it."""
        if not self.done:
            self.cancelled = True
            self.release()
            self.events.put_nowait(error or RouterError("client disconnected"))

    def fail(self, error: RouterError) -> None:
        if not self.finished:
            self.finished = True
            self.release()
            self.events.put_nowait(error)

    def _finish_reason(self, token: Token) -> FinishReason | None:
        stopping = self.request.stopping
        if token.id in self.info.eos_token_ids and not stopping.ignore_eos_token:
            return "eos_token"
        if self.guide is not None and self.guide.finished:
            # NOTE: the grammar is complete and allows only EOS: end now, as if it came.
            return "eos_token"
        if self.num_generated >= stopping.min_new_tokens and self._stopped_by_sequence(token):
            return "stop_sequence"
        if self.num_generated >= stopping.max_new_tokens:
            return "length"
        return None

    def _stopped_by_sequence(self, token: Token) -> bool:
        match = self._stop.match(token.text)
        if match is None:
            return False
        self._matched_stop, excess = match
        if excess and not token.special:
            # The stop ended inside this token: the text ends with the stop, as TGI's does.
            self._text_parts[-1] = self._text_parts[-1][: len(self._text_parts[-1]) - excess]
        return True

    def _ending(self, finish_reason: FinishReason) -> Ending:
        sampling = self.request.sampling
        return Ending(
            generated_text="".join(self._text_parts),
            finish_reason=finish_reason,
            generated_tokens=self.num_generated,
            seed=sampling.seed if sampling.do_sample else None,
            prefill=self._prefill,
            input_length=self.request.input_len,
            stop_sequence=self._matched_stop,
        )
