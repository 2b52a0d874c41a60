"""The streaming APIs the benchmark speaks: request bodies and SSE event parsing.

One class per API behind the small `Api` interface, chosen once by name from `APIS`.
"""

import json
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class StreamEvent:
    """What one SSE event means to the benchmark."""

    has_token: bool = False  # the event carries generated text: one output token (chunk)
    done: bool = False  # the server marked the stream as complete
    error: str | None = None  # the server reported an error inside the stream
    usage_tokens: int | None = None  # output token count reported by the server, if any
    text: str = ""  # the generated text it carries (a chat's next turn resends it)


class Api(Protocol):
    path: str  # POSTed to, relative to the server URL

    def request_body(self, prompt: str, max_new_tokens: int, model: str) -> dict[str, Any]: ...

    def parse_event(self, data: str) -> StreamEvent:
        """Interprets the data of one SSE event; raises ValueError if it is not valid JSON."""
        ...


@dataclass(frozen=True)
class TgiApi:
    """TGI's /generate_stream: one event per token, the last with `generated_text` set."""

    watermark: bool = False  # ask for the green-list watermark (`parameters.watermark`)
    path = "/generate_stream"

    def request_body(self, prompt: str, max_new_tokens: int, model: str) -> dict[str, Any]:
        parameters = {
            "max_new_tokens": max_new_tokens,
            "ignore_eos_token": True,  # NOTE: every request generates exactly max_new_tokens
            "do_sample": False,
        }
        if self.watermark:
            parameters["watermark"] = True
        return {"inputs": prompt, "parameters": parameters}

    def parse_event(self, data: str) -> StreamEvent:
        event = _load_object(data)
        if "error" in event:
            return StreamEvent(error=f"{event.get('error_type', 'error')}: {event['error']}")
        token = event.get("token")
        text = token.get("text", "") if isinstance(token, dict) and not token.get("special") else ""
        return StreamEvent(
            has_token="token" in event, done=event.get("generated_text") is not None, text=text
        )


class OpenAiApi:
    """OpenAI's /v1/completions: text chunks, an optional `usage` chunk, then `[DONE]`."""

    path = "/v1/completions"

    def request_body(self, prompt: str, max_new_tokens: int, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }

    def parse_event(self, data: str) -> StreamEvent:
        if data.strip() == "[DONE]":
            return StreamEvent(done=True)
        chunk = _load_object(data)
        if "error" in chunk:
            return StreamEvent(error=_openai_error_message(chunk["error"]))
        choices = chunk.get("choices") or []
        texts = [
            c["text"] for c in choices if isinstance(c, dict) and isinstance(c.get("text"), str)
        ]
        usage = chunk.get("usage")
        usage_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return StreamEvent(has_token=any(texts), usage_tokens=usage_tokens, text="".join(texts))


APIS: dict[str, Api] = {"tgi": TgiApi(), "openai": OpenAiApi()}


def _load_object(data: str) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {data[:100]!r}")
    return value


def _openai_error_message(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('type', 'error')}: {error.get('message', error)}"
    return str(error)
