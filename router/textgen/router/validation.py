"""Validation of TGI generate requests: JSON to a tokenized `ValidRequest` or a 422.

Messages follow TGI's wording so that clients matching on them keep working.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textgen.router.errors import ValidationError
from textgen.router.request import SamplingParams, StoppingParams, ValidRequest

_PREFIX = "Input validation error: "


@dataclass(frozen=True)
class ValidationLimits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_top_n_tokens: int = 5
    max_new_tokens_default: int = 1024


def _invalid(message: str) -> ValidationError:
    return ValidationError(_PREFIX + message)


class _Params:
    """Typed access to the `parameters` object, with TGI's deserialization errors."""

    def __init__(self, raw: Any) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _invalid("`parameters` must be an object")
        self._raw = raw

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self._raw.get(name)
        if value is None:
            return default
        # NOTE: bool is an int in Python; a JSON true is not a valid integer or float here.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise _invalid(f"`{name}` must be of type {_kind_name(kind)}")
        if not isinstance(value, kind):
            raise _invalid(f"`{name}` must be of type {_kind_name(kind)}")
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


class Validation:
    def __init__(self, encode: Callable[[str], list[int]], limits: ValidationLimits) -> None:
        self._encode = encode
        self._limits = limits

    async def validate(self, body: Any) -> ValidRequest:
        if not isinstance(body, dict):
            raise _invalid("the request body must be a JSON object")
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise _invalid("`inputs` must be a string")
        if not inputs:
            raise _invalid("`inputs` cannot be empty")
        params = _Params(body.get("parameters"))
        sampling = self._sampling(params)
        top_n_tokens = self._top_n_tokens(params)
        stop = self._stop_sequences(params)
        max_new_tokens = params.get("max_new_tokens", int)
        if max_new_tokens is not None and max_new_tokens <= 0:
            raise _invalid("`max_new_tokens` must be strictly positive")
        # Tokenizers release the GIL: encode off the event loop.
        input_ids = await asyncio.to_thread(self._encode, inputs)
        max_new_tokens = self._check_lengths(len(input_ids), max_new_tokens)
        return ValidRequest(
            inputs=inputs,
            input_ids=tuple(input_ids),
            sampling=sampling,
            stopping=StoppingParams(
                max_new_tokens=max_new_tokens,
                stop_sequences=stop,
                ignore_eos_token=params.get("ignore_eos_token", bool, False),
            ),
            details=params.get("details", bool, False),
            decoder_input_details=params.get("decoder_input_details", bool, False),
            top_n_tokens=top_n_tokens,
            seed_was_given=params.get("seed", int) is not None,
            watermark=params.get("watermark", bool, False),
        )

    def _sampling(self, params: _Params) -> SamplingParams:
        temperature = params.get("temperature", (int, float), 1.0)
        if temperature <= 0:
            raise _invalid("`temperature` must be strictly positive")
        top_k = params.get("top_k", int, 0)
        if params.get("top_k", int) is not None and top_k <= 0:
            raise _invalid("`top_k` must be strictly positive")
        top_p = params.get("top_p", (int, float), 1.0)
        if params.get("top_p", (int, float)) is not None and not 0.0 < top_p < 1.0:
            raise _invalid("`top_p` must be > 0.0 and < 1.0")
        typical_p = params.get("typical_p", (int, float), 1.0)
        if params.get("typical_p", (int, float)) is not None and not 0.0 < typical_p < 1.0:
            raise _invalid("`typical_p` must be > 0.0 and < 1.0")
        repetition_penalty = params.get("repetition_penalty", (int, float), 1.0)
        if repetition_penalty <= 0:
            raise _invalid("`repetition_penalty` must be strictly positive")
        frequency_penalty = params.get("frequency_penalty", (int, float), 0.0)
        if not -2.0 <= frequency_penalty <= 2.0:
            raise _invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
        seed = params.get("seed", int)
        if seed is not None and not 0 <= seed < 2**64:
            raise _invalid("`seed` must be >= 0 and < 2^64")
        # As TGI: any warper set means sampling, even without `do_sample`.
        has_warpers = temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
        do_sample = params.get("do_sample", bool, False) or has_warpers
        if seed is None:
            seed = random.getrandbits(63)
        return SamplingParams(
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            typical_p=float(typical_p),
            do_sample=do_sample,
            seed=seed,
            repetition_penalty=float(repetition_penalty),
            frequency_penalty=float(frequency_penalty),
        )

    def _top_n_tokens(self, params: _Params) -> int:
        top_n = params.get("top_n_tokens", int, 0)
        max_top_n = self._limits.max_top_n_tokens
        if not 0 <= top_n <= max_top_n:
            raise _invalid(f"`top_n_tokens` must be >= 0 and <= {max_top_n}. Given: {top_n}")
        return top_n

    def _stop_sequences(self, params: _Params) -> tuple[str, ...]:
        stop = params.get("stop", list, [])
        if len(stop) > self._limits.max_stop_sequences:
            raise _invalid(
                f"`stop` supports up to {self._limits.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}"
            )
        if not all(isinstance(s, str) and s for s in stop):
            raise _invalid("`stop` must be a list of non-empty strings")
        return tuple(stop)

    def _check_lengths(self, input_len: int, max_new_tokens: int | None) -> int:
        limits = self._limits
        if input_len > limits.max_input_tokens:
            raise _invalid(
                f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_len}"
            )
        if max_new_tokens is None:
            max_new_tokens = max(
                1, min(limits.max_new_tokens_default, limits.max_total_tokens - input_len)
            )
        if input_len + max_new_tokens > limits.max_total_tokens:
            raise _invalid(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_len} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        return max_new_tokens
