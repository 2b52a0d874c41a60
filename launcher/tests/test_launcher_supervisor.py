"""Supervision with stand-in children: start order, fail-fast, ordered shutdown, no orphans."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import pytest

from textgen.launcher.health import grpc_health_probe
from textgen.launcher.supervisor import Supervisor, SupervisorConfig
from textgen.proto import generate_pb2, generate_pb2_grpc

# A stand-in for a shard or the router. It logs "<role> <event> <pid>" lines,
# becomes "ready" by creating a file at the shard's socket path, and runs
# until SIGTERM (the router stand-in takes a while to "drain").
FAKE_CHILD = """
import os, signal, sys, time
role, events, ready_path, mode = sys.argv[1:5]

def log(event):
    with open(events, "a") as f:
        f.write(f"{role} {event} {os.getpid()}\\n")

def on_term(signum, frame):
    log("term")
    if mode == "ignore-term":
        return
    time.sleep(0.3 if role == "router" else 0.0)
    log("exit")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
log("start")
if mode.startswith("exit:"):
    time.sleep(0.2)
    sys.exit(int(mode[5:]))
if mode != "never-ready" and ready_path != "-":
    open(ready_path, "w").close()
while True:
    time.sleep(0.05)
"""

# Runs a Supervisor over stand-in commands in its own process, so that tests
# can signal (or SIGKILL) the launcher itself.
DRIVER = """
import json, os, sys
from textgen.launcher.log import setup_logging
from textgen.launcher.supervisor import Supervisor, SupervisorConfig

spec = json.loads(sys.argv[1])

class Commands:
    def shard(self, rank):
        return spec["shard"]

    def router(self):
        return spec["router"]

setup_logging(False)
config = SupervisorConfig(**spec["config"])
sys.exit(Supervisor(config, Commands(), probe=os.path.exists).run())
"""


@dataclass(frozen=True)
class FakeCommands:
    shard_argv: list[str]
    router_argv: list[str]

    def shard(self, rank: int) -> list[str]:
        return self.shard_argv

    def router(self) -> list[str]:
        return self.router_argv


@dataclass
class Setup:
    tmp_path: Path
    config: SupervisorConfig

    @property
    def events_path(self) -> Path:
        return self.tmp_path / "events.log"

    @property
    def socket_path(self) -> Path:
        return Path(f"{self.config.shard_uds_path}-0")

    def child(self, role: str, mode: str = "run") -> list[str]:
        script = self.tmp_path / "fake_child.py"
        script.write_text(FAKE_CHILD)
        ready = str(self.socket_path) if role == "shard" else "-"
        return [sys.executable, str(script), role, str(self.events_path), ready, mode]

    def commands(self, shard_mode: str = "run", router_mode: str = "run") -> FakeCommands:
        return FakeCommands(self.child("shard", shard_mode), self.child("router", router_mode))

    @property
    def log_path(self) -> Path:
        return self.tmp_path / "launcher.log"

    def events(self) -> list[tuple[str, str]]:
        if not self.events_path.exists():
            return []
        return [tuple(line.split()[:2]) for line in self.events_path.read_text().splitlines()]

    def pids(self) -> set[int]:
        return {int(line.split()[2]) for line in self.events_path.read_text().splitlines()}

    def wait_for(self, event: tuple[str, str], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while event not in self.events():
            assert time.monotonic() < deadline, f"no {event} in {self.events()}"
            time.sleep(0.02)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    config = SupervisorConfig(
        num_shard=1,
        shard_uds_path=str(tmp_path / "shard"),
        shard_ready_timeout_s=10.0,
        router_stop_timeout_s=5.0,
        shard_stop_timeout_s=5.0,
        poll_interval_s=0.02,
    )
    return Setup(tmp_path, config)


def pid_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie is dead too


def assert_no_orphans(pids: set[int], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(pid_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"children left running: {pids}"
        time.sleep(0.05)


# --- in-process: the supervisor's exit codes ---------------------------------


@pytest.mark.parametrize(("router_mode", "exit_code"), [("exit:3", 3), ("exit:0", 1)])
def test_router_death_stops_the_shard(setup: Setup, router_mode: str, exit_code: int) -> None:
    supervisor = Supervisor(setup.config, setup.commands(router_mode=router_mode), os.path.exists)
    assert supervisor.run() == exit_code
    events = setup.events()
    assert events.index(("shard", "start")) < events.index(("router", "start"))
    assert ("shard", "term") in events
    assert not setup.socket_path.exists()
    assert_no_orphans(setup.pids())


def test_shard_death_during_startup_fails_fast(setup: Setup) -> None:
    supervisor = Supervisor(setup.config, setup.commands(shard_mode="exit:5"), os.path.exists)
    start = time.monotonic()
    assert supervisor.run() == 5
    assert time.monotonic() - start < setup.config.shard_ready_timeout_s / 2
    assert ("router", "start") not in setup.events()


def test_shard_never_ready_times_out(setup: Setup) -> None:
    config = SupervisorConfig(**{**asdict(setup.config), "shard_ready_timeout_s": 0.5})
    supervisor = Supervisor(config, setup.commands(shard_mode="never-ready"), os.path.exists)
    assert supervisor.run() == 1
    assert ("shard", "term") in setup.events()
    assert ("router", "start") not in setup.events()
    assert_no_orphans(setup.pids())


def test_stubborn_shard_is_killed(setup: Setup) -> None:
    config = SupervisorConfig(**{**asdict(setup.config), "shard_stop_timeout_s": 0.3})
    commands = setup.commands(shard_mode="ignore-term", router_mode="exit:4")
    assert Supervisor(config, commands, os.path.exists).run() == 4
    assert ("shard", "term") in setup.events()
    assert ("shard", "exit") not in setup.events()
    assert_no_orphans(setup.pids())


# --- a separate launcher process: signals -------------------------------------


@pytest.fixture
def start_launcher(setup: Setup) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start the driver; its log goes to a file, not a pipe a stray child could hold open."""
    launched: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        commands = setup.commands()
        spec = {"config": asdict(setup.config), "shard": commands.shard_argv}
        spec["router"] = commands.router_argv
        argv = [sys.executable, "-c", DRIVER, json.dumps(spec)]
        with setup.log_path.open("w") as log:
            launched.append(subprocess.Popen(argv, stderr=log, text=True))
        setup.wait_for(("router", "start"))
        return launched[-1]

    yield start
    # Only after a failed test: leave no stand-in running.
    for process in launched:
        process.kill()
        process.wait()
    for pid in setup.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_router_then_shard(
    setup: Setup, start_launcher: Callable[[], subprocess.Popen[str]], sig: signal.Signals
) -> None:
    launcher = start_launcher()
    launcher.send_signal(sig)
    assert launcher.wait(timeout=20) == 0, setup.log_path.read_text()
    stderr = setup.log_path.read_text()
    stops = [e for e in setup.events() if e[1] in ("term", "exit")]
    assert stops == [("router", "term"), ("router", "exit"), ("shard", "term"), ("shard", "exit")]
    assert not setup.socket_path.exists()
    for line in ("Starting shard rank=0", "Shard ready", "Starting router", "Shutting down"):
        assert line in stderr
    assert "Traceback" not in stderr
    assert_no_orphans(setup.pids())


def test_children_die_with_a_killed_launcher(
    setup: Setup, start_launcher: Callable[[], subprocess.Popen[str]]
) -> None:
    launcher = start_launcher()
    launcher.kill()
    launcher.wait(timeout=10)
    assert_no_orphans(setup.pids())  # PR_SET_PDEATHSIG


# --- the real readiness probe --------------------------------------------------


class HealthyShard(generate_pb2_grpc.TextGenerationServiceServicer):
    def Health(self, request: object, context: object) -> generate_pb2.HealthResponse:
        return generate_pb2.HealthResponse()


def test_grpc_health_probe(tmp_path: Path) -> None:
    uds_path = str(tmp_path / "shard-0")
    assert not grpc_health_probe(uds_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(HealthyShard(), server)
    server.add_insecure_port(f"unix://{uds_path}")
    server.start()
    try:
        assert grpc_health_probe(uds_path)
    finally:
        server.stop(grace=None).wait()
    assert not grpc_health_probe(uds_path)
