"""OpenTelemetry tracing of the router: one span per HTTP request, with its steps as children.

Span layout (as TGI's): the request span (`POST /generate`, child of the client's W3C
`traceparent` when it sends one) has children `validation`, `queue` and one `prefill` or
`decode` span per step the request took part in. A step is also one root span `batch`
(several requests share it) linked both ways with those per-request step spans; the batch
span's context rides to the shards in gRPC metadata, where each shard records its RPC and
its forward pass as children of it.

Without `--otlp-endpoint` the tracer is OpenTelemetry's no-op tracer, the middleware is not
installed and every hook returns at once: tracing costs nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen.router.request import Entry

TRACER_NAME = "textgen.router"
# Probes would drown the requests in spans.
UNTRACED_PATHS = frozenset({"/health", "/metrics"})


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current span's context as gRPC metadata (`traceparent`); None when there is none."""
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return tuple(carrier.items()) or None


def otlp_exporter(endpoint: str) -> SpanExporter:
    """OTLP over gRPC (TGI's choice, e.g. http://collector:4317), or over HTTP when the
    endpoint names the traces path (http://collector:4318/v1/traces)."""
    if endpoint.rstrip("/").endswith("/v1/traces"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


class RouterTracing:
    """The router's tracer and the hooks the request path and the scheduler call."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self.enabled = provider is not None
        self._provider = provider

    @classmethod
    def disabled(cls) -> RouterTracing:
        return cls(trace.NoOpTracer())

    @classmethod
    def with_processor(cls, processor: SpanProcessor, service_name: str) -> RouterTracing:
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(processor)
        return cls(provider.get_tracer(TRACER_NAME), provider)

    @classmethod
    def from_endpoint(cls, endpoint: str | None, service_name: str) -> RouterTracing:
        if not endpoint:
            return cls.disabled()
        return cls.with_processor(BatchSpanProcessor(otlp_exporter(endpoint)), service_name)

    def shutdown(self) -> None:
        """Flush the spans still buffered."""
        if self._provider is not None:
            self._provider.shutdown()

    # -- the request path ------------------------------------------------------

    def span(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span (the request's)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name)

    def adopt(self, entry: Entry) -> None:
        """The request span is the one the middleware made current."""
        if self.enabled:
            entry.span = trace.get_current_span()

    def request_finished(self, entry: Entry) -> None:
        if not self.enabled:
            return
        entry.span.set_attributes(
            {
                "textgen.request_id": entry.id,
                "textgen.input_length": entry.request.input_len,
                "textgen.generated_tokens": entry.num_generated,
                "textgen.cancelled": entry.cancelled,
            }
        )

    # -- the scheduler ---------------------------------------------------------

    def queued(self, entries: Collection[Entry]) -> None:
        """Record each entry's `queue` span now that it is batched (from its timings)."""
        if not self.enabled:
            return
        for entry in entries:
            t = entry.timings
            span = self.tracer.start_span(
                "queue", trace.set_span_in_context(entry.span), start_time=_epoch_ns(t.queued)
            )
            span.end(_epoch_ns(t.batched))

    @contextlib.contextmanager
    def step(self, method: str, entries: Collection[Entry]) -> Iterator[None]:
        """A `batch` root span current around one step, and a `method` span per request."""
        if not self.enabled:
            yield
            return
        links = [Link(entry.span.get_span_context()) for entry in entries]
        attributes = {"textgen.method": method, "textgen.batch_size": len(entries)}
        start = time.time_ns()
        with self.tracer.start_as_current_span(
            "batch", Context(), SpanKind.CLIENT, attributes, links
        ) as batch:
            try:
                yield
            finally:
                self._per_request(method, entries, Link(batch.get_span_context()), start)

    def _per_request(self, method: str, entries: Collection[Entry], link: Link, start: int) -> None:
        end = time.time_ns()
        for entry in entries:
            parent = trace.set_span_in_context(entry.span)
            self.tracer.start_span(method, parent, links=[link], start_time=start).end(end)


def _epoch_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


class TracingMiddleware:
    """Opens the request span around each HTTP request, under the client's `traceparent`."""

    def __init__(self, app: ASGIApp, tracing: RouterTracing) -> None:
        self.app = app
        self._tracer = tracing.tracer
        self._propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = self._propagator.extract(headers)
        name = f"{scope['method']} {scope['path']}"
        attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
        with self._tracer.start_as_current_span(name, parent, SpanKind.SERVER, attributes) as span:

            async def send_and_note_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                await send(message)

            await self.app(scope, receive, send_and_note_status)


def wrap_app(app: ASGIApp, tracing: RouterTracing) -> ASGIApp:
    return TracingMiddleware(app, tracing) if tracing.enabled else app
