"""Process supervision: start the shards, then the router; stop them in order.

Design note. The launcher is a single-threaded poll loop (uvicorn style): a
signal handler only sets `should_exit`, and the loop notices it within one
poll interval. Lifecycle:

    start shards -> wait for every shard's Health -> start router -> watch
                                                                      |
    any child exits ---------> exit code = the child's (or 1)  <------+
    SIGINT/SIGTERM ----------> exit code 0
    either way: SIGTERM router, wait (it drains) -> SIGTERM shards, wait
                -> SIGKILL what is left -> remove the shards' sockets

NOTE: no child outlives the launcher. Every exit path runs the shutdown in a
`finally`, and each child is started with PR_SET_PDEATHSIG so the kernel kills
it even if the launcher itself is SIGKILLed. Children run in their own session
so that a terminal's Ctrl-C reaches only the launcher, which then stops them
in order instead of all at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

from textgen.launcher.commands import ChildCommands, shard_uds_path
from textgen.launcher.health import grpc_health_probe

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

ReadinessProbe = Callable[[str], bool]  # a shard's socket path -> ready


@dataclass(frozen=True)
class SupervisorConfig:
    num_shard: int
    shard_uds_path: str
    shard_ready_timeout_s: float = 600.0  # loading a large model from disk takes minutes
    router_stop_timeout_s: float = 60.0  # the router drains in-flight requests first
    shard_stop_timeout_s: float = 10.0
    poll_interval_s: float = 0.1


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]

    @property
    def exited(self) -> bool:
        return self.process.poll() is not None


class ShutdownRequested(Exception):
    """Raised inside the start-up phase when a signal asks the launcher to stop."""


class ChildExited(Exception):
    """A child died; carries the launcher's exit code."""

    def __init__(self, child: Child) -> None:
        code = child.process.returncode
        super().__init__(f"{child.name} exited with code {code}")
        self.exit_code = code if code and code > 0 else 1


class Supervisor:
    def __init__(
        self,
        config: SupervisorConfig,
        commands: ChildCommands,
        probe: ReadinessProbe = grpc_health_probe,
    ) -> None:
        self.config = config
        self.commands = commands
        self.probe = probe
        self.shards: list[Child] = []
        self.router: Child | None = None
        self.should_exit = False
        self.force_exit = False

    def run(self) -> int:
        """Start everything, supervise until a signal or a child's death; return the exit code."""
        with self._capture_signals():
            try:
                return self._serve()
            finally:
                self.shutdown()

    def _serve(self) -> int:
        try:
            self._start_shards()
            self._wait_shards_ready()
            self._start_router()
            while True:
                self._check()
                time.sleep(self.config.poll_interval_s)
        except ShutdownRequested:
            return 0
        except ChildExited as err:
            logger.error("%s", err)
            return err.exit_code
        except TimeoutError as err:
            logger.error("%s", err)
            return 1

    # --- start-up ---------------------------------------------------------

    def _start_shards(self) -> None:
        for rank in range(self.config.num_shard):
            logger.info("Starting shard rank=%d", rank)
            self.shards.append(self._spawn(f"shard rank={rank}", self.commands.shard(rank)))

    def _wait_shards_ready(self) -> None:
        deadline = time.monotonic() + self.config.shard_ready_timeout_s
        pending = set(range(self.config.num_shard))
        while pending:
            self._check()
            for rank in sorted(pending):
                if self.probe(shard_uds_path(self.config.shard_uds_path, rank)):
                    logger.info("Shard ready rank=%d", rank)
                    pending.discard(rank)
            if pending and time.monotonic() > deadline:
                raise TimeoutError(
                    f"shards {sorted(pending)} not ready after {self.config.shard_ready_timeout_s}s"
                )
            if pending:
                time.sleep(self.config.poll_interval_s)

    def _start_router(self) -> None:
        logger.info("Starting router")
        self.router = self._spawn("router", self.commands.router())

    def _spawn(self, name: str, argv: list[str]) -> Child:
        process = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent_hook())
        return Child(name, process)

    def _check(self) -> None:
        """Raise if a signal asked to stop or a child has exited."""
        if self.should_exit:
            raise ShutdownRequested
        for child in self._children():
            if child.exited:
                raise ChildExited(child)

    def _children(self) -> list[Child]:
        return self.shards + ([self.router] if self.router else [])

    # --- shutdown ---------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the router (it drains), then the shards; remove their sockets."""
        logger.info("Shutting down")
        if self.router is not None:
            self._stop([self.router], self.config.router_stop_timeout_s)
        self._stop(self.shards, self.config.shard_stop_timeout_s)
        self._remove_sockets()
        logger.info("Shutdown complete")

    def _stop(self, children: list[Child], timeout_s: float) -> None:
        for child in children:
            if not child.exited:
                logger.info("Terminating %s", child.name)
                _signal(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while not all(c.exited for c in children):
            if self.force_exit or time.monotonic() > deadline:
                self._kill(children)
                break
            time.sleep(self.config.poll_interval_s)

    def _kill(self, children: list[Child]) -> None:
        for child in children:
            if not child.exited:
                logger.warning("Killing %s", child.name)
                # The whole session: a shard's own helper processes go with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()

    def _remove_sockets(self) -> None:
        for rank in range(self.config.num_shard):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shard_uds_path(self.config.shard_uds_path, rank))

    # --- signals ------------------------------------------------------------

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._handle_exit) for sig in EXIT_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle_exit(self, signum: int, frame: FrameType | None) -> None:
        # A second signal during shutdown skips the grace periods.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
        logger.info("Received %s", signal.Signals(signum).name)


def _signal(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.process.send_signal(sig)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when the launcher dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: the child only makes the call, then execs.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)

    return hook
