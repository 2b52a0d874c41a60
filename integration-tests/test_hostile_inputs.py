"""Hostile input against the real server: every row gets its 4xx in the route's JSON shape,
and a normal request is answered right after it. No input may produce a 5xx.

One table: what is sent, on which routes, the status expected. TGI's routes answer
`{"error": str, "error_type": str}`, OpenAI's (`/v1/...`) `{"error": {"message", "type", ...}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest
from launcher_process import Launcher

JSON = {"content-type": "application/json"}
TGI_BODY_ROUTES = ("/generate", "/generate_stream", "/tokenize")
CHAT_ROUTES = ("/v1/chat/completions", "/chat_tokenize")


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_schema(levels: int) -> str:
    return '{"type":"object","properties":{"a":' * levels + '{"type":"string"}' + "}}" * levels


def chat(content: str = '"Hi"', role: str = '"user"', extra: str = "") -> str:
    return f'{{"messages":[{{"role":{role},"content":{content}}}],"max_tokens":1{extra}}}'


@dataclass(frozen=True)
class Row:
    name: str
    routes: tuple[str, ...]
    body: str | bytes
    status: int
    headers: dict[str, str] = field(default_factory=lambda: JSON)


SURROGATE = '"\\ud800"'
HOSTILE = [
    # --- found broken (500 before): now refused where the body is read
    Row("lone surrogate in inputs", TGI_BODY_ROUTES, f'{{"inputs":{SURROGATE}}}', 400),
    Row("lone surrogate in prompt", ("/v1/completions",), f'{{"prompt":{SURROGATE}}}', 400),
    Row("lone surrogate in a message", CHAT_ROUTES, chat(SURROGATE), 400),
    Row(
        "body nested 100,000 deep",
        ("/generate", "/v1/chat/completions", "/v1/completions", "/chat_tokenize"),
        deep(100_000),
        400,
    ),
    Row("inputs nested 100,000 deep", ("/generate",), f'{{"inputs":{deep(100_000)}}}', 400),
    Row(
        "JSON schema nested 10,000 deep",
        ("/generate",),
        f'{{"inputs":"Hi","parameters":{{"grammar":{{"type":"json","value":{deep_schema(10_000)}}}}}}}',
        400,
    ),
    Row(
        "JSON schema nested 10,000 deep, as a string",
        ("/generate",),
        json.dumps(
            {
                "inputs": "Hi",
                "parameters": {"grammar": {"type": "json", "value": deep_schema(10_000)}},
            }
        ),
        422,
    ),
    Row(
        "response_format schema nested 10,000 deep",
        ("/v1/chat/completions",),
        chat(extra=f',"response_format":{{"type":"json_object","value":{deep_schema(10_000)}}}'),
        400,
    ),
    Row("role is an object", ("/v1/chat/completions",), chat(role="{}"), 400),
    Row("role is an object", ("/chat_tokenize",), chat(role="{}"), 422),
    Row("role is an array", ("/v1/chat/completions",), chat(role="[]"), 400),
    Row("role is an array", ("/chat_tokenize",), chat(role='["user"]'), 422),
    Row("role missing", ("/v1/chat/completions",), '{"messages":[{}]}', 400),
    # --- limits that were missing
    Row(
        "a 1 MB stop sequence",
        ("/generate",),
        json.dumps({"inputs": "Hi", "parameters": {"stop": ["x" * 1_000_000]}}),
        422,
    ),
    Row(
        "a 1 MB stop sequence",
        ("/v1/completions",),
        json.dumps({"prompt": "Hi", "stop": "x" * 1_000_000}),
        422,
    ),
    Row(
        "a stacked regex quantifier",
        ("/generate",),
        json.dumps(
            {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "foo**"}}}
        ),
        422,
    ),
    Row(
        "a body declared text/plain (a browser's preflight-free cross-origin POST)",
        ("/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"),
        '{"inputs":"Hi","prompt":"Hi","messages":[{"role":"user","content":"Hi"}]}',
        415,
        {"content-type": "text/plain"},
    ),
    Row("a body with no content type", ("/generate",), '{"inputs":"Hi"}', 415, {}),
    Row(
        "150 header fields",
        ("/generate", "/v1/completions"),
        '{"inputs":"Hi","prompt":"Hi"}',
        431,
        {**JSON, **{f"x-h{i}": "v" for i in range(150)}},
    ),
    # --- what already held: kept under test
    Row("malformed JSON", ("/generate", "/v1/chat/completions"), "{not json", 400),
    Row("NaN", ("/generate",), '{"inputs":"Hi","parameters":{"temperature":NaN}}', 400),
    Row(
        "a body larger than the limit", ("/generate",), '{"inputs":"' + "x" * 2_100_000 + '"}', 413
    ),
    Row("a body that is an array", ("/generate",), "[1, 2]", 422),
    Row(
        "max_new_tokens past u32",
        ("/generate",),
        '{"inputs":"Hi","parameters":{"max_new_tokens":99999999999999999999}}',
        422,
    ),
    Row("huge best_of", ("/generate",), '{"inputs":"Hi","parameters":{"best_of":1000000}}', 422),
    Row(
        "huge top_n_tokens",
        ("/generate",),
        '{"inputs":"Hi","parameters":{"top_n_tokens":100000}}',
        422,
    ),
    Row("huge n", ("/v1/completions",), '{"prompt":"Hi","n":1000000}', 400),
    Row(
        "a $ref cycle",
        ("/generate",),
        json.dumps(
            {
                "inputs": "Hi",
                "parameters": {
                    "grammar": {
                        "type": "json",
                        "value": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
                    }
                },
            }
        ),
        422,
    ),
]


def _error_shape_ok(route: str, body: object) -> bool:
    if route.startswith("/v1/"):
        error = body.get("error") if isinstance(body, dict) else None
        return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("error_type"), str)
    )


@pytest.mark.parametrize("row", HOSTILE, ids=lambda row: row.name)
def test_hostile_input_gets_its_4xx_in_the_route_shape_and_the_server_keeps_serving(
    launcher: Launcher, row: Row
):
    with httpx.Client(base_url=launcher.url, timeout=60) as client:
        for route in row.routes:
            response = client.post(route, content=row.body, headers=row.headers)
            assert response.status_code == row.status, (route, response.text[:300])
            assert response.headers["content-type"] == "application/json", route
            assert _error_shape_ok(route, response.json()), (route, response.text[:300])
        after = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}})
    assert after.status_code == 200


async def _give_up_after(client: httpx.AsyncClient, timeout_s: float) -> int | str:
    body = {
        "inputs": "Tell me a long story",
        "parameters": {"max_new_tokens": 300, "ignore_eos_token": True},
    }
    try:
        response = await client.post("/generate", json=body, timeout=timeout_s)
    except httpx.TimeoutException:
        return "gave up"
    return (
        response.status_code
        if response.status_code != 429
        else f"429 {response.headers.get('retry-after')}"
    )


async def test_clients_that_give_up_are_cancelled_and_the_excess_gets_429(launcher: Launcher):
    """200 clients give up after 0.5 s (at most 128 admitted, the rest refused at once with
    429 and Retry-After); /health and /metrics answer during the flood; the abandoned requests are
    dropped at the next step, so a request sent right after is answered within 5 s
    (vLLM's test_request_cancellation bound); the flood is a few log lines, not hundreds."""
    log_before = launcher.log()
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=launcher.url, limits=limits) as client:
        flood = [asyncio.create_task(_give_up_after(client, 0.5)) for _ in range(200)]
        await asyncio.sleep(0.2)
        health = await client.get("/health", timeout=5)
        metrics = await client.get("/metrics", timeout=5)
        outcomes = await asyncio.gather(*flood)
        started = time.monotonic()
        after = await client.post(
            "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}, timeout=60
        )
        elapsed = time.monotonic() - started
    assert health.status_code == 200 and metrics.status_code == 200
    # At most max_concurrent_requests (128) are admitted; every refusal is a 429 with Retry-After.
    assert set(outcomes) == {"gave up", "429 1"}, outcomes
    assert outcomes.count("429 1") >= 200 - 128
    assert after.status_code == 200 and elapsed < 5.0, elapsed
    new_lines = launcher.log()[len(log_before) :].splitlines()
    assert 1 <= sum("Overloaded" in line for line in new_lines) <= 3
    assert not [line for line in new_lines if " ERROR " in line or "Traceback" in line]
