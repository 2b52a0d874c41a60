"""API keys, CORS, stream keep-alives and the SIGTERM drain, on the real launcher.

Real clients carry the keys: the `openai` SDK (`api_key`) and huggingface_hub's
`InferenceClient` (`token`), both as `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from launcher_process import Launcher, shard_commands, start_launcher, stop_launcher

FLAG_KEY = "tg-Flag-Key-7f3a"
FILE_KEY = "tg-File-Key-91c2"
ORIGIN = "https://app.example"
SHORT = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    tmp = tmp_path_factory.mktemp("secured")
    key_file = tmp / "keys"
    key_file.write_text(f"# one key per line\n{FILE_KEY}\n")
    running = start_launcher(
        tmp,
        "--api-key", FLAG_KEY,
        "--api-key-file", str(key_file),
        "--cors-allow-origin", ORIGIN,
        "--max-batch-size", "1",  # a second request waits in the queue
        "--stream-keepalive-interval", "1",
    )  # fmt: skip
    yield running
    stop_launcher(running)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (bearer("wrong"), 401),
        (bearer(FLAG_KEY.lower()), 401),  # differs only in case: another key
        (bearer(FLAG_KEY.swapcase()), 401),
        (bearer(FLAG_KEY), 200),
        (bearer(FILE_KEY), 200),
        ({"x-api-key": FILE_KEY}, 200),
    ],
)
def test_api_keys(secured: Launcher, headers: dict[str, str], status: int):
    with httpx.Client(base_url=secured.url, timeout=60) as client:
        tgi = client.post("/generate", json=SHORT, headers=headers)
        models = client.get("/v1/models", headers=headers)
        info = client.get("/info", headers=headers)
    assert (tgi.status_code, models.status_code, info.status_code) == (status,) * 3
    if status == 401:
        assert tgi.json()["error_type"] == "unauthorized"
        assert models.json()["error"]["code"] == "unauthorized"


def test_health_and_metrics_answer_without_a_key(secured: Launcher):
    assert httpx.get(secured.url + "/health").status_code == 200
    assert httpx.get(secured.url + "/metrics").status_code == 200


def test_the_key_is_not_on_any_command_line(secured: Launcher):
    for _, argv in shard_commands(secured).values():
        assert FLAG_KEY not in " ".join(argv)
    router = [
        proc
        for proc in Path("/proc").iterdir()
        if proc.name.isdigit()
        and _cmdline(proc).count("textgen-router")
        and secured.url.rsplit(":", 1)[1] in _cmdline(proc)
    ]
    assert len(router) == 1
    assert FLAG_KEY not in _cmdline(router[0]) and FILE_KEY not in _cmdline(router[0])


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def test_real_clients_with_keys(secured: Launcher):
    from huggingface_hub import InferenceClient

    client = openai.OpenAI(base_url=secured.url + "/v1", api_key=FLAG_KEY)
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.url + "/v1", api_key="wrong").models.list()
    hub = InferenceClient(base_url=secured.url, token=FILE_KEY)
    assert hub.text_generation("Hi", max_new_tokens=2)


def test_cors_preflight_from_an_allowed_and_a_refused_origin(secured: Launcher):
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    allowed = httpx.options(
        secured.url + "/v1/chat/completions", headers={"origin": ORIGIN, **preflight}
    )
    refused = httpx.options(
        secured.url + "/v1/chat/completions",
        headers={"origin": "https://evil.example", **preflight},
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    call = httpx.post(
        secured.url + "/generate", json=SHORT, headers={"origin": ORIGIN, **bearer(FLAG_KEY)}
    )
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == ORIGIN


async def test_a_queued_stream_is_kept_alive(secured: Launcher):
    """With --max-batch-size 1, a stream waits behind a 300-token request: it gets SSE
    comments every second until its first token, then its tokens as usual."""
    long = {
        "inputs": "Tell me a story",
        "parameters": {"max_new_tokens": 300, "ignore_eos_token": True},
    }
    async with httpx.AsyncClient(
        base_url=secured.url, headers=bearer(FLAG_KEY), timeout=120
    ) as client:
        ahead = asyncio.create_task(client.post("/generate", json=long))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        lines = []
        async with client.stream("POST", "/generate_stream", json=SHORT) as response:
            async for line in response.aiter_lines():
                if line:
                    lines.append((time.monotonic() - started, line))
        assert (await ahead).status_code == 200
    first_data = next(i for i, (_, line) in enumerate(lines) if line.startswith("data:"))
    waited = lines[first_data][0]
    comments = [line for _, line in lines[:first_data]]
    assert waited > 2, "the stream was not queued behind the long request"
    assert comments and all(line == ": keep-alive" for line in comments)
    assert len(comments) >= int(waited) - 1
    assert json.loads(lines[-1][1][5:])["generated_text"]


async def test_sigterm_drains_active_streams_refuses_new_requests_and_exits_0(tmp_path: Path):
    """SIGTERM with two streams running: a new request gets 503 in the JSON shape, the short
    stream finishes with its final event, the long one is ended with an error event when the
    grace period (8 s) runs out, the launcher exits 0 and no process is left."""
    launcher = start_launcher(tmp_path, "--graceful-termination-timeout", "8")
    shards = shard_commands(launcher)

    async def events(client: httpx.AsyncClient, new_tokens: int, first: asyncio.Event) -> list:
        body = {
            "inputs": "Tell me a story",
            "parameters": {"max_new_tokens": new_tokens, "ignore_eos_token": True},
        }
        received = []
        async with client.stream("POST", "/generate_stream", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    received.append(json.loads(line[5:]))
                    first.set()
        return received

    try:
        async with httpx.AsyncClient(base_url=launcher.url, timeout=60) as client:
            short_started, long_started = asyncio.Event(), asyncio.Event()
            short = asyncio.create_task(events(client, 100, short_started))
            long = asyncio.create_task(events(client, 1400, long_started))
            await asyncio.wait_for(asyncio.gather(short_started.wait(), long_started.wait()), 60)
            launcher.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=launcher.url, timeout=10) as fresh:
                refused = await fresh.post("/generate", json=SHORT)
            short_events, long_events = await short, await long
        exit_code = await asyncio.to_thread(launcher.process.wait, 60)
    finally:
        stop_launcher(launcher)
    assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"
    assert short_events[-1]["details"] is None and short_events[-1]["generated_text"] is not None
    assert len(short_events) == 100
    assert long_events[-1]["error_type"] == "unavailable"
    assert 1 < len(long_events) < 1400
    assert exit_code == 0
    for pid, _ in shards.values():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert "Traceback" not in launcher.log()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
