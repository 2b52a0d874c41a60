"""Tracing and JSON logs of one request, through the same code path main.py wires."""

import io
import json
import logging

from observed_router import observed_router
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from textgen.router.logs import JsonFormatter
from textgen.router.tracing import RouterTracing, wrap_app

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


def in_memory_tracing() -> tuple[RouterTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return RouterTracing.with_processor(SimpleSpanProcessor(exporter), "test.router"), exporter


async def test_request_span_has_its_steps_as_children_under_the_client_traceparent():
    tracing, exporter = in_memory_tracing()
    headers = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"}
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 5}}
    async with observed_router(tracing) as (client, _, _):
        assert (await client.post("/generate", json=body, headers=headers)).status_code == 200
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "POST /generate"]
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert f"{request.parent.span_id:016x}" == CLIENT_SPAN_ID
    assert request.attributes["http.response.status_code"] == 200
    children = [
        s for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id
    ]
    names = sorted(s.name for s in children)
    assert names == ["decode"] * 4 + ["prefill", "queue", "validation"]
    batches = {s.context.span_id: s for s in spans if s.name == "batch"}
    for step in (s for s in children if s.name in ("prefill", "decode")):
        (link,) = step.links
        batch = batches[link.context.span_id]
        assert batch.parent is None  # shared by the batch's requests: a root of its own trace
        assert batch.attributes["textgen.method"] == step.name
        assert request.context.span_id in {link.context.span_id for link in batch.links}
    queue = next(s for s in children if s.name == "queue")
    prefill = next(s for s in children if s.name == "prefill")
    assert queue.start_time <= queue.end_time <= prefill.start_time + 1_000_000


async def test_without_an_endpoint_nothing_is_traced():
    tracing = RouterTracing.from_endpoint(None, "textgen.router")
    assert not tracing.enabled
    app = object()
    assert wrap_app(app, tracing) is app  # no middleware at all
    with tracing.span("validation") as span:
        assert span is None


async def test_json_logs_one_object_per_line_with_request_and_span_ids():
    tracing, exporter = in_memory_tracing()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("textgen.router")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        async with observed_router(tracing) as (client, _, _):
            await client.post(
                "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
            )
            await client.post("/generate", json={"inputs": ""})
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and all({"timestamp", "level", "target", "message"} <= set(x) for x in lines)
    (success,) = [x for x in lines if x["message"] == "Success"]
    (request,) = [s for s in exporter.get_finished_spans() if s.name == "POST /generate"][:1]
    assert success["request_id"] == 0 and success["generated_tokens"] == 3
    assert success["trace_id"] == f"{request.context.trace_id:032x}"
    assert success["span_id"] == f"{request.context.span_id:016x}"
    for field in (
        "total_time",
        "validation_time",
        "queue_time",
        "inference_time",
        "time_per_token",
    ):
        assert success[field] >= 0
    # A client's mistake is logged at INFO: ERROR is kept for what an operator must act on.
    assert not [x for x in lines if x["level"] == "ERROR"]
    (rejected,) = [x for x in lines if x["message"].startswith("Refused")]
    assert (
        rejected["level"] == "INFO"
        and rejected["error_type"] == "validation"
        and "cannot be empty" in rejected["message"]
    )
