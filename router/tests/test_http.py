"""The HTTP surface against the fake shard: TGI's shapes, status codes and error bodies."""

import asyncio
import contextlib
import json

import httpx
from router_fakes import CharTokenizer, FakeShard, tokenizer_info

from textgen.router.allocator import BlockAllocator
from textgen.router.grammar import GrammarCompiler
from textgen.router.http.app import RouterState, build_app
from textgen.router.infer import Infer
from textgen.router.metrics import make_registry
from textgen.router.queue import Queue
from textgen.router.scheduler import Scheduler, SchedulerConfig
from textgen.router.validation import Validation, ValidationLimits

REPLIES = {"H": "Hello world", "S": "one two three four", "L": "x" * 200}


@contextlib.asynccontextmanager
async def router(
    max_concurrent_requests: int = 8,
    payload_limit: int = 10_000,
    max_best_of: int = 2,
    grammar: GrammarCompiler | None = None,
):
    shard = FakeShard(REPLIES)
    allocator = BlockAllocator(num_blocks=256, block_size=4)
    queue = Queue(allocator)
    config = SchedulerConfig(256, None, None, 0.3, 20)
    scheduler = Scheduler(shard, queue, allocator, config, grammar=grammar)
    validation = Validation(
        CharTokenizer().encode,
        ValidationLimits(
            max_input_tokens=32, max_total_tokens=64, max_stop_sequences=2, max_best_of=max_best_of
        ),
        grammar,
    )
    infer = Infer(validation, queue, tokenizer_info(), max_concurrent_requests)
    registry = make_registry(queue, scheduler, allocator)
    state = RouterState(infer, scheduler, shard, {"model_id": "fake"}, payload_limit, registry)

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
            yield client, state, allocator


async def test_generate_returns_text_and_details():
    async with router() as (client, _, allocator):
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 5, "details": True}}
        response = await client.post("/generate", json=body)
    assert response.status_code == 200
    data = response.json()
    assert data["generated_text"] == "Hello"
    details = data["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 5
    assert details["seed"] is None
    assert [t["text"] for t in details["tokens"]] == list("Hello")
    assert set(details["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert response.headers["x-generated-tokens"] == "5"
    assert allocator.num_used_blocks == 0


async def test_generate_without_details_has_only_the_text():
    async with router() as (client, _, _):
        response = await client.post("/generate", json={"inputs": "Hi"})
    assert response.json() == {"generated_text": "Hello world"}


async def test_stream_events_follow_tgi():
    async with router() as (client, _, _):
        body = {"inputs": "Sx", "parameters": {"stop": ["two"], "details": True}}
        response = await client.post("/generate_stream", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    assert "".join(e["token"]["text"] for e in events) == "one two"
    last = events[-1]
    assert last["generated_text"] == "one two"
    assert last["details"] == {
        "finish_reason": "stop_sequence",
        "generated_tokens": 7,
        "seed": None,
        "input_length": 2,
    }


async def test_malformed_json_is_400_as_tgi():
    async with router() as (client, _, _):
        response = await client.post(
            "/generate", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation"


async def test_payload_over_the_limit_is_413():
    async with router(payload_limit=100) as (client, _, _):
        response = await client.post("/generate", json={"inputs": "x" * 200})
    assert response.status_code == 413


async def test_over_max_concurrent_requests_is_429():
    async with router(max_concurrent_requests=1) as (client, state, _):
        state.infer.num_in_flight = 1  # one request already admitted
        response = await client.post("/generate", json={"inputs": "Hi"})
        assert response.status_code == 429
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert response.headers["retry-after"] == "1"
        stream = await client.post("/generate_stream", json={"inputs": "Hi"})
        assert (stream.status_code, stream.headers["retry-after"]) == (429, "1")
        state.infer.num_in_flight = 0
        assert (await client.post("/generate", json={"inputs": "Hi"})).status_code == 200


async def test_sampling_reports_its_seed():
    async with router() as (client, _, _):
        body = {"inputs": "Hi", "parameters": {"do_sample": True, "seed": 7, "details": True}}
        response = await client.post("/generate", json=body)
    assert response.json()["details"]["seed"] == 7


async def test_info_and_health():
    async with router() as (client, state, _):
        assert (await client.get("/info")).json()["model_id"] == "fake"
        state.scheduler.last_step_ok = 0.0
        state.client.health = _healthy
        assert (await client.get("/health")).status_code == 200


async def _healthy() -> None:
    return None


async def test_metrics_page_reports_live_kv_use():
    from prometheus_client.parser import text_string_to_metric_families

    async with router() as (client, _, allocator):
        await client.post("/generate", json={"inputs": "Hi"})
        allocation = allocator.allocate(10)  # as if a request held 3 blocks
        page = (await client.get("/metrics")).text
        allocator.free(allocation)
    values = {m.name: m.samples[0].value for m in text_string_to_metric_families(page)}
    assert values["textgen_kv_blocks_used"] == 3
    assert values["textgen_kv_blocks_free"] == 255 - 3
    assert values["tgi_queue_size"] == 0


async def test_compat_route_picks_stream_or_list():
    async with router() as (client, _, _):
        listed = await client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        streamed = await client.post(
            "/", json={"inputs": "Hi", "stream": True, "parameters": {"max_new_tokens": 2}}
        )
    # As TGI for a text-generation model: `/` returns the full text unless told otherwise.
    assert listed.json() == [{"generated_text": "HiHe"}]
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.count("data:") == 2
