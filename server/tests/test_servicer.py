"""The servicer on a tiny random Llama: real protobuf messages, a fake context."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch

from textgen.proto import generate_pb2, generate_pb2_grpc
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.server import run_server
from textgen.server.servicer import TextGenerationServicer
from textgen.server.shard import Shard

BLOCK_SIZE = 4
BUDGET_GIB = 2**-10  # 1 MiB: 512 blocks of the tiny model
WARMUP = generate_pb2.WarmupRequest(
    max_input_tokens=32, max_total_tokens=48, max_prefill_tokens=64, max_batch_size=4
)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class FakeContext:
    async def abort(self, code, details):
        raise Aborted(code, details)


def make_servicer(model_dir: Path, budget_gib: float = BUDGET_GIB) -> TextGenerationServicer:
    config = ServerConfig(
        model_dir, kv_cache_memory_gib=budget_gib, block_size=BLOCK_SIZE, dtype="float32"
    )
    return TextGenerationServicer(Shard.load(config, ParallelGroup(), torch.device("cpu")))


@pytest.fixture
async def servicer(tiny_llama):
    servicer = make_servicer(tiny_llama[0])
    await servicer.Warmup(WARMUP, FakeContext())
    yield servicer
    servicer.close()


def make_request(request_id: int, prompt: list[int], first_block: int, **fields):
    """A request owning 4 blocks (16 tokens) from `first_block` on."""
    blocks = list(range(first_block, first_block + 4))
    slots = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
    fields.setdefault("max_new_tokens", 16 - len(prompt))
    return generate_pb2.Request(
        id=request_id, input_ids=prompt, blocks=blocks, slots=slots, **fields
    )


def prefill_request(batch_id: int, requests) -> generate_pb2.PrefillRequest:
    batch = generate_pb2.Batch(id=batch_id, requests=requests, size=len(requests))
    return generate_pb2.PrefillRequest(batch=batch)


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False, min_new_tokens=0
        )
    return out[0, len(prompt) :].tolist()


async def test_warmup_sizes_the_cache_from_the_budget(tiny_llama):
    servicer = make_servicer(tiny_llama[0])
    response = await servicer.Warmup(WARMUP, FakeContext())
    spec = servicer.shard.runner.kv_cache_spec
    # 2 layers x (K, V) x 4 tokens x 2 KV heads x 16 dims x 4 bytes
    assert spec.bytes_per_block == 2 * 2 * 4 * 2 * 16 * 4
    assert response.num_blocks == int(BUDGET_GIB * 2**30) // spec.bytes_per_block == 512
    assert response.block_size == BLOCK_SIZE
    servicer.close()


async def test_warmup_rejects_a_budget_below_one_sequence(tiny_llama):
    servicer = make_servicer(tiny_llama[0], budget_gib=2**-20)  # 1 KiB
    with pytest.raises(Aborted) as e:
        await servicer.Warmup(WARMUP, FakeContext())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    servicer.close()


async def test_prefill_before_warmup_is_refused(tiny_llama):
    servicer = make_servicer(tiny_llama[0])
    with pytest.raises(Aborted) as e:
        await servicer.Prefill(prefill_request(1, [make_request(1, [1, 2], 1)]), FakeContext())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    servicer.close()


async def test_prefill_decode_filter_decode_round_trip(servicer, tiny_llama):
    hf_model, ctx = tiny_llama[1], FakeContext()
    prompts = {10: [1, 2, 3, 4, 5], 11: [9, 8, 7], 12: [100, 101, 102, 103, 104, 105]}
    requests = [make_request(i, p, 1 + 4 * n) for n, (i, p) in enumerate(prompts.items())]
    prefill = await servicer.Prefill(prefill_request(7, requests), ctx)
    assert [g.request_id for g in prefill.generations] == [10, 11, 12]
    assert prefill.batch.id == 7 and prefill.batch.size == 3
    assert prefill.batch.current_tokens == 14 and prefill.batch.max_tokens == 48
    assert prefill.forward_ns > 0 and prefill.total_ns >= prefill.forward_ns
    tokens = {g.request_id: list(g.tokens.ids) for g in prefill.generations}

    decode = await servicer.Decode(generate_pb2.DecodeRequest(batches=[prefill.batch]), ctx)
    assert decode.batch.current_tokens == 17 and decode.concat_ns > 0
    for g in decode.generations:
        tokens[g.request_id] += g.tokens.ids

    filtered = await servicer.FilterBatch(
        generate_pb2.FilterBatchRequest(batch_id=7, request_ids=[12, 10]), ctx
    )
    assert list(filtered.batch.request_ids) == [10, 12]
    for _ in range(3):
        decode = await servicer.Decode(generate_pb2.DecodeRequest(batches=[filtered.batch]), ctx)
        for g in decode.generations:
            tokens[g.request_id] += g.tokens.ids
    assert [g.request_id for g in decode.generations] == [10, 12]
    assert decode.batch.current_tokens == (5 + 4) + (6 + 4)

    for request_id, prompt in prompts.items():
        assert tokens[request_id] == hf_greedy(hf_model, prompt, len(tokens[request_id]))


async def test_prefill_alongside_a_running_batch_matches_transformers(servicer, tiny_llama):
    """A mixed step: the running batch decodes in the prefill's forward, nothing changes."""
    hf_model, ctx = tiny_llama[1], FakeContext()
    prompts = {1: [1, 2, 3, 4, 5], 2: [9, 8, 7], 3: [100, 101, 102, 103, 104, 105], 4: [42]}
    requests = {i: make_request(i, p, 1 + 4 * n) for n, (i, p) in enumerate(prompts.items())}
    first = await servicer.Prefill(prefill_request(1, [requests[1], requests[2]]), ctx)
    tokens = {g.request_id: list(g.tokens.ids) for g in first.generations}
    decode = await servicer.Decode(generate_pb2.DecodeRequest(batches=[first.batch]), ctx)
    for g in decode.generations:
        tokens[g.request_id] += g.tokens.ids

    mixed = prefill_request(2, [requests[3], requests[4]])
    mixed.cached_batch.CopyFrom(decode.batch)
    joined = await servicer.Prefill(mixed, ctx)
    assert [g.request_id for g in joined.generations] == [1, 2, 3, 4]
    assert joined.batch.id == 2 and list(joined.batch.request_ids) == [1, 2, 3, 4]
    assert joined.batch.current_tokens == (5 + 2) + (3 + 2) + 6 + 1
    for g in joined.generations:
        tokens.setdefault(g.request_id, []).extend(g.tokens.ids)
    for _ in range(3):
        decode = await servicer.Decode(generate_pb2.DecodeRequest(batches=[joined.batch]), ctx)
        joined = decode
        for g in decode.generations:
            tokens[g.request_id] += g.tokens.ids
    for request_id, prompt in prompts.items():
        assert tokens[request_id] == hf_greedy(hf_model, prompt, len(tokens[request_id]))
    # The running batch was consumed by the mixed step.
    with pytest.raises(Aborted):
        await servicer.Decode(generate_pb2.DecodeRequest(batches=[first.batch]), ctx)


async def test_chunked_prefill_alongside_a_running_batch_matches_transformers(servicer, tiny_llama):
    """A prompt in three chunks (3 + 4 + 3 tokens) over mixed steps, as the router sends it."""
    hf_model, ctx = tiny_llama[1], FakeContext()
    running_prompt, long_prompt = [5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    first = await servicer.Prefill(prefill_request(1, [make_request(1, running_prompt, 1)]), ctx)
    tokens = {1: list(first.generations[0].tokens.ids), 2: []}
    batch = first.batch
    for step, (cache_len, chunk_len) in enumerate([(0, 3), (3, 4), (7, 3)]):
        chunk = make_request(2, long_prompt, 5, cache_len=cache_len, chunk_len=chunk_len)
        mixed = prefill_request(10 + step, [chunk])
        mixed.cached_batch.CopyFrom(batch)
        reply = await servicer.Prefill(mixed, ctx)
        ids = [g.request_id for g in reply.generations]
        # Only the step that reaches the prompt's end yields request 2's first token.
        assert ids == ([1, 2] if step == 2 else [1])
        assert list(reply.batch.request_ids) == ids
        for g in reply.generations:
            tokens[g.request_id] += g.tokens.ids
        batch = reply.batch
    for _ in range(2):
        batch_reply = await servicer.Decode(generate_pb2.DecodeRequest(batches=[batch]), ctx)
        batch = batch_reply.batch
        for g in batch_reply.generations:
            tokens[g.request_id] += g.tokens.ids
    assert len(tokens[2]) == 3
    assert tokens[1] == hf_greedy(hf_model, running_prompt, len(tokens[1]))
    assert tokens[2] == hf_greedy(hf_model, long_prompt, 3)


async def test_a_leading_chunk_alone_returns_no_batch(servicer, tiny_llama):
    ctx = FakeContext()
    prompt = [3, 1, 4, 1, 5, 9]
    reply = await servicer.Prefill(
        prefill_request(1, [make_request(1, prompt, 1, chunk_len=4)]), ctx
    )
    assert not reply.generations and not reply.HasField("batch")
    reply = await servicer.Prefill(
        prefill_request(2, [make_request(1, prompt, 1, cache_len=4, chunk_len=4)]), ctx
    )
    assert list(reply.batch.request_ids) == [1]
    assert list(reply.generations[0].tokens.ids) == hf_greedy(tiny_llama[1], prompt, 1)


async def test_a_failed_mixed_step_leaves_the_running_batch_as_it_was(servicer):
    ctx = FakeContext()
    first = await servicer.Prefill(prefill_request(1, [make_request(1, [5, 6], 1)]), ctx)
    clash = prefill_request(2, [make_request(1, [7], 5)])  # request 1 is already running
    clash.cached_batch.CopyFrom(first.batch)
    with pytest.raises(Aborted, match="already running"):
        await servicer.Prefill(clash, ctx)
    decode = await servicer.Decode(generate_pb2.DecodeRequest(batches=[first.batch]), ctx)
    assert list(decode.batch.request_ids) == [1]


async def test_decode_concatenates_batches_under_the_first_id(servicer):
    ctx = FakeContext()
    first = await servicer.Prefill(prefill_request(1, [make_request(1, [5, 6], 1)]), ctx)
    second = await servicer.Prefill(prefill_request(2, [make_request(2, [7], 5)]), ctx)
    decode = await servicer.Decode(
        generate_pb2.DecodeRequest(batches=[first.batch, second.batch]), ctx
    )
    assert decode.batch.id == 1 and list(decode.batch.request_ids) == [1, 2]
    # The second batch is gone: it lives on inside the first.
    with pytest.raises(Aborted):
        await servicer.Decode(generate_pb2.DecodeRequest(batches=[second.batch]), ctx)


async def test_filtering_to_nothing_drops_the_batch(servicer):
    ctx = FakeContext()
    prefill = await servicer.Prefill(prefill_request(3, [make_request(1, [5, 6], 1)]), ctx)
    response = await servicer.FilterBatch(generate_pb2.FilterBatchRequest(batch_id=3), ctx)
    assert not response.HasField("batch")
    with pytest.raises(Aborted):
        await servicer.Decode(generate_pb2.DecodeRequest(batches=[prefill.batch]), ctx)


def too_few_blocks() -> generate_pb2.Request:
    request = make_request(1, [1, 2, 3, 4, 5], 1)
    del request.blocks[1:]
    return request


async def test_bad_requests_are_errors_not_crashes(servicer):
    ctx = FakeContext()
    unknown = generate_pb2.CachedBatch(id=404)
    bad_rpcs = [
        lambda: servicer.Decode(generate_pb2.DecodeRequest(batches=[unknown]), ctx),
        lambda: servicer.FilterBatch(
            generate_pb2.FilterBatchRequest(batch_id=404, request_ids=[1]), ctx
        ),
        lambda: servicer.Prefill(prefill_request(5, [make_request(1, [1, 2], 10_000)]), ctx),
        lambda: servicer.Prefill(prefill_request(5, [make_request(1, [1, 256], 1)]), ctx),
        lambda: servicer.Prefill(prefill_request(5, [make_request(1, [], 1)]), ctx),
        lambda: servicer.Prefill(prefill_request(5, [too_few_blocks()]), ctx),
        lambda: servicer.Prefill(prefill_request(5, [make_request(1, [1], 1, cache_len=2)]), ctx),
        lambda: servicer.Prefill(
            prefill_request(5, [make_request(1, [1, 2], 1, chunk_len=1, prefill_logprobs=True)]),
            ctx,
        ),
    ]
    for rpc in bad_rpcs:
        with pytest.raises(Aborted) as e:
            await rpc()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, str(e.value)
    # Still serving.
    prefill = await servicer.Prefill(prefill_request(5, [make_request(1, [1, 2], 1)]), ctx)
    assert len(prefill.generations) == 1


async def test_decode_past_the_block_table_is_refused(servicer):
    ctx = FakeContext()
    request = make_request(1, [1, 2, 3], 1)
    del request.blocks[1:]  # room for 4 tokens only
    prefill = await servicer.Prefill(prefill_request(6, [request]), ctx)
    decode = await servicer.Decode(generate_pb2.DecodeRequest(batches=[prefill.batch]), ctx)
    with pytest.raises(Aborted) as e:
        await servicer.Decode(generate_pb2.DecodeRequest(batches=[decode.batch]), ctx)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # The failed step left the batch as it was: the router may filter it.
    filtered = await servicer.FilterBatch(
        generate_pb2.FilterBatchRequest(batch_id=6, request_ids=[1]), ctx
    )
    assert filtered.batch.current_tokens == 4


async def test_prefill_logprobs_and_top_tokens(servicer, tiny_llama):
    hf_model, ctx = tiny_llama[1], FakeContext()
    prompt = [3, 14, 15, 92, 65]
    request = make_request(1, prompt, 1, prefill_logprobs=True, top_n_tokens=3)
    (generation,) = (await servicer.Prefill(prefill_request(8, [request]), ctx)).generations
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0], dim=-1)
    assert list(generation.prefill_tokens.ids) == prompt
    logprobs = list(generation.prefill_tokens.logprobs)
    assert math.isnan(logprobs[0])
    expected = [reference[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    assert logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert list(generation.top_tokens[0].ids) == reference[-1].topk(3).indices.tolist()
    assert generation.tokens.ids[0] == generation.top_tokens[0].ids[0]
    assert generation.tokens.logprobs[0] == pytest.approx(reference[-1].max().item(), abs=1e-4)


async def test_prefill_with_cache_len_reuses_the_cached_prefix(servicer):
    ctx = FakeContext()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    full = await servicer.Prefill(prefill_request(20, [make_request(1, prompt, 1)]), ctx)
    # Same blocks: the first 8 tokens' K/V are already there.
    cached = make_request(2, prompt, 1, cache_len=8)
    reused = await servicer.Prefill(prefill_request(21, [cached]), ctx)
    assert reused.generations[0].tokens.ids == full.generations[0].tokens.ids
    assert reused.generations[0].tokens.logprobs[0] == pytest.approx(
        full.generations[0].tokens.logprobs[0], abs=1e-5
    )


async def test_clear_cache_drops_one_or_all(servicer):
    ctx = FakeContext()
    for batch_id in (1, 2):
        await servicer.Prefill(prefill_request(batch_id, [make_request(1, [4], 1)]), ctx)
    await servicer.ClearCache(generate_pb2.ClearCacheRequest(id=1), ctx)
    assert set(servicer.shard.batches) == {2}
    await servicer.ClearCache(generate_pb2.ClearCacheRequest(), ctx)
    assert servicer.shard.batches == {}


async def test_info_and_service_discovery(servicer):
    info = await servicer.Info(generate_pb2.InfoRequest(), FakeContext())
    assert (info.model_type, info.dtype, info.device_type) == ("llama", "float32", "cpu")
    assert (info.block_size, info.vocab_size, info.world_size) == (BLOCK_SIZE, 256, 1)
    assert info.max_position_embeddings == 512
    urls = await servicer.ServiceDiscovery(generate_pb2.ServiceDiscoveryRequest(), FakeContext())
    assert list(urls.urls) == ["unix:///tmp/textgen-server-0"]


async def test_grpc_server_on_a_unix_socket(tiny_llama):
    uds_path = os.path.join(tempfile.mkdtemp(prefix="tg-"), "shard")
    config = ServerConfig(
        tiny_llama[0], uds_path=uds_path, kv_cache_memory_gib=BUDGET_GIB, dtype="float32"
    )
    shard = Shard.load(config, ParallelGroup(), torch.device("cpu"))
    stop = asyncio.Event()
    server = asyncio.create_task(run_server(config, shard, stop))
    async with grpc.aio.insecure_channel(f"unix://{uds_path}-0") as channel:
        stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
        await channel.channel_ready()
        await stub.Health(generate_pb2.HealthRequest())
        warmup = await stub.Warmup(WARMUP)
        assert warmup.num_blocks > 0
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Decode(generate_pb2.DecodeRequest(batches=[generate_pb2.CachedBatch(id=9)]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch 9" in e.value.details()
        prefill = await stub.Prefill(prefill_request(1, [make_request(1, [1, 2, 3], 1)]))
        assert len(prefill.generations) == 1
    stop.set()
    await server
    assert not os.path.exists(f"{uds_path}-0")


def test_cli_serves_until_sigterm(tiny_llama):
    uds_path = os.path.join(tempfile.mkdtemp(prefix="tg-"), "shard")
    socket_path = Path(f"{uds_path}-0")
    socket_path.touch()  # a stale file must not block the bind
    cmd = [sys.executable, "-m", "textgen.server.cli", "serve", str(tiny_llama[0])]
    process = subprocess.Popen([*cmd, "--uds-path", uds_path], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _health_ok(f"unix://{socket_path}") and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "shard 0" in process.stderr.read()
    assert not socket_path.exists()


def _health_ok(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        try:
            generate_pb2_grpc.TextGenerationServiceStub(channel).Health(
                generate_pb2.HealthRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return True
