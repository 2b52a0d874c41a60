"""One streaming request: send it, read its SSE events, record when each token arrived."""

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import pairwise

import httpx

from textgen.benchmark.apis import Api

_MAX_ERROR_CHARS = 200


@dataclass
class RequestResult:
    """The timings of one request, in `time.perf_counter()` seconds."""

    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each token event
    usage_tokens: int | None = None  # the server's own count, preferred when sent
    error: str | None = None
    text: str = ""  # the generated text

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def num_output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        return [later - earlier for earlier, later in pairwise(self.token_times)]

    @property
    def latency(self) -> float:
        return self.end - self.start


async def send_request(
    client: httpx.AsyncClient,
    api: Api,
    prompt: str,
    max_new_tokens: int,
    model: str,
    extra: dict | None = None,
) -> RequestResult:
    """Sends one request (its body updated with `extra`); failures are recorded in the
    result, never raised."""
    body = {**api.request_body(prompt, max_new_tokens, model), **(extra or {})}
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", api.path, json=body) as response:
            if response.status_code == 200:
                await _read_stream(response, api, result)
            else:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:_MAX_ERROR_CHARS]}"
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: an event that is not JSON
        result.error = f"{type(exc).__name__}: {str(exc)[:_MAX_ERROR_CHARS]}"
    result.end = time.perf_counter()
    return result


async def _read_stream(response: httpx.Response, api: Api, result: RequestResult) -> None:
    done = False
    async for data in iter_sse_data(response.aiter_lines()):
        event = api.parse_event(data)
        if event.error is not None:
            result.error = event.error
            return
        if event.has_token:
            result.token_times.append(time.perf_counter())
        result.text += event.text
        if event.usage_tokens is not None:
            result.usage_tokens = event.usage_tokens
        done = done or event.done
    if not done:
        result.error = "stream ended before its final event"


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Yields the data of each server-sent event; events end at a blank line."""
    data: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []
        # Other fields (event:, id:, retry:) and comments (":") carry nothing we measure.
    if data:
        yield "\n".join(data)
