"""The HTTP surface: TGI's routes on Starlette."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from textgen.router.best_of import pick_best
from textgen.router.client import ShardClient
from textgen.router.errors import (
    PayloadTooLargeError,
    RouterError,
    UnhealthyError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from textgen.router.generate_request import GenerateRequest, parse_request
from textgen.router.http.errors import error_response, unexpected_error
from textgen.router.http.guard import AccessPolicy, Lifecycle, middleware
from textgen.router.http.responses import generate_json, sse, stream_json, tokenize_json
from textgen.router.infer import Infer
from textgen.router.json_input import loads
from textgen.router.metrics import render
from textgen.router.request import Entry, StreamEvent
from textgen.router.scheduler import Scheduler
from textgen.router.tokenize import token_spans
from textgen.router.watermark import Detector

# A step that succeeded this recently proves the shards healthy without asking them.
_HEALTHY_STEP_AGE_S = 5.0
_HEALTH_TIMEOUT_S = 5.0


@dataclass
class RouterState:
    """What the handlers need; built in the lifespan once the shards are warm."""

    infer: Infer
    scheduler: Scheduler
    client: ShardClient
    info: dict[str, Any]
    payload_limit: int
    registry: CollectorRegistry | None = None
    compat_return_full_text: bool = True
    """`POST /`'s default for return_full_text: TGI's is true for text-generation models."""
    detector: Detector | None = None
    stream_keepalive_s: float = 10.0
    """An SSE stream silent this long (queued, or a slow step) gets a comment line."""


async def read_json(request: Request, limit: int) -> Any:
    """The body of a JSON route: declared JSON, at most `limit` bytes, and usable (json_input).

    NOTE: a body not declared `application/json` is refused (415) before it is read: a
    browser sends `text/plain` cross-origin without a CORS preflight, so accepting it would
    let any web page spend the compute of a server its visitors can reach.
    """
    if not _declared_json(request.headers.get("content-type", "")):
        raise UnsupportedMediaTypeError("Expected request with `Content-Type: application/json`")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"Request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"Request body is larger than {limit} bytes")
    return loads(bytes(body))


def _declared_json(content_type: str) -> bool:
    """`application/json` or `application/<anything>+json`, with any parameters."""
    mime = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _state(request: Request) -> RouterState:
    return request.app.state.router


async def generate(request: Request) -> Response:
    return await _handle(request, stream=False)


async def generate_stream(request: Request) -> Response:
    return await _handle(request, stream=True)


async def compat_generate(request: Request) -> Response:
    """TGI's `POST /`: `stream` picks the route; non-streamed results come as a list."""
    return await _handle(request, stream=None)


async def _handle(request: Request, stream: bool | None) -> Response:
    """Admit a request and answer it; `stream=None` reads the choice from the body (`/`).

    As TGI: a body that is not a GenerateRequest is an HTTP error on every route,
    but on a stream a request that fails validation gets a 200 stream holding one
    error event. Overload stays an HTTP 429 with Retry-After on every route.
    """
    state = _state(request)
    try:
        parsed = parse_request(await read_json(request, state.payload_limit))
    except RouterError as error:
        return error_response(error)
    as_list = stream is None
    if stream is None:
        parsed = _compat_defaults(parsed, state.compat_return_full_text)
        stream = parsed.stream
    try:
        entries = await state.infer.submit_all(parsed, stream=stream)
    except ValidationError as error:
        return ErrorEventStream(error) if stream else error_response(error)
    except RouterError as error:
        return error_response(error)
    if stream:
        return EntryStream(_events(state.infer, entries[0]), state, entries)
    return await _complete(request, state.infer, entries, as_list)


def _compat_defaults(parsed: GenerateRequest, return_full_text: bool) -> GenerateRequest:
    if parsed.parameters.return_full_text is not None:
        return parsed
    parameters = dataclasses.replace(parsed.parameters, return_full_text=return_full_text)
    return dataclasses.replace(parsed, parameters=parameters)


async def _complete(
    request: Request, infer: Infer, entries: list[Entry], as_list: bool
) -> Response:
    """Wait for every sequence of the request; answer with the best (one unless best_of)."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, entries))
    try:
        sequences = await asyncio.gather(*(_collect(infer, entry) for entry in entries))
    except RouterError as error:
        return error_response(error)
    finally:
        watcher.cancel()
        for entry in entries:
            infer.finish(entry)
    best = pick_best(sequences)
    others = [events for i, events in enumerate(sequences) if i != best]
    body = generate_json(entries[best].request, sequences[best], others)
    return JSONResponse([body] if as_list else body, headers=_timing_headers(entries[best]))


async def _collect(infer: Infer, entry: Entry) -> list[StreamEvent]:
    return [event async for event in infer.events(entry)]


class ErrorEventStream(StreamingResponse):
    """A stream that fails validation: status 200 and one error event, as TGI answers."""

    def __init__(self, error: RouterError) -> None:
        super().__init__(
            _one_event(error), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )


async def _one_event(error: RouterError) -> AsyncIterator[bytes]:
    yield sse(error.body())


class EntryStream(StreamingResponse):
    """An SSE stream over a request's entries; they are finished however the stream ends.

    A client that goes away is noticed when the next event cannot be written (or
    through `http.disconnect`); either way `finish` cancels the requests, so the
    scheduler drops them at its next step and frees their blocks.
    """

    def __init__(
        self, chunks: AsyncIterator[bytes], state: RouterState, entries: list[Entry]
    ) -> None:
        super().__init__(
            keep_alive(chunks, state.stream_keepalive_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._infer = state.infer
        self._entries = entries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass
        finally:
            for entry in self._entries:
                self._infer.finish(entry)


KEEP_ALIVE = b": keep-alive\n\n"
"""An SSE comment: clients skip it; proxies see a live connection."""


async def keep_alive(chunks: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """`chunks`, with KEEP_ALIVE whenever none has come for `interval_s` seconds.

    A request queued behind others sends nothing until its first token, and
    proxies and load balancers close connections idle for 30 to 60 s. One task
    per stream moves the chunks to a queue that is read with a timeout: a few
    microseconds per chunk (a task per chunk cost four times as much).
    """
    queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        except Exception as error:  # re-raised where the stream is read
            queue.put_nowait(error)
        queue.put_nowait(None)

    pumping = asyncio.create_task(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(interval_s):
                    item = await queue.get()
            except TimeoutError:
                yield KEEP_ALIVE
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


async def _events(infer: Infer, entry: Entry) -> AsyncIterator[bytes]:
    index = 0
    try:
        async for event in infer.events(entry):
            index += 1
            yield sse(stream_json(event, index, entry.request))
    except RouterError as error:
        yield sse(error.body())


async def cancel_on_disconnect(request: Request, entries: list[Entry]) -> None:
    """Cancel the entries when the client of a non-streamed request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for entry in entries:
                entry.cancel()
            return


def _timing_headers(entry: Entry) -> dict[str, str]:
    t = entry.timings
    inference_ms = 1000 * (t.finished - t.batched)
    return {
        "x-compute-type": "cpu",
        "x-total-time": str(int(1000 * (time.monotonic() - t.received))),
        "x-validation-time": str(int(1000 * (t.queued - t.received))),
        "x-queue-time": str(int(1000 * (t.batched - t.queued))),
        "x-inference-time": str(int(inference_ms)),
        "x-time-per-token": str(int(inference_ms / max(entry.num_generated, 1))),
        "x-prompt-tokens": str(entry.request.input_len),
        "x-generated-tokens": str(entry.num_generated),
    }


async def watermark_detect(request: Request) -> Response:
    """Score a text (or token ids) for this server's watermark."""
    state = _state(request)
    try:
        if state.detector is None:
            raise RouterError("watermark detection is not configured")
        body = await read_json(request, state.payload_limit)
        detection = await state.detector.detect(body)
    except RouterError as error:
        return error_response(error)
    return JSONResponse(detection.to_json())


async def health(request: Request) -> Response:
    state = _state(request)
    if time.monotonic() - state.scheduler.last_step_ok < _HEALTHY_STEP_AGE_S:
        return Response(status_code=200)
    try:
        await asyncio.wait_for(state.client.health(), _HEALTH_TIMEOUT_S)
    except (grpc.aio.AioRpcError, asyncio.TimeoutError):
        return error_response(UnhealthyError("unhealthy"))
    return Response(status_code=200)


async def tokenize(request: Request) -> Response:
    """TGI's `/tokenize`: the tokens of `inputs` with their character spans."""
    state = _state(request)
    try:
        parsed = parse_request(await read_json(request, state.payload_limit))
    except RouterError as error:
        return error_response(error)
    tokenizer = state.infer.tokenizer
    ids, texts, offsets = await asyncio.to_thread(
        token_spans, tokenizer, parsed.inputs, parsed.add_special_tokens
    )
    return JSONResponse(tokenize_json(ids, texts, offsets))


async def info(request: Request) -> Response:
    return JSONResponse(_state(request).info)


async def metrics(request: Request) -> Response:
    registry = _state(request).registry
    body = b"" if registry is None else render(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def build_app(
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
    policy: AccessPolicy | None = None,
    lifecycle: Lifecycle | None = None,
) -> Starlette:
    """The routes behind the middleware of `policy` (guard.py); errors in each route's shape."""
    routes = [
        Route("/", compat_generate, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/watermark/detect", watermark_detect, methods=["POST"]),
    ]
    from textgen.router.http.openai import openai_routes  # it imports this module

    routes += openai_routes()
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware(policy or AccessPolicy(), lifecycle or Lifecycle()),
        exception_handlers={Exception: unexpected_error},
    )
