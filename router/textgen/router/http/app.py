"""The HTTP surface: TGI's routes on Starlette."""

from __future__ import annotations

import asyncio
import json
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

from textgen.router.client import ShardClient
from textgen.router.errors import PayloadTooLargeError, RouterError, UnhealthyError, ValidationError
from textgen.router.http.responses import generate_json, sse, stream_json
from textgen.router.infer import Infer
from textgen.router.metrics import render
from textgen.router.request import Entry
from textgen.router.scheduler import Scheduler
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
    detector: Detector | None = None


def error_response(error: RouterError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"Request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"Request body is larger than {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValidationError(f"Failed to parse the request body as JSON: {error}") from error


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
    """Admit a request and answer it; `stream=None` reads the choice from the body (`/`)."""
    state = _state(request)
    try:
        body = await read_json(request, state.payload_limit)
        entry = await state.infer.submit(body)
    except RouterError as error:
        return error_response(error)
    as_list = stream is None
    if stream is None:
        stream = bool(body.get("stream"))  # validation admitted it: body is an object
    if stream:
        return EventStream(state.infer, entry)
    return await _complete(request, state.infer, entry, as_list)


async def _complete(request: Request, infer: Infer, entry: Entry, as_list: bool) -> Response:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, entry))
    try:
        events = [event async for event in infer.events(entry)]
    except RouterError as error:
        return error_response(error)
    finally:
        watcher.cancel()
        infer.finish(entry)
    body = generate_json(events, entry.request.details, entry.request.top_n_tokens)
    return JSONResponse([body] if as_list else body, headers=_timing_headers(entry))


class EventStream(StreamingResponse):
    """A request's SSE stream; the request is finished however the stream ends.

    A client that goes away is noticed when the next event cannot be written (or
    through `http.disconnect`); either way `finish` cancels the request, so the
    scheduler drops it at its next step and frees its blocks.
    """

    def __init__(self, infer: Infer, entry: Entry) -> None:
        super().__init__(
            _events(infer, entry),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._infer = infer
        self._entry = entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass
        finally:
            self._infer.finish(self._entry)


async def _events(infer: Infer, entry: Entry) -> AsyncIterator[bytes]:
    details = entry.request.details
    index = 0
    try:
        async for event in infer.events(entry):
            index += 1
            yield sse(stream_json(event, index, details))
    except RouterError as error:
        yield sse(error.body())


async def _cancel_on_disconnect(request: Request, entry: Entry) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
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


async def info(request: Request) -> Response:
    return JSONResponse(_state(request).info)


async def metrics(request: Request) -> Response:
    registry = _state(request).registry
    body = b"" if registry is None else render(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def build_app(
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
) -> Starlette:
    routes = [
        Route("/", compat_generate, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/watermark/detect", watermark_detect, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
