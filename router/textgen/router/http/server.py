"""uvicorn, as the router runs it: a deadline on request heads and a drain on SIGTERM.

uvicorn's own SIGTERM handling stops listening at once and, after a fixed grace
period, cancels whatever still runs: a stream is then cut mid-body with no
final event. The router drains instead (TGI's and vLLM's behaviour): it keeps
listening and answers every new request 503 (so a load balancer that has not
yet noticed moves on, and a client sees why), lets the requests in flight
finish for up to `graceful_termination_timeout` seconds, ends any still
running with an error event (or a 503), and only then lets uvicorn shut down,
exiting 0. A second SIGTERM or SIGINT skips what is left of the wait.

A client may hold a connection without ever finishing a request head (sending
it a byte at a time): uvicorn's keep-alive timeout does not cover that, so each
head must arrive within HEAD_TIMEOUT_S of the connection opening or of the
previous response ending.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from textgen.router.http.guard import Lifecycle

logger = logging.getLogger("textgen.router.http")

HEAD_TIMEOUT_S = 10.0
"""Seconds a client has to send a whole request head."""
KEEP_ALIVE_TIMEOUT_S = 5
"""Seconds an idle keep-alive connection stays open."""
MAX_INCOMPLETE_HEAD_BYTES = 16 * 1024
"""A request head still incomplete at this size is refused (400)."""
_SHUTDOWN_TIMEOUT_S = 5
"""uvicorn's own grace after the drain: only connections left idle remain by then."""


class RouterProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_awaited = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._heads_awaited += 1
        self._head_timer = self.loop.call_later(
            HEAD_TIMEOUT_S, self._head_late, self._heads_awaited
        )

    def _head_late(self, awaited: int) -> None:
        # h11 leaves the client's side IDLE until a whole request head has arrived.
        if awaited == self._heads_awaited and self.conn.their_state is h11.IDLE:
            logger.debug("closing a connection: no request head within %.0f s", HEAD_TIMEOUT_S)
            self.transport.close()


class RouterServer(uvicorn.Server):
    """uvicorn.Server whose exit signal drains the router first."""

    def __init__(
        self, config: uvicorn.Config, lifecycle: Lifecycle, graceful_timeout_s: float
    ) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._graceful_timeout_s = graceful_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: uvicorn's own handler records the signal to re-raise it after shutdown (the
        # process would die by it); the router exits 0 after a drain instead.
        if self._loop is None or not self.started:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_exit_signal)

    def _on_exit_signal(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit(), name="drain")
        else:
            logger.info("Second exit signal: ending the requests still running now")
            self._drain.cancel()

    async def _drain_then_exit(self) -> None:
        try:
            await self._lifecycle.drain(self._graceful_timeout_s)
        except asyncio.CancelledError:
            await self._lifecycle.drain(0)
        finally:
            self.should_exit = True


def make_server(
    app: Any, host: str, port: int, lifecycle: Lifecycle, graceful_timeout_s: float
) -> RouterServer:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=RouterProtocol,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        timeout_graceful_shutdown=_SHUTDOWN_TIMEOUT_S,
        h11_max_incomplete_event_size=MAX_INCOMPLETE_HEAD_BYTES,
    )
    return RouterServer(config, lifecycle, graceful_timeout_s)
