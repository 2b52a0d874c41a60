"""The router's uvicorn server on a real socket: the deadline on request heads."""

import asyncio
import contextlib
import socket

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from textgen.router.http import server
from textgen.router.http.guard import Lifecycle

HEAD_TIMEOUT_S = 0.5


async def hello(request):
    return PlainTextResponse("hello")


@contextlib.asynccontextmanager
async def serving(monkeypatch):
    monkeypatch.setattr(server, "HEAD_TIMEOUT_S", HEAD_TIMEOUT_S)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Starlette(routes=[Route("/", hello)])
    running = server.make_server(app, "127.0.0.1", port, Lifecycle(), graceful_timeout_s=1)
    running.config.lifespan = "off"
    task = asyncio.create_task(running.serve())
    while not running.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        running.should_exit = True
        await task


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout_s) == b""
    except (TimeoutError, ConnectionResetError):
        return False


async def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_deadline(monkeypatch):
    async with serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(ConnectionError):
            for _ in range(10):  # a header byte every 0.2 s: never a whole head
                writer.write(b"x")
                await writer.drain()
                if reader.at_eof():
                    break
                await asyncio.sleep(0.2)
        assert await closed_within(reader, 2.0)
        assert loop.time() - started < HEAD_TIMEOUT_S + 1.0
        writer.close()


async def test_heads_in_time_are_served_also_on_a_kept_alive_connection(monkeypatch):
    async with serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            await asyncio.sleep(HEAD_TIMEOUT_S / 2)  # slow, but within the deadline
            writer.write(b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(5) == b"hello"
            # Idle between requests: the next head's deadline runs from this response's end.
            await asyncio.sleep(HEAD_TIMEOUT_S * 0.2)
        writer.close()


async def test_a_connection_that_never_sends_a_head_is_closed(monkeypatch):
    async with serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(reader, HEAD_TIMEOUT_S + 1.0)
        writer.close()
