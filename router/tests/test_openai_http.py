"""The OpenAI routes against the fake shard: shapes, streaming, stop trimming and error bodies."""

import asyncio
import contextlib
import json

import httpx
import openai
import pytest
from router_fakes import EOS, CharTokenizer, ChatCharTokenizer, FakeShard, grammar_compiler

from textgen.router.allocator import BlockAllocator
from textgen.router.grammar import GrammarCompiler
from textgen.router.http.app import RouterState, build_app
from textgen.router.infer import Infer
from textgen.router.openai_response import StopHoldback, trim_stop
from textgen.router.queue import Queue
from textgen.router.request import TokenizerInfo
from textgen.router.scheduler import Scheduler, SchedulerConfig
from textgen.router.validation import Validation, ValidationLimits

REPLIES = {
    "H": "Hello world",
    "S": "one two three four",
    "W": '{"name":"w","arguments":{"city":"Rome","days":3}}',
}


@contextlib.asynccontextmanager
async def router(
    max_concurrent_requests: int = 8,
    chat_template: str | None = "x",
    grammar: GrammarCompiler | None = None,
):
    shard = FakeShard(REPLIES)
    allocator = BlockAllocator(num_blocks=256, block_size=4)
    queue = Queue(allocator)
    config = SchedulerConfig(256, None, None, 0.3, 20)
    scheduler = Scheduler(shard, queue, allocator, config, grammar=grammar)
    validation = Validation(
        CharTokenizer().encode,
        ValidationLimits(max_input_tokens=32, max_total_tokens=64, max_stop_sequences=2),
        grammar,
    )
    info = TokenizerInfo(ChatCharTokenizer(chat_template), frozenset({EOS}), frozenset({EOS}))
    infer = Infer(validation, queue, info, max_concurrent_requests)
    info_json = {"model_id": "fake-model", "version": "0.1.0"}
    state = RouterState(infer, scheduler, shard, info_json, 10_000)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.router = state
        task = asyncio.create_task(scheduler.run())
        yield
        task.cancel()

    app = build_app(lifespan)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, state, shard


def chat(content: str = "Hi", **params) -> dict:
    return {"model": "anything", "messages": [{"role": "user", "content": content}], **params}


def sse_data(text: str) -> list:
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


async def test_chat_completion_shape_and_usage():
    async with router() as (client, state, _):
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=5))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert body["system_fingerprint"] == "0.1.0-native"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert state.infer.num_in_flight == 0


async def test_eos_is_stop_and_its_text_is_not_sent():
    async with router() as (client, _, _):
        body = (await client.post("/v1/chat/completions", json=chat(temperature=0))).json()
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len("Hello world") + 1  # EOS counts


async def test_chat_stream_role_first_then_content_finish_usage_done():
    async with router() as (client, _, _):
        request = chat(stream=True, stream_options={"include_usage": True}, max_tokens=5)
        response = await client.post("/v1/chat/completions", json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert content == "Hello"
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_is_cut_from_the_text(stream):
    async with router() as (client, _, _):
        request = chat("Sx", stop="two", stream=stream)
        response = await client.post("/v1/chat/completions", json=request)
    if stream:
        chunks = sse_data(response.text)[1:-1]
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        choice = response.json()["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
    assert (content, finish) == ("one ", "stop")


def test_stop_holdback_never_sends_a_stop_sequence():
    holdback = StopHoldback(("two", "xyz"))
    sent = [holdback.feed(piece) for piece in ["one t", "w", "o three"]]
    assert sent == ["one ", "", ""]
    assert holdback.flush() == ""
    holdback = StopHoldback(("two",))
    assert [holdback.feed("a t"), holdback.feed("x")] == ["a ", "tx"]
    assert holdback.feed("t") + holdback.flush() == "t"
    assert trim_stop("a two b xyz", ("xyz", "two")) == "a "


async def test_n_choices_are_separate_requests():
    async with router() as (client, state, _):
        body = (await client.post("/v1/chat/completions", json=chat(n=2, max_tokens=3))).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["Hel", "Hel"]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert state.infer.num_in_flight == 0


async def test_chat_logprobs_with_top_logprobs():
    async with router() as (client, _, _):
        request = chat(max_tokens=2, logprobs=True, top_logprobs=0)
        body = (await client.post("/v1/chat/completions", json=request)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert content == [
        {"token": "H", "logprob": -0.5, "bytes": [72], "top_logprobs": []},
        {"token": "e", "logprob": -0.5, "bytes": [101], "top_logprobs": []},
    ]


async def test_completions_with_prompt_list_and_echo():
    async with router() as (client, _, _):
        request = {"prompt": ["Hi", "So", "Hi"], "max_tokens": 3, "echo": True, "n": 2}
        body = (await client.post("/v1/completions", json=request)).json()
    assert body["object"] == "text_completion"
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["HiHel", "HiHel", "Soone", "Soone", "HiHel", "HiHel"]
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 18, "total_tokens": 24}


async def test_completions_stream_with_logprobs_offsets():
    async with router() as (client, _, _):
        request = {"prompt": "Hi", "max_tokens": 3, "logprobs": 0, "stream": True}
        response = await client.post("/v1/completions", json=request)
    chunks = sse_data(response.text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hel"
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[:-1]]
    assert offsets == [[0], [1], [2]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("request_body", "status", "param", "message"),
    [
        (chat(temperature=3), 400, "temperature", "`temperature` must be"),
        (chat(n=100), 400, "n", "`n` must be"),
        ({"model": "m"}, 400, "messages", "`messages` must be"),
        (chat(max_tokens=500), 422, "max_tokens", "`max_tokens` must be <= 64"),
        (chat(logprobs=True, top_logprobs=9), 422, "top_logprobs", "`top_logprobs`"),
        (chat(response_format={"type": "json_object"}), 422, None, "grammar is not supported"),
        (chat(response_format={"type": "xml"}), 400, "response_format", "'json_schema'"),
        (
            chat(tools=[{"type": "function", "function": {"name": "f"}}]),
            422,
            None,
            "grammar is not supported",
        ),
        (chat(tool_choice="required"), 400, "tool_choice", "needs `tools`"),
        (chat(logit_bias={"500": 10}), 400, "logit_bias", "not a token id"),
        (chat(logit_bias={"5": 101}), 400, "logit_bias", "<= 100"),
        (
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            400,
            "tool_choice",
            "not in `tools`",
        ),
    ],
)
async def test_bad_requests_get_openai_error_bodies(request_body, status, param, message):
    async with router() as (client, state, _):
        response = await client.post("/v1/chat/completions", json=request_body)
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert message in error["message"]
        assert state.infer.num_in_flight == 0


async def test_logit_bias_reaches_the_shard():
    async with router() as (client, _, shard):
        sent = []
        prefill = shard.prefill

        async def recording_prefill(batch, token_masks=(), cached_batch=None):
            sent.extend(dict(r.parameters.logit_bias) for r in batch.requests)
            return await prefill(batch, token_masks, cached_batch)

        shard.prefill = recording_prefill
        request = chat(max_tokens=2, logit_bias={"72": -100, "7": 2.5})
        assert (await client.post("/v1/chat/completions", json=request)).status_code == 200
    assert sent == [{7: 2.5, 72: -100.0}]


async def test_tool_choice_none_renders_without_grammar():
    async with router() as (client, _, _):
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        request = chat(tools=tools, tool_choice="none", max_tokens=2)
        response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200


async def test_model_without_chat_template_is_a_clear_400():
    async with router(chat_template=None) as (client, _, _):
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 400
    assert "no chat template" in response.json()["error"]["message"]


async def test_overload_is_429_with_retry_after_and_the_sdk_raises_rate_limit():
    async with router(max_concurrent_requests=2) as (client, state, _):
        state.infer.num_in_flight = 1  # one slot left; n=2 needs two
        response = await client.post("/v1/chat/completions", json=chat(n=2))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_exceeded"
        assert state.infer.num_in_flight == 1  # the admitted first choice was released
        sdk = openai.AsyncOpenAI(
            base_url="http://test/v1", api_key="-", max_retries=0, http_client=client
        )
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "H"}], n=2
            )
        state.infer.num_in_flight = 0


async def test_shard_failure_mid_stream_is_an_error_chunk_then_done():
    async with router() as (client, _, shard):
        shard.fail_next_decode = True
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "generation"
    assert events[-2]["error"]["type"] == "server_error"


async def test_models_lists_the_served_model():
    async with router() as (client, _, _):
        listing = (await client.get("/v1/models")).json()
        missing = await client.get("/v1/models/other")
        found = await client.get("/v1/models/fake-model")
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["fake-model"]
    assert missing.status_code == 404
    assert found.json()["id"] == "fake-model"


WEATHER = {
    "type": "function",
    "function": {
        "name": "w",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "w"}}


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
async def test_tool_call_is_answered_as_tool_calls(tool_choice):
    async with router(grammar=grammar_compiler()) as (client, _, shard):
        request = chat("W?", tools=[WEATHER], tool_choice=tool_choice, max_tokens=60)
        response = await client.post("/v1/chat/completions", json=request)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "w"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome", "days": 3}
    assert shard.masks[0]  # the call was constrained from its first token


async def test_tool_call_streams_as_deltas_through_the_sdk():
    async with router(grammar=grammar_compiler()) as (client, _, _):
        sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="-", http_client=client)
        stream = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "W?"}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=60,
            stream=True,
        )
        names, arguments, finish = [], "", None
        async for chunk in stream:
            delta = chunk.choices[0].delta
            for call in delta.tool_calls or []:
                names += [call.function.name] if call.function.name else []
                arguments += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert names == ["w"]
    assert json.loads(arguments) == {"city": "Rome", "days": 3}
    assert finish == "tool_calls"


async def test_response_format_json_schema_constrains_the_output():
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    async with router(grammar=grammar_compiler()) as (client, _, _):
        response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
        request = chat("Hi", response_format=response_format, max_tokens=50)
        response = await client.post("/v1/chat/completions", json=request)
    choice = response.json()["choices"][0]
    # The shard's script ("Hello world") is not JSON: the masks force the schema on it.
    assert json.loads(choice["message"]["content"]) == {"ok": False}
    assert choice["finish_reason"] == "stop"


def test_watermark_extension_reaches_the_generate_parameters():
    from textgen.router.openai_request import completion_plan

    marked = completion_plan({"prompt": "Hi", "watermark": True}, vocab_size=256)
    plain = completion_plan({"prompt": "Hi"}, vocab_size=256)
    assert marked.bodies[0]["parameters"]["watermark"] is True
    assert plain.bodies[0]["parameters"]["watermark"] is False
