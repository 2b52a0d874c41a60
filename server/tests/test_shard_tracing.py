"""The trace context crosses the gRPC link: the router's span is the parent of the shard's."""

from __future__ import annotations

import os
import tempfile

import grpc
import torch
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from textgen.proto import generate_pb2, generate_pb2_grpc
from textgen.router.client import ShardClient
from textgen.router.tracing import RouterTracing
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.servicer import TextGenerationServicer
from textgen.server.shard import Shard
from textgen.server.tracing import ShardTracing

WARMUP = generate_pb2.WarmupRequest(
    max_input_tokens=32, max_total_tokens=48, max_prefill_tokens=64, max_batch_size=4
)


def request(request_id: int, prompt: list[int]) -> generate_pb2.Request:
    blocks = [1, 2, 3, 4]
    slots = [blocks[p // 4] * 4 + p % 4 for p in range(len(prompt))]
    return generate_pb2.Request(
        id=request_id, input_ids=prompt, blocks=blocks, slots=slots, max_new_tokens=4
    )


async def test_shard_spans_join_the_router_trace_over_grpc_metadata(tiny_llama):
    shard_spans, router_spans = InMemorySpanExporter(), InMemorySpanExporter()
    shard_tracing = ShardTracing.with_processor(SimpleSpanProcessor(shard_spans), "t.server", 0)
    router_tracing = RouterTracing.with_processor(SimpleSpanProcessor(router_spans), "t.router")
    config = ServerConfig(tiny_llama[0], kv_cache_memory_gib=2**-10, block_size=4, dtype="float32")
    shard = Shard.load(config, ParallelGroup(), torch.device("cpu"))
    servicer = TextGenerationServicer(shard, tracing=shard_tracing)
    server = grpc.aio.server()
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
    path = os.path.join(tempfile.mkdtemp(prefix="tg-"), "shard-0")
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    client = ShardClient([grpc.aio.insecure_channel(f"unix://{path}")])
    try:
        await client.warmup(WARMUP)
        batch = generate_pb2.Batch(id=1, requests=[request(1, [5, 6, 7])], size=1)
        with router_tracing.tracer.start_as_current_span("batch") as parent:
            result = await client.prefill(batch)
            await client.decode([result.batch])
    finally:
        await client.close()
        await server.stop(None)
        servicer.close()
    spans = {s.name: s for s in shard_spans.get_finished_spans()}
    for rpc in ("Prefill", "Decode"):
        assert spans[rpc].context.trace_id == parent.get_span_context().trace_id
        assert spans[rpc].parent.span_id == parent.get_span_context().span_id
    by_parent = {}
    for span in shard_spans.get_finished_spans():
        if span.parent is not None:
            by_parent.setdefault(span.parent.span_id, []).append(span)
    decode_phases = sorted(s.name for s in by_parent[spans["Decode"].context.span_id])
    assert decode_phases == ["concat", "forward", "sampling"]
    forward = next(s for s in by_parent[spans["Prefill"].context.span_id] if s.name == "forward")
    assert forward.end_time - forward.start_time == result.forward_ns
    assert spans["Prefill"].resource.attributes["service.name"] == "t.server"
