"""Observability of the real server: /metrics after a workload, JSON logs, OTLP traces."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from launcher_process import Launcher, free_port, start_launcher, stop_launcher
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"


def scrape(launcher: Launcher) -> dict[tuple[str, tuple], float]:
    page = httpx.get(launcher.url + "/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


COUNTERS = {
    "count": ("tgi_request_count_total", ()),
    "success": ("tgi_request_success_total", ()),
    "validation": ("tgi_request_failure_total", (("err", "validation"),)),
    "dropped": ("tgi_request_failure_total", (("err", "dropped"),)),
    "generation": ("tgi_request_failure_total", (("err", "generation"),)),
    "durations": ("tgi_request_duration_count", ()),
    "ttft": ("textgen_time_to_first_token_seconds_count", ()),
    "itl": ("textgen_inter_token_latency_seconds_count", ()),
}


def counters(launcher: Launcher) -> dict[str, float]:
    samples = scrape(launcher)
    return {name: samples[key] for name, key in COUNTERS.items()}


def test_metrics_count_a_known_workload(launcher: Launcher):
    before = counters(launcher)
    for _ in range(2):
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
        assert httpx.post(launcher.url + "/generate", json=body, timeout=60).status_code == 200
    invalid = {"inputs": "hi", "parameters": {"max_new_tokens": 5000}}
    assert httpx.post(launcher.url + "/generate", json=invalid).status_code == 422
    long = {"inputs": "Tell me a long story", "parameters": {"max_new_tokens": 500}}
    with httpx.stream("POST", launcher.url + "/generate_stream", json=long, timeout=60) as r:
        next(r.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 30
    while counters(launcher)["dropped"] == before["dropped"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = counters(launcher)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    assert delta["count"] == 4
    assert delta["success"] == delta["durations"] == 2
    assert (delta["validation"], delta["dropped"], delta["generation"]) == (1, 1, 0)
    assert delta["ttft"] == 3
    assert delta["itl"] >= 2 * 3  # 3 decode steps per success, and the dropped one's
    samples = scrape(launcher)
    assert samples["tgi_batch_forward_duration_count", (("method", "prefill"),)] > 0
    assert samples["textgen_kv_blocks_free", ()] > 0


class OtlpReceiver(http.server.ThreadingHTTPServer):
    """A minimal OTLP/HTTP collector: keeps every span it is sent, with its service name."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _OtlpHandler)
        self.spans: list[tuple[str, object]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _OtlpHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        export = ExportTraceServiceRequest()
        export.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource_spans in export.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.server.spans.append((attributes["service.name"], span))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[tuple[Launcher, OtlpReceiver]]:
    receiver = OtlpReceiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("traced")
    own = start_launcher(tmp, "--json-output", "--otlp-endpoint", receiver.endpoint)
    headers = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"}
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    response = httpx.post(own.url + "/generate", json=body, headers=headers, timeout=60)
    assert response.status_code == 200
    assert stop_launcher(own) == 0  # shutdown flushes the spans still buffered
    yield own, receiver
    receiver.shutdown()


def test_otlp_export_joins_client_router_and_shard_spans(traced):
    _, receiver = traced
    spans = receiver.spans
    (request,) = [s for service, s in spans if s.name == "POST /generate"]
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == CLIENT_SPAN_ID
    children = sorted(s.name for _, s in spans if s.parent_span_id == request.span_id)
    assert children == ["decode", "decode", "prefill", "queue", "validation"]
    services = {service for service, _ in spans}
    assert services == {"textgen.router", "textgen.server"}
    batch_ids = {s.span_id for _, s in spans if s.name == "batch"}
    rpcs = [s for service, s in spans if service == "textgen.server" and s.name == "Prefill"]
    assert rpcs and all(s.parent_span_id in batch_ids for s in rpcs)
    forwards = [s for _, s in spans if s.name == "forward"]
    assert {s.parent_span_id for s in forwards} <= {s.span_id for _, s in spans if s.kind == 2}


def test_json_output_is_one_object_per_line_from_every_process(traced):
    import json

    own, _ = traced
    lines = [json.loads(line) for line in own.log().splitlines() if line.strip()]
    assert all({"timestamp", "level", "target"} <= set(line) for line in lines)
    targets = {line["target"] for line in lines}
    assert "textgen_launcher" in targets  # the launcher's own lines
    assert any(line.get("rank") == 0 for line in lines)  # the shard's, with its rank
    (success,) = [line for line in lines if line.get("message") == "Success"]
    assert success["trace_id"] == TRACE_ID
    assert success["generated_tokens"] == 3 and success["request_id"] == 0
