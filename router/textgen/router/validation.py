"""Validation of TGI generate requests: a parsed request to a tokenized `ValidRequest` or a 422.

Checks run in TGI's order with TGI's messages, so clients matching on them keep
working. textgen's extensions (`min_p`, `presence_penalty`, `min_new_tokens`,
`ignore_eos_token`) are checked after TGI's own parameters, in the same style.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textgen.router import json_input
from textgen.router.errors import ValidationError
from textgen.router.generate_request import (
    GenerateParameters,
    GenerateRequest,
    GrammarParameter,
    parse_request,
)
from textgen.router.grammar import CompiledGrammar, GrammarCompiler, GrammarSpec
from textgen.router.request import SamplingParams, StoppingParams, ValidRequest

_PREFIX = "Input validation error: "
MAX_STOP_SEQUENCE_CHARS = 1024
"""Longest stop sequence: each generated token is matched against a window this wide."""


@dataclass(frozen=True)
class ValidationLimits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_top_n_tokens: int = 5
    max_new_tokens_default: int = 1024
    max_best_of: int = 2
    max_stop_sequence_chars: int = MAX_STOP_SEQUENCE_CHARS


def _invalid(message: str) -> ValidationError:
    return ValidationError(_PREFIX + message)


def random_seed() -> int:
    return random.getrandbits(64)


class Validation:
    def __init__(
        self,
        encode: Callable[..., list[int]],
        limits: ValidationLimits,
        grammar: GrammarCompiler | None = None,
    ) -> None:
        """`encode(text)` tokenizes with special tokens; `add_special_tokens=False` without.

        With no `grammar` compiler, grammar guidance is off (`--disable-grammar-support`).
        """
        self._encode = encode
        self._limits = limits
        self._grammar = grammar

    @property
    def limits(self) -> ValidationLimits:
        return self._limits

    def check_best_of(self, request: GenerateRequest, stream: bool) -> int:
        """TGI's checks made before a request is admitted; returns the number of sequences."""
        params = request.parameters
        best_of = 1 if params.best_of is None else params.best_of
        if stream and best_of != 1:
            raise _invalid("`best_of` != 1 is not supported when streaming tokens")
        if stream and params.decoder_input_details:
            raise _invalid("`decoder_input_details` == true is not supported when streaming tokens")
        max_best_of = self._limits.max_best_of
        if max_best_of == 1 and best_of != 1:
            raise _invalid("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= max_best_of:
            raise _invalid(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")
        return best_of

    async def validate(self, request: GenerateRequest | Any) -> ValidRequest:
        if not isinstance(request, GenerateRequest):
            request = parse_request(request)
        params = request.parameters
        best_of = 1 if params.best_of is None else params.best_of
        sampling = self._sampling(params, best_of)
        max_new_tokens = params.max_new_tokens
        if max_new_tokens == 0:
            raise _invalid("`max_new_tokens` must be strictly positive")
        stop = self._stop_sequences(params)
        if params.seed is not None and best_of > 1:
            raise _invalid("`seed` must not be set when `best_of` > 1")
        top_n_tokens = self._top_n_tokens(params)
        if not request.inputs:
            raise _invalid("`inputs` cannot be empty")
        truncate = self._truncate(params)
        input_ids = await self._tokenize(request, truncate)
        max_new_tokens = self._check_lengths(len(input_ids), max_new_tokens)
        min_new_tokens = self._min_new_tokens(params, max_new_tokens)
        grammar = await self._compile_grammar(params.grammar, min_new_tokens)
        return ValidRequest(
            inputs=request.inputs,
            input_ids=tuple(input_ids),
            sampling=sampling,
            stopping=StoppingParams(
                max_new_tokens=max_new_tokens,
                stop_sequences=stop,
                ignore_eos_token=params.ignore_eos_token,
                min_new_tokens=min_new_tokens,
            ),
            # As TGI: decoder_input_details implies details.
            details=params.details or params.decoder_input_details,
            decoder_input_details=params.decoder_input_details,
            top_n_tokens=top_n_tokens,
            seed_was_given=params.seed is not None,
            best_of=best_of,
            return_full_text=bool(params.return_full_text),
            watermark=params.watermark,
            adapter_id=params.adapter_id,
            grammar=grammar,
        )

    def _sampling(self, params: GenerateParameters, best_of: int) -> SamplingParams:
        # As TGI: any warper given means sampling (checked as given, before defaults).
        warpers_given = any(
            value is not None
            for value in (params.temperature, params.top_k, params.top_p, params.typical_p)
        )
        if best_of > 1 and not (params.do_sample or warpers_given):
            raise _invalid("you must use sampling when `best_of` is > 1")
        temperature = _default(params.temperature, 1.0)
        if temperature <= 0:
            raise _invalid("`temperature` must be strictly positive")
        repetition_penalty = _default(params.repetition_penalty, 1.0)
        if repetition_penalty <= 0:
            raise _invalid("`repetition_penalty` must be strictly positive")
        frequency_penalty = _default(params.frequency_penalty, 0.0)
        if not -2.0 <= frequency_penalty <= 2.0:
            raise _invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
        top_p = _open_unit(params.top_p, "top_p")
        typical_p = _open_unit(params.typical_p, "typical_p")
        top_k = _default(params.top_k, 0)
        if params.top_k is not None and top_k <= 0:
            raise _invalid("`top_k` must be strictly positive")
        presence_penalty = _default(params.presence_penalty, 0.0)
        if not -2.0 <= presence_penalty <= 2.0:
            raise _invalid("`presence_penalty` must be >= -2.0 and <= 2.0")
        min_p = _default(params.min_p, 0.0)
        if not 0.0 <= min_p <= 1.0:
            raise _invalid("`min_p` must be >= 0.0 and <= 1.0")
        # As TGI's shard: a warper away from its neutral value turns sampling on.
        has_warpers = (
            temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0 or min_p > 0.0
        )
        return SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            do_sample=params.do_sample or has_warpers,
            seed=random_seed() if params.seed is None else params.seed,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            min_p=min_p,
        )

    def _stop_sequences(self, params: GenerateParameters) -> tuple[str, ...]:
        max_stop = self._limits.max_stop_sequences
        if len(params.stop) > max_stop:
            raise _invalid(
                f"`stop` supports up to {max_stop} stop sequences. Given: {len(params.stop)}"
            )
        if not all(params.stop):
            raise _invalid("`stop` sequences cannot be empty")
        longest = max((len(stop) for stop in params.stop), default=0)
        if longest > self._limits.max_stop_sequence_chars:
            raise _invalid(
                f"`stop` sequences must be at most {self._limits.max_stop_sequence_chars} "
                f"characters long. Given: {longest}"
            )
        return params.stop

    def _top_n_tokens(self, params: GenerateParameters) -> int:
        top_n = _default(params.top_n_tokens, 0)
        max_top_n = self._limits.max_top_n_tokens
        if top_n > max_top_n:
            raise _invalid(f"`top_n_tokens` must be >= 0 and <= {max_top_n}. Given: {top_n}")
        return top_n

    def _truncate(self, params: GenerateParameters) -> int | None:
        truncate, max_input = params.truncate, self._limits.max_input_tokens
        if truncate is not None and not 0 < truncate <= max_input:
            raise _invalid(
                f"`truncate` must be strictly positive and less than {max_input}. Given: {truncate}"
            )
        return truncate

    async def _tokenize(self, request: GenerateRequest, truncate: int | None) -> list[int]:
        # Tokenizers release the GIL: encode off the event loop.
        if request.add_special_tokens:
            input_ids = await asyncio.to_thread(self._encode, request.inputs)
        else:
            input_ids = await asyncio.to_thread(
                self._encode, request.inputs, add_special_tokens=False
            )
        if truncate is not None and len(input_ids) > truncate:
            input_ids = input_ids[-truncate:]  # as TGI: keep the last tokens
        return input_ids

    def _check_lengths(self, input_len: int, max_new_tokens: int | None) -> int:
        limits = self._limits
        if max_new_tokens is None:
            max_new_tokens = max(
                1, min(limits.max_new_tokens_default, limits.max_total_tokens - input_len)
            )
        if input_len + max_new_tokens > limits.max_total_tokens:
            raise _invalid(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_len} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_len > limits.max_input_tokens:
            raise _invalid(
                f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_len}"
            )
        return max_new_tokens

    def _min_new_tokens(self, params: GenerateParameters, max_new_tokens: int) -> int:
        min_new_tokens = _default(params.min_new_tokens, 0)
        if min_new_tokens > max_new_tokens:
            raise _invalid(
                f"`min_new_tokens` must be <= `max_new_tokens`. "
                f"Given: {min_new_tokens} and {max_new_tokens}"
            )
        return min_new_tokens

    async def _compile_grammar(
        self, grammar: GrammarParameter | None, min_new_tokens: int
    ) -> CompiledGrammar | None:
        """Compile (off the event loop, within budget) before the request is enqueued.

        NOTE: a request waits for its grammar here, outside the queue, so it
        never holds back the batching loop or the requests queued behind it.
        """
        if grammar is None:
            return None
        if self._grammar is None:
            raise _invalid("grammar is not supported")
        if min_new_tokens:
            raise _invalid("`min_new_tokens` cannot be used with `grammar`: the grammar ends it")
        return await self._grammar.compile(grammar_spec(grammar))


def grammar_spec(grammar: GrammarParameter) -> GrammarSpec:
    if grammar.kind == "regex":
        return GrammarSpec.regex(grammar.value)
    schema = grammar.value
    if isinstance(schema, str):
        try:
            schema = json_input.loads(schema)
        except json_input.JsonInputError as error:
            raise _invalid(
                f"grammar is not valid: the JSON schema is not JSON: {error.detail}"
            ) from None
    if not isinstance(schema, (dict, bool)):
        raise _invalid("grammar is not valid: a JSON schema must be an object")
    return GrammarSpec.json_schema(schema)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _open_unit(value: float | None, name: str) -> float:
    """top_p and typical_p: TGI rejects 1.0 itself (its neutral value is 'not given')."""
    if value is None:
        return 1.0
    if not 0.0 < value < 1.0:
        raise _invalid(f"`{name}` must be > 0.0 and < 1.0")
    return value
