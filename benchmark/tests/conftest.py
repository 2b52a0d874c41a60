"""A fake streaming server: TGI's and OpenAI's SSE formats, with small sleeps between tokens."""

import asyncio
import itertools
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FIRST_TOKEN_DELAY_S = 0.02
TOKEN_DELAY_S = 0.002


def make_app(fail_odd_requests: str | None = None, received: list | None = None) -> Starlette:
    """Streams `max_new_tokens` tokens per request.

    fail_odd_requests: None, "http" (status 500) or "event" (an error event after one
    token) for the 2nd, 4th, ... request the app receives. `received` collects the bodies.
    """
    request_numbers = itertools.count()
    received = received if received is not None else []

    async def generate_stream(request: Request) -> Response:
        body = await request.json()
        received.append(body)
        fails = next(request_numbers) % 2 == 1 and fail_odd_requests is not None
        if fails and fail_odd_requests == "http":
            return JSONResponse({"error": "boom", "error_type": "generation"}, status_code=500)
        fail_after = 1 if fails else None
        num_tokens = body["parameters"]["max_new_tokens"]
        return _sse(_tgi_events(num_tokens, fail_after))

    async def completions(request: Request) -> Response:
        body = await request.json()
        return _sse(_openai_events(body["max_tokens"]))

    routes = [
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


async def _tgi_events(num_tokens: int, fail_after: int | None) -> AsyncIterator[str]:
    await asyncio.sleep(FIRST_TOKEN_DELAY_S)
    for i in range(num_tokens):
        if i == fail_after:
            yield _data({"error": "out of memory", "error_type": "generation"})
            return
        last = i == num_tokens - 1
        token = {"id": i, "text": f" w{i}", "logprob": -0.5, "special": False}
        generated_text = "".join(f" w{j}" for j in range(num_tokens)) if last else None
        details = {"finish_reason": "length", "generated_tokens": num_tokens} if last else None
        event = {"index": i, "token": token, "generated_text": generated_text, "details": details}
        yield _data(event)
        await asyncio.sleep(TOKEN_DELAY_S)


async def _openai_events(num_tokens: int) -> AsyncIterator[str]:
    await asyncio.sleep(FIRST_TOKEN_DELAY_S)
    for i in range(num_tokens):
        finish_reason = "length" if i == num_tokens - 1 else None
        choice = {"index": 0, "text": f" w{i}", "finish_reason": finish_reason}
        yield _data({"id": "cmpl-1", "object": "text_completion", "choices": [choice]})
        await asyncio.sleep(TOKEN_DELAY_S)
    usage = {"prompt_tokens": 4, "completion_tokens": num_tokens, "total_tokens": num_tokens + 4}
    yield _data({"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def _data(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


@contextmanager
def serve(app: Starlette) -> Iterator[str]:
    """Runs `app` on uvicorn in a thread, on a free port of 127.0.0.1; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the fake server did not start")
            threading.Event().wait(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def fake_server() -> Callable[..., object]:
    """`with fake_server(...) as url:` serves a fresh fake app (its request count from 0)."""
    return lambda **kwargs: serve(make_app(**kwargs))
