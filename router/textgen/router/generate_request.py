"""TGI's `GenerateRequest` JSON, parsed into typed fields with serde-like errors.

This is the deserialization step only: types and integer ranges, as TGI's Rust
structs enforce them (`max_new_tokens: u32`, `seed: u64`, `top_k: i32`, ...).
Its errors are answered as HTTP 4xx even on `/generate_stream`, as TGI's JSON
extractor does; the semantic checks with TGI's messages live in validation.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from textgen.router.errors import ValidationError

_U32 = 2**32 - 1
_U64 = 2**64 - 1
_I32 = 2**31 - 1


class DeserializationError(ValidationError):
    """The body is JSON but not a GenerateRequest (TGI: the JSON extractor's 422)."""

    status = 422
    error_type = "validation"

    def __init__(self, message: str) -> None:
        super().__init__(f"Failed to deserialize the JSON body into the target type: {message}")


@dataclass(frozen=True)
class GrammarParameter:
    """TGI's `{"type": "json" | "json_object" | "regex", "value": ...}`."""

    kind: str
    """"json" (also for TGI's `json_object` alias) or "regex"."""
    value: Any
    """A JSON schema (object, or a string holding one) or a regex string."""


@dataclass(frozen=True)
class GenerateParameters:
    """`parameters`, None where the client gave nothing (or null)."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    adapter_id: str | None = None
    ignore_eos_token: bool = False
    grammar: GrammarParameter | None = None


@dataclass(frozen=True)
class GenerateRequest:
    inputs: str
    parameters: GenerateParameters = field(default_factory=GenerateParameters)
    add_special_tokens: bool = True
    stream: bool = False


def parse_request(body: Any) -> GenerateRequest:
    if not isinstance(body, dict):
        raise DeserializationError(f"invalid type: {_json_kind(body)}, expected an object")
    if body.get("inputs") is None:
        raise DeserializationError("missing field `inputs`")
    fields = _Fields(body, "")
    return GenerateRequest(
        inputs=fields.string("inputs"),
        parameters=parse_parameters(body.get("parameters")),
        add_special_tokens=fields.boolean("add_special_tokens", True),
        stream=fields.boolean("stream", False),
    )


def parse_parameters(raw: Any) -> GenerateParameters:
    if raw is None:
        return GenerateParameters()
    if not isinstance(raw, dict):
        raise DeserializationError(f"parameters: invalid type: {_json_kind(raw)}, expected struct")
    f = _Fields(raw, "parameters.")
    return GenerateParameters(
        best_of=f.integer("best_of", 0, _U64, "usize"),
        temperature=f.number("temperature"),
        repetition_penalty=f.number("repetition_penalty"),
        frequency_penalty=f.number("frequency_penalty"),
        presence_penalty=f.number("presence_penalty"),
        top_k=f.integer("top_k", -_I32 - 1, _I32, "i32"),
        top_p=f.number("top_p"),
        typical_p=f.number("typical_p"),
        min_p=f.number("min_p"),
        do_sample=f.boolean("do_sample", False),
        max_new_tokens=f.integer("max_new_tokens", 0, _U32, "u32"),
        min_new_tokens=f.integer("min_new_tokens", 0, _U32, "u32"),
        return_full_text=f.optional_boolean("return_full_text"),
        stop=f.strings("stop"),
        truncate=f.integer("truncate", 0, _U64, "usize"),
        watermark=f.boolean("watermark", False),
        details=f.boolean("details", False),
        decoder_input_details=f.boolean("decoder_input_details", False),
        seed=f.integer("seed", 0, _U64, "u64"),
        top_n_tokens=f.integer("top_n_tokens", 0, _U32, "u32"),
        adapter_id=f.optional_string("adapter_id"),
        ignore_eos_token=f.boolean("ignore_eos_token", False),
        grammar=parse_grammar(raw.get("grammar")),
    )


def parse_grammar(raw: Any) -> GrammarParameter | None:
    """As TGI's serde enum: tag `type`, content `value`."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DeserializationError(
            f"parameters.grammar: invalid type: {_json_kind(raw)}, expected adjacently tagged enum"
        )
    kind = raw.get("type")
    if kind not in ("json", "json_object", "regex"):
        if kind is None:
            raise DeserializationError("parameters.grammar: missing field `type`")
        raise DeserializationError(
            f"parameters.grammar: unknown variant {json.dumps(kind)}, expected `json` or `regex`"
        )
    if "value" not in raw:
        raise DeserializationError("parameters.grammar: missing field `value`")
    value = raw["value"]
    if kind == "regex" and not isinstance(value, str):
        raise DeserializationError(
            f"parameters.grammar.value: invalid type: {_json_kind(value)}, expected a string"
        )
    return GrammarParameter("regex" if kind == "regex" else "json", value)


class _Fields:
    """Typed reads of one JSON object; null counts as absent, as serde's Option does."""

    def __init__(self, raw: dict[str, Any], prefix: str) -> None:
        self._raw = raw
        self._prefix = prefix

    def _fail(self, name: str, value: Any, expected: str) -> DeserializationError:
        return DeserializationError(
            f"{self._prefix}{name}: invalid type: {_json_kind(value)}, expected {expected}"
        )

    def string(self, name: str) -> str:
        value = self._raw.get(name)
        if not isinstance(value, str):
            raise self._fail(name, value, "a string")
        return value

    def optional_string(self, name: str) -> str | None:
        return None if self._raw.get(name) is None else self.string(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.optional_boolean(name)
        return default if value is None else value

    def optional_boolean(self, name: str) -> bool | None:
        value = self._raw.get(name)
        if value is not None and not isinstance(value, bool):
            raise self._fail(name, value, "a boolean")
        return value

    def number(self, name: str) -> float | None:
        value = self._raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(name, value, "f32")
        value = float(value)
        if not math.isfinite(value):  # 1e999 parses to inf in Python
            raise DeserializationError(f"{self._prefix}{name}: number out of range, expected f32")
        return value

    def integer(self, name: str, low: int, high: int, kind: str) -> int | None:
        value = self._raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, value, kind)
        if not low <= value <= high:
            raise DeserializationError(
                f"{self._prefix}{name}: invalid value: integer `{value}`, expected {kind}"
            )
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self._raw.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self._fail(name, value, "a sequence")
        for item in value:
            if not isinstance(item, str):
                raise self._fail(name, item, "a string")
        return tuple(value)


def _json_kind(value: Any) -> str:
    """How serde names a JSON value in its errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value[:50])}"
    if isinstance(value, list):
        return "sequence"
    return "map"
