"""TGI's JSON shapes for generate responses and stream events."""

from __future__ import annotations

import json
from typing import Any

from textgen.router.request import Ending, StreamEvent, Token


def token_json(token: Token) -> dict[str, Any]:
    logprob = None if token.logprob != token.logprob else token.logprob  # NaN -> null
    return {"id": token.id, "text": token.text, "logprob": logprob, "special": token.special}


def prefill_json(token: Token) -> dict[str, Any]:
    body = token_json(token)
    del body["special"]
    return body


def generate_json(events: list[StreamEvent], details: bool, top_n_tokens: int) -> dict[str, Any]:
    ending = events[-1].ending
    assert ending is not None, "a generate response is built from a finished request"
    body: dict[str, Any] = {"generated_text": ending.generated_text}
    if details:
        body["details"] = {
            "finish_reason": ending.finish_reason,
            "generated_tokens": ending.generated_tokens,
            "seed": ending.seed,
            "prefill": [prefill_json(token) for token in ending.prefill],
            "tokens": [token_json(event.token) for event in events],
        }
        if top_n_tokens:
            body["details"]["top_tokens"] = [
                [token_json(token) for token in event.top_tokens] for event in events
            ]
    return body


def stream_json(event: StreamEvent, index: int, details: bool) -> dict[str, Any]:
    ending: Ending | None = event.ending
    body: dict[str, Any] = {
        "index": index,
        "token": token_json(event.token),
        "top_tokens": [token_json(token) for token in event.top_tokens],
        "generated_text": None if ending is None else ending.generated_text,
        "details": None,
    }
    if ending is not None and details:
        body["details"] = {
            "finish_reason": ending.finish_reason,
            "generated_tokens": ending.generated_tokens,
            "seed": ending.seed,
            "input_length": ending.input_length,
        }
    return body


def sse(data: dict[str, Any]) -> bytes:
    return b"data:" + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
