"""JSON from clients, read so that no document can reach the router as a crash.

Two things valid JSON can hold would fail deep inside the router as a Python
exception (a 500) instead of a 4xx: nesting so deep that the decoder, or any
recursive code after it, exhausts Python's recursion limit; and a `\\ud800`
escape, a lone surrogate, which decodes to a `str` that the tokenizer (and any
UTF-8 encoder) refuses. Both are refused here, where the document is read, as
serde_json refuses them in TGI's router: nesting past 128 levels (serde_json's
limit too) and strings that are not valid Unicode. The check walks the decoded
document once, without recursion.
"""

from __future__ import annotations

import json
from typing import Any

from textgen.router.errors import JsonSyntaxError

MAX_DEPTH = 128
"""Arrays and objects nested deeper than this are refused (serde_json's default)."""


def loads(document: bytes | str) -> Any:
    """The decoded document, or `JsonInputError` (400) for anything the router cannot use.

    NaN and Infinity are refused too: they are not JSON.
    """
    try:
        value = json.loads(document, parse_constant=_reject_constant)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise JsonInputError(str(error)) from None
    check_document(value)
    return value


class JsonInputError(JsonSyntaxError):
    """The body is not JSON the router can use (400); `detail` says why, without the preamble."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Failed to parse the request body as JSON: {detail}")
        self.detail = detail


def check_document(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings holding lone surrogates."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            _check_string(item)
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            if isinstance(item, dict):
                for key in item:
                    _check_string(key)
                children = item.values()
            else:
                children = item
            pending.extend((child, depth + 1) for child in children)


def _check_string(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        surrogate = f"\\u{ord(text[error.start]):04x}"
        raise JsonInputError(
            f"a string holds the lone surrogate {surrogate}, which is not valid Unicode"
        ) from None


def _too_deep() -> JsonInputError:
    return JsonInputError(
        f"recursion limit exceeded (arrays and objects nest at most {MAX_DEPTH} levels)"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")
