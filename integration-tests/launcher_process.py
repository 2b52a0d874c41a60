"""Start and stop the real `textgen-launcher` as a child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 600


@dataclass
class Launcher:
    process: subprocess.Popen
    url: str
    uds_path: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def shard_commands(launcher: Launcher) -> dict[int, tuple[int, list[str]]]:
    """rank -> (pid, command line) of the launcher's shard children, read from /proc."""
    shards = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher.process.pid and "serve" in argv and "--rank" in argv:
            shards[int(argv[argv.index("--rank") + 1])] = (int(proc.name), argv)
    return shards


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_launcher(tmp: Path, *extra: str, dtype: str | None = "float32") -> Launcher:
    """The launcher on the default model; `dtype` None leaves the dtype to the shards."""
    port = free_port()
    uds_path = str(tmp / "shard")
    log_path = tmp / "launcher.log"
    command = [
        str(Path(sys.executable).parent / "textgen-launcher"),
        "--port", str(port),
        "--hostname", "127.0.0.1",
        "--shard-uds-path", uds_path,
        *(["--dtype", dtype] if dtype is not None else []),
        "--max-input-tokens", "1024",
        "--max-total-tokens", "1536",
        "--max-batch-prefill-tokens", "1024",
        "--kv-cache-memory-gib", "0.5",
        *extra,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    launcher = Launcher(process, f"http://127.0.0.1:{port}", uds_path, log_path)
    wait_healthy(launcher)
    return launcher


def wait_healthy(launcher: Launcher) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if launcher.process.poll() is not None:
            raise RuntimeError(f"launcher exited early:\n{launcher.log()}")
        try:
            if httpx.get(launcher.url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_launcher(launcher)
    raise RuntimeError(f"launcher not healthy after {STARTUP_TIMEOUT_S}s:\n{launcher.log()}")


def stop_launcher(launcher: Launcher) -> int:
    if launcher.process.poll() is None:
        launcher.process.send_signal(signal.SIGTERM)
        try:
            return launcher.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.process.pid, signal.SIGKILL)
            launcher.process.wait()
    return launcher.process.returncode
