"""OpenAI's JSON shapes, built from the router's stream events.

TGI's generated text keeps a stop sequence that ended it; OpenAI's does not:
`trim_stop` cuts a finished text, and `StopHoldback` keeps a streamed one from
ever sending a stop sequence, holding back a tail that might start one.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from textgen.router.request import Ending, StreamEvent, Token

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def _logprob(token: Token) -> float | None:
    return None if token.logprob != token.logprob else token.logprob  # NaN -> null


def trim_stop(text: str, stops: tuple[str, ...]) -> str:
    """Cut `text` at its earliest stop sequence."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(found)] if found else text


class StopHoldback:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""
        self._stopped = False

    def feed(self, text: str) -> str:
        """The part of the text so far that can be sent: no stop sequence, no start of one."""
        if self._stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        trimmed = trim_stop(self._pending, self._stops)
        if len(trimmed) < len(self._pending):
            self._stopped = True
            self._pending = ""
            return trimmed
        keep = self._tail_starting_a_stop()
        ready, self._pending = self._pending[: len(self._pending) - keep], self._pending[-keep:]
        if not keep:
            self._pending = ""
        return ready

    def flush(self) -> str:
        """The held-back tail, once the request ended without reaching a stop sequence."""
        pending, self._pending = self._pending, ""
        return "" if self._stopped else pending

    def _tail_starting_a_stop(self) -> int:
        longest = max(len(stop) for stop in self._stops)
        for size in range(min(longest - 1, len(self._pending)), 0, -1):
            tail = self._pending[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0


@dataclass
class Choice:
    """One choice's tokens as they arrive; complete once it has its ending."""

    index: int
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[tuple[Token, ...]] = field(default_factory=list)
    ending: Ending | None = None

    def add(self, event: StreamEvent) -> None:
        self.tokens.append(event.token)
        self.top_tokens.append(event.top_tokens)
        if event.ending is not None:
            self.ending = event.ending

    @property
    def finish_reason(self) -> str | None:
        return None if self.ending is None else FINISH_REASONS[self.ending.finish_reason]


def usage_json(choices: list[Choice], prompt_lengths: list[int]) -> dict[str, int]:
    """Token counts: each distinct prompt once, every choice's generated tokens."""
    completion = sum(c.ending.generated_tokens for c in choices if c.ending is not None)
    prompt = sum(prompt_lengths)
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


# --- chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]} ---


def _chat_token(token: Token) -> dict[str, Any]:
    return {"token": token.text, "logprob": _logprob(token), "bytes": list(token.text.encode())}


def chat_logprobs(tokens: list[Token], top_tokens: list[tuple[Token, ...]]) -> dict[str, Any]:
    content = []
    for token, top in zip(tokens, top_tokens, strict=True):
        if token.special:
            continue
        entry = _chat_token(token)
        entry["top_logprobs"] = [_chat_token(t) for t in top]
        content.append(entry)
    return {"content": content}


# --- completions logprobs: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} ---


def completion_logprobs(
    tokens: list[Token], top_tokens: list[tuple[Token | None, ...]] | None, offset: int
) -> dict[str, Any]:
    """Legacy logprobs of `tokens`; text offsets count from `offset` in the choice's text."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    tops: list[dict[str, float] | None] = []
    for index, token in enumerate(tokens):
        if top_tokens is None:
            # Prompt tokens (echo) carry no alternatives: the token alone, none for the first.
            tops.append(None if _logprob(token) is None else {token.text: _logprob(token)})
        else:
            tops.append({t.text: _logprob(t) for t in top_tokens[index]})  # type: ignore[union-attr]
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [_logprob(t) for t in tokens],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def merge_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


@dataclass(frozen=True)
class Envelope:
    """What every response and chunk of one request repeats."""

    object: str
    model: str
    system_fingerprint: str
    id: str = ""
    created: int = 0

    @classmethod
    def new(cls, object: str, prefix: str, model: str, fingerprint: str) -> Envelope:
        return cls(object, model, fingerprint, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
            **extra,
        }
