"""TGI's JSON shapes for generate responses and stream events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from textgen.router.request import Ending, StreamEvent, Token, ValidRequest


def token_json(token: Token) -> dict[str, Any]:
    logprob = None if token.logprob != token.logprob else token.logprob  # NaN -> null
    return {"id": token.id, "text": token.text, "logprob": logprob, "special": token.special}


def prefill_json(token: Token) -> dict[str, Any]:
    body = token_json(token)
    del body["special"]
    return body


def output_text(request: ValidRequest, ending: Ending) -> str:
    """The generated text, after the prompt when `return_full_text` (as TGI: the raw inputs)."""
    prefix = request.inputs if request.return_full_text else ""
    return prefix + ending.generated_text


def generate_json(
    request: ValidRequest,
    events: list[StreamEvent],
    best_of_sequences: Sequence[list[StreamEvent]] = (),
) -> dict[str, Any]:
    """`/generate`'s body; `best_of_sequences` are the sequences best_of did not pick."""
    ending = _ending(events)
    body: dict[str, Any] = {"generated_text": output_text(request, ending)}
    if request.details:
        body["details"] = _details(request, events)
        if request.best_of > 1:
            body["details"]["best_of_sequences"] = [
                {"generated_text": output_text(request, _ending(other)), **_details(request, other)}
                for other in best_of_sequences
            ]
    return body


def _ending(events: list[StreamEvent]) -> Ending:
    ending = events[-1].ending
    assert ending is not None, "a generate response is built from a finished request"
    return ending


def _details(request: ValidRequest, events: list[StreamEvent]) -> dict[str, Any]:
    ending = _ending(events)
    details: dict[str, Any] = {
        "finish_reason": ending.finish_reason,
        "generated_tokens": ending.generated_tokens,
        "seed": ending.seed,
        "prefill": [prefill_json(token) for token in ending.prefill],
        "tokens": [token_json(event.token) for event in events],
    }
    if request.top_n_tokens:
        details["top_tokens"] = [
            [token_json(token) for token in event.top_tokens] for event in events
        ]
    return details


def stream_json(event: StreamEvent, index: int, request: ValidRequest) -> dict[str, Any]:
    ending: Ending | None = event.ending
    body: dict[str, Any] = {
        "index": index,
        "token": token_json(event.token),
        "top_tokens": [token_json(token) for token in event.top_tokens],
        "generated_text": None if ending is None else output_text(request, ending),
        "details": None,
    }
    if ending is not None and request.details:
        body["details"] = {
            "finish_reason": ending.finish_reason,
            "generated_tokens": ending.generated_tokens,
            "seed": ending.seed,
            "input_length": ending.input_length,
        }
    return body


def tokenize_json(ids: list[int], texts: list[str], offsets: list[tuple[int, int]]) -> list[dict]:
    """`/tokenize`: TGI's list of {id, text, start, stop} (character offsets into the input)."""
    return [
        {"id": i, "text": text, "start": start, "stop": stop}
        for i, text, (start, stop) in zip(ids, texts, offsets, strict=True)
    ]


def sse(data: dict[str, Any]) -> bytes:
    return b"data:" + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
