"""Shard-side tracing: each Prefill/Decode RPC is a span under the router's `batch` span.

The router sends its span context as W3C `traceparent` gRPC metadata; the RPC span is its
child, and the step's phases (concat, forward, sampling) are children of the RPC span,
placed from the reply's *_ns timings. Without an OTLP endpoint the tracer is a no-op and
`rpc` returns at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanProcessor
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "textgen.server"


def otlp_exporter(endpoint: str) -> SpanExporter:
    """OTLP over gRPC (http://collector:4317), or over HTTP for a /v1/traces endpoint."""
    if endpoint.rstrip("/").endswith("/v1/traces"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))


class ShardTracing:
    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self.enabled = provider is not None
        self._provider = provider
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def disabled(cls) -> ShardTracing:
        return cls(trace.NoOpTracer())

    @classmethod
    def with_processor(cls, processor: SpanProcessor, service_name: str, rank: int) -> ShardTracing:
        resource = Resource.create({"service.name": service_name, "textgen.rank": rank})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(processor)
        return cls(provider.get_tracer(TRACER_NAME), provider)

    @classmethod
    def from_endpoint(cls, endpoint: str | None, service_name: str, rank: int) -> ShardTracing:
        if not endpoint:
            return cls.disabled()
        return cls.with_processor(BatchSpanProcessor(otlp_exporter(endpoint)), service_name, rank)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()

    @contextlib.contextmanager
    def rpc(self, name: str, context: Any) -> Iterator[Span | None]:
        """The RPC's span, under the caller's trace context when the metadata carries one."""
        if not self.enabled:
            yield None
            return
        carrier = {key: value for key, value in context.invocation_metadata() or ()}
        parent = self._propagator.extract(carrier)
        with self.tracer.start_as_current_span(name, parent, SpanKind.SERVER) as span:
            yield span

    def phases(self, span: Span | None, reply: Any, concat_ns: int = 0) -> None:
        """Children of the RPC span for the step's phases, placed from the reply's timings."""
        if span is None:
            return
        parent = trace.set_span_in_context(span)
        start = time.time_ns() - reply.total_ns
        forward_start = start + concat_ns
        forward_end = forward_start + reply.forward_ns
        if concat_ns:
            self.tracer.start_span("concat", parent, start_time=start).end(forward_start)
        self.tracer.start_span("forward", parent, start_time=forward_start).end(forward_end)
        sampling = self.tracer.start_span("sampling", parent, start_time=forward_end)
        sampling.end(forward_end + reply.decode_ns)
