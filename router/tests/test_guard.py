"""What stands in front of the routes: API keys, CORS, head limits, the drain, keep-alives."""

import asyncio
import json
import logging

import httpx
import pytest
from observed_router import observed_router

from textgen.router import logs
from textgen.router.errors import OverloadedError
from textgen.router.http import app as http_app
from textgen.router.http import openai as http_openai
from textgen.router.http.app import KEEP_ALIVE, keep_alive
from textgen.router.http.guard import AccessPolicy, HeadLimits, Lifecycle, read_key_file

KEY = "tg-Secret-key-1"
OTHER_KEY = "tg-other-key-2"
GENERATE = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def keyed(*keys: str) -> AccessPolicy:
    return AccessPolicy(api_keys=keys)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": f"Bearer {KEY.lower()}"}, 401),  # keys are compared exactly
        ({"authorization": f"Bearer {KEY.upper()}"}, 401),
        ({"authorization": f"Basic {KEY}"}, 401),
        ({"authorization": "Bearer "}, 401),
        ({"authorization": f"Bearer {KEY}"}, 200),
        ({"authorization": f"bearer {KEY}"}, 200),  # the scheme is case-insensitive (RFC 7235)
        ({"authorization": f"Bearer {OTHER_KEY}"}, 200),
        ({"x-api-key": KEY}, 200),
    ],
)
async def test_api_keys_on_tgi_and_openai_routes(headers, status):
    async with observed_router(policy=keyed(KEY, OTHER_KEY)) as (client, _, _):
        tgi = await client.post("/generate", json=GENERATE, headers=headers)
        openai = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert (tgi.status_code, openai.status_code) == (status, status)
    if status == 401:
        assert tgi.json()["error_type"] == "unauthorized"
        assert openai.json()["error"]["code"] == "unauthorized"
        assert openai.json()["error"]["type"] == "invalid_request_error"
        assert tgi.headers["www-authenticate"] == "Bearer"


async def test_health_and_metrics_stay_open_and_everything_else_wants_a_key():
    async with observed_router(policy=keyed(KEY)) as (client, _, _):
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        for path in ("/info", "/v1/models"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"x-api-key": KEY})).status_code == 200
        for path in ("/tokenize", "/generate_stream", "/v1/completions", "/chat_tokenize"):
            response = await client.post(path, json={"inputs": "Hi", "prompt": "Hi"})
            assert response.status_code == 401, path


def test_key_files_skip_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team a\n{KEY}\n\n  {OTHER_KEY}  \n")
    assert read_key_file(str(path)) == [KEY, OTHER_KEY]


async def test_cors_preflight_from_an_allowed_and_a_refused_origin():
    policy = AccessPolicy(api_keys=(KEY,), cors_allow_origins=("https://app.example",))
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    async with observed_router(policy=policy) as (client, _, _):
        allowed = await client.options(
            "/v1/chat/completions", headers={"origin": "https://app.example", **preflight}
        )
        refused = await client.options(
            "/v1/chat/completions", headers={"origin": "https://evil.example", **preflight}
        )
        call = await client.post(
            "/generate",
            json=GENERATE,
            headers={"origin": "https://app.example", "authorization": f"Bearer {KEY}"},
        )
        no_key = await client.post(
            "/generate", json=GENERATE, headers={"origin": "https://app.example"}
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert call.status_code == 200
    assert call.headers["access-control-allow-origin"] == "https://app.example"
    # A browser page can read the refusal, and why.
    assert no_key.status_code == 401
    assert no_key.headers["access-control-allow-origin"] == "https://app.example"


async def test_without_origins_no_cors_headers_are_sent():
    async with observed_router() as (client, _, _):
        response = await client.post(
            "/generate", json=GENERATE, headers={"origin": "https://x.example"}
        )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_json_routes_refuse_a_body_not_declared_json(content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    body = json.dumps(GENERATE).encode()
    async with observed_router() as (client, _, _):
        tgi = await client.post("/generate", content=body, headers=headers)
        openai = await client.post("/v1/completions", content=body, headers=headers)
        good = await client.post(
            "/generate", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
    assert tgi.status_code == openai.status_code == 415
    assert tgi.json()["error"] == "Expected request with `Content-Type: application/json`"
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert good.status_code == 200


async def test_request_heads_over_the_limits_get_431():
    policy = AccessPolicy(head_limits=HeadLimits(max_headers=20, max_header_bytes=2048))
    async with observed_router(policy=policy) as (client, _, _):
        many = await client.post(
            "/generate", json=GENERATE, headers={f"x-h{i}": "v" for i in range(30)}
        )
        large = await client.post("/v1/completions", json=GENERATE, headers={"x-big": "v" * 4000})
        good = await client.post("/generate", json=GENERATE)
    assert many.status_code == 431 and "at most 20" in many.json()["error"]
    assert large.status_code == 431 and "2048 bytes" in large.json()["error"]["message"]
    assert good.status_code == 200


async def test_drain_refuses_new_requests_lets_short_ones_finish_and_ends_the_rest():
    lifecycle = Lifecycle()
    # 20 ms per step: "L" (200 tokens) takes 4 s, "H" (11 tokens) 0.2 s.
    async with observed_router(step_interval_s=0.02, lifecycle=lifecycle) as (client, _, _):

        async def events(prompt: str) -> list[dict]:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 60}}
            async with client.stream("POST", "/generate_stream", json=body) as response:
                lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
            return [json.loads(line[5:]) for line in lines]

        short = asyncio.create_task(events("H"))
        long = asyncio.create_task(events("L"))
        plain = asyncio.create_task(client.post("/generate", json={"inputs": "L"}))
        await asyncio.sleep(0.1)
        drain = asyncio.create_task(lifecycle.drain(0.6))
        await asyncio.sleep(0.05)
        refused = await client.post("/generate", json=GENERATE)
        health = await client.get("/health")
        metrics = await client.get("/metrics")
        await drain
        short_events, long_events, plain = await short, await long, await plain
    assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"
    assert health.status_code == 503 and metrics.status_code == 200
    assert short_events[-1]["generated_text"] == "Hello world"
    assert "error" not in short_events[-1]
    assert long_events[-1]["error_type"] == "unavailable"
    assert 1 < len(long_events) < 60
    assert plain.status_code == 503 and plain.json()["error_type"] == "unavailable"
    assert lifecycle.active == 0


async def test_drain_returns_at_once_when_nothing_runs():
    lifecycle = Lifecycle()
    ended = []
    lifecycle.abort = lambda error: ended.append(error) or 0
    await asyncio.wait_for(lifecycle.drain(30), 1)
    assert lifecycle.draining and not ended


async def test_a_silent_stream_gets_keep_alive_comments():
    async def slow():
        await asyncio.sleep(0.35)
        yield b"data:1\n\n"
        yield b"data:2\n\n"

    chunks = [chunk async for chunk in keep_alive(slow(), 0.1)]
    assert chunks[-2:] == [b"data:1\n\n", b"data:2\n\n"]
    assert 2 <= chunks.count(KEEP_ALIVE) <= 4
    assert set(chunks[:-2]) == {KEEP_ALIVE}


async def test_closing_a_kept_alive_stream_closes_the_source():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                await asyncio.sleep(1)
                yield b"data:x\n\n"
        finally:
            closed.set()

    stream = keep_alive(endless(), 0.05)
    assert await anext(stream) == KEEP_ALIVE
    await stream.aclose()
    assert closed.is_set()


async def test_a_slow_stream_is_kept_alive_through_the_route():
    # 150 ms per step and a 50 ms interval: comments come between the tokens.
    async with observed_router(step_interval_s=0.15, stream_keepalive_s=0.05) as (client, _, _):
        body = {"inputs": "L", "parameters": {"max_new_tokens": 3}}
        async with client.stream("POST", "/generate_stream", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    data = [line for line in lines if line.startswith("data:")]
    assert len(data) == 3 and json.loads(data[-1][5:])["generated_text"] == "xxx"
    assert comments and all(line == ": keep-alive" for line in comments)


async def test_a_flood_of_429s_is_logged_once_per_interval(monkeypatch, caplog):
    monkeypatch.setattr(logs, "OVERLOAD_LOG_INTERVAL_S", 0.05)
    monkeypatch.setattr(logs, "_overload_log", logs._OverloadLog())
    with caplog.at_level(logging.INFO, logger="textgen.router.infer"):
        for _ in range(500):
            logs.log_rejection(OverloadedError())
        await asyncio.sleep(0.08)
        await asyncio.sleep(0.08)
    lines = [record for record in caplog.records if "Overloaded" in record.getMessage()]
    assert [record.levelname for record in lines] == ["WARNING", "WARNING"]
    assert "refused 499 more request(s)" in lines[1].getMessage()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_an_unexpected_exception_is_a_json_500_in_the_route_shape(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(http_app, "token_spans", broken)
    monkeypatch.setattr(http_openai, "chat_plan", broken)
    async with observed_router() as (_, app, _):
        # Starlette re-raises after answering, for the server's log; the client has its answer.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            tgi = await client.post("/tokenize", json={"inputs": "Hi"})
            openai = await client.post("/v1/chat/completions", json=CHAT)
            after = await client.post("/generate", json=GENERATE)
    assert tgi.status_code == openai.status_code == 500
    assert tgi.json() == {"error": "Internal server error (RuntimeError)", "error_type": "internal"}
    assert openai.json()["error"]["type"] == "server_error"
    assert openai.json()["error"]["message"] == "Internal server error (RuntimeError)"
    assert after.status_code == 200
