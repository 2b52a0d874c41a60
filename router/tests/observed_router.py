"""The router on the fake shard with metrics and tracing wired as main.py does (test helper)."""

import asyncio
import contextlib
import json

import httpx
from prometheus_client import CollectorRegistry
from router_fakes import CharTokenizer, FakeShard, chat_tokenizer_info

from textgen.router.allocator import BlockAllocator
from textgen.router.http.app import RouterState, build_app
from textgen.router.http.guard import AccessPolicy, Lifecycle
from textgen.router.infer import Infer
from textgen.router.metrics import make_registry
from textgen.router.queue import Queue
from textgen.router.scheduler import Scheduler, SchedulerConfig
from textgen.router.telemetry import RouterMetrics, TokenLimits
from textgen.router.tracing import RouterTracing, wrap_app
from textgen.router.validation import Validation, ValidationLimits

REPLIES = {"H": "Hello world", "L": "x" * 200}
MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS = 32, 64


@contextlib.asynccontextmanager
async def observed_router(
    tracing: RouterTracing | None = None,
    step_interval_s: float = 0.001,
    policy: AccessPolicy | None = None,
    lifecycle: Lifecycle | None = None,
    stream_keepalive_s: float = 10.0,
):
    """The router on the fake shard, with metrics, tracing, the access policy and the
    drain wired as main.py does.

    The shard's decode steps are paced by a ticker so the event loop runs between them.
    """
    tracing = tracing or RouterTracing.disabled()
    shard = FakeShard(REPLIES, gate=asyncio.Semaphore(0))
    allocator = BlockAllocator(num_blocks=256, block_size=4)
    queue = Queue(allocator)
    registry = CollectorRegistry(auto_describe=True)
    metrics = RouterMetrics(registry, TokenLimits(MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS))
    config = SchedulerConfig(256, None, None, 0.3, 20)
    scheduler = Scheduler(shard, queue, allocator, config, metrics, tracing)
    limits = ValidationLimits(MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS, max_stop_sequences=2)
    validation = Validation(CharTokenizer().encode, limits)
    infer = Infer(validation, queue, chat_tokenizer_info(), 8, metrics, tracing)
    make_registry(queue, scheduler, allocator, registry)
    state = RouterState(
        infer,
        scheduler,
        shard,
        {"model_id": "fake"},
        10_000,
        registry,
        stream_keepalive_s=stream_keepalive_s,
    )
    if lifecycle is not None:
        lifecycle.abort = infer.abort_all

    async def tick() -> None:
        while True:
            shard.gate.release()
            await asyncio.sleep(step_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.router = state
        tasks = [asyncio.create_task(scheduler.run()), asyncio.create_task(tick())]
        yield
        for task in tasks:
            task.cancel()

    inner = build_app(lifespan, policy, lifecycle)
    app = wrap_app(inner, tracing)
    async with lifespan(inner):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, app, allocator


async def stream_until_first_token_then_disconnect(app, body: dict) -> None:
    """Drive the ASGI app like a client that reads one SSE event and hangs up."""
    first_chunk = asyncio.Event()
    request = {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
    pending = [request]

    async def receive():
        if pending:
            return pending.pop()
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/generate_stream",
        "raw_path": b"/generate_stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("test", 1),
        "server": ("test", 80),
    }
    await app(scope, receive, send)
