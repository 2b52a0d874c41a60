"""Run-ahead: a small batch's next decode step computed before the router asks for it.

Two shards of the same tiny model receive the same calls; one computes every step it
can ahead of time. Whatever the router does next (decode the batch, filter it, join new
requests to it, send a grammar mask, clear it), the two must answer alike, token for
token and log-probability for log-probability, seeded sampling included: a step taken
back restores each request's tokens, cached count and generator.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_servicer import WARMUP, FakeContext, make_request, make_servicer, prefill_request

from textgen.proto import generate_pb2
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.shard import RUN_AHEAD_MAX_BATCH, Shard

SAMPLED = generate_pb2.SamplingParameters(do_sample=True, seed=7, temperature=0.9, top_k=20)


def _shard(model_dir) -> Shard:
    config = ServerConfig(model_dir, kv_cache_memory_gib=2**-10, block_size=4, dtype="float32")
    shard = Shard.load(config, ParallelGroup(), torch.device("cpu"))
    shard.warmup(WARMUP)
    return shard


@pytest.fixture
def shards(tiny_llama) -> tuple[Shard, Shard]:
    return _shard(tiny_llama[0]), _shard(tiny_llama[0])


def _requests(count: int = 2, **fields) -> list[generate_pb2.Request]:
    prompts = [[5, 6, 7], [9, 8], [3, 1, 4, 1], [2, 7], [6, 6, 6], [8]]
    return [
        make_request(10 + n, prompts[n], 1 + 4 * n, parameters=SAMPLED if n % 2 else None, **fields)
        for n in range(count)
    ]


def _tokens(reply) -> list[tuple[int, list[int], list[float]]]:
    return [(g.request_id, list(g.tokens.ids), list(g.tokens.logprobs)) for g in reply.generations]


def _both(shards: tuple[Shard, Shard], call) -> generate_pb2.DecodeResponse:
    """`call` on each shard, the first having run ahead first: their replies agree."""
    ahead, plain = shards
    ahead.run_ahead()
    got, expected = call(ahead), call(plain)
    assert _tokens(got) == _tokens(expected)
    return expected


def test_steps_computed_ahead_are_the_steps_decode_would_compute(shards):
    ahead, plain = shards
    first = _both(shards, lambda s: s.prefill(prefill_request(1, _requests()).batch))
    batch = first.batch
    for _ in range(5):
        assert ahead.can_run_ahead
        ahead.run_ahead()
        computed = ahead.computed_ahead([batch])
        assert computed is not None  # answered from the step computed ahead
        expected = plain.decode([batch])
        assert _tokens(computed) == _tokens(expected)
        assert computed.batch.current_tokens == expected.batch.current_tokens
        batch = expected.batch


@pytest.mark.parametrize("then", ["filter", "join", "mask", "two batches", "clear"])
def test_a_step_computed_ahead_is_taken_back_by_any_other_call(shards, then):
    first = _both(shards, lambda s: s.prefill(prefill_request(1, _requests()).batch))
    batch = first.batch
    if then == "filter":
        batch = _both(shards, lambda s: s.filter_batch(1, [11]) and s.decode([batch])).batch
    elif then == "join":
        joining = prefill_request(2, _requests(3)[2:])
        joining.cached_batch.CopyFrom(batch)
        batch = _both(shards, lambda s: s.prefill(joining.batch, (), joining.cached_batch)).batch
    elif then == "mask":
        mask = generate_pb2.TokenMask(request_id=11, bitmask=b"\xff\x00\x00\x00")
        reply = _both(shards, lambda s: s.decode([batch], [mask]))
        assert reply.generations[1].tokens.ids[0] < 8  # the mask held
    elif then == "two batches":
        other = _both(shards, lambda s: s.prefill(prefill_request(2, _requests(3)[2:]).batch)).batch
        batch = _both(shards, lambda s: s.decode([batch, other])).batch
    else:
        for shard in shards:
            shard.run_ahead()
            shard.clear_cache(None)
            assert not shard.batches and not shard.can_run_ahead
        return
    for _ in range(3):  # and the steps after agree too (the generators were restored)
        batch = _both(shards, lambda s, batch=batch: s.decode([batch])).batch


def test_only_small_unfinished_unmasked_batches_run_ahead(shards):
    shard = shards[0]
    big = shard.prefill(prefill_request(1, _requests(RUN_AHEAD_MAX_BATCH + 1)).batch)
    assert len(big.generations) == RUN_AHEAD_MAX_BATCH + 1 and not shard.can_run_ahead
    shard.clear_cache(None)

    shard.prefill(prefill_request(2, _requests(1, max_new_tokens=1)).batch)
    assert not shard.can_run_ahead  # its one new token is generated: the router ends it
    shard.clear_cache(None)

    first = shard.prefill(prefill_request(3, _requests(1)).batch)
    token = first.generations[0].tokens.ids[0]
    eos = generate_pb2.SamplingParameters(eos_token_ids=[token])
    shard.clear_cache(None)
    shard.prefill(prefill_request(4, [make_request(10, [5, 6, 7], 1, parameters=eos)]).batch)
    assert not shard.can_run_ahead  # greedy chose the EOS: the router ends it
    shard.clear_cache(None)

    running = shard.prefill(prefill_request(5, _requests(1)).batch).batch
    assert shard.can_run_ahead
    mask = generate_pb2.TokenMask(request_id=10, bitmask=b"\xff" * 32)
    shard.decode([running], [mask])
    assert not shard.can_run_ahead  # a guided request: each step waits for its mask


async def test_the_servicer_runs_ahead_behind_its_lock(tiny_llama, shards):
    """Over gRPC's servicer the step is computed between the calls, and agrees."""
    servicer, plain, ctx = make_servicer(tiny_llama[0]), shards[1], FakeContext()
    await servicer.Warmup(WARMUP, ctx)
    request = prefill_request(1, _requests())
    first = await servicer.Prefill(request, ctx)
    assert _tokens(first) == _tokens(plain.prefill(request.batch))
    batch = first.batch
    for _ in range(3):
        deadline = time.monotonic() + 10
        while servicer.shard.can_run_ahead and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the run-ahead task takes the lock and computes
        assert not servicer.shard.can_run_ahead
        reply = await servicer.Decode(generate_pb2.DecodeRequest(batches=[batch]), ctx)
        assert _tokens(reply) == _tokens(plain.decode([batch]))
        batch = reply.batch
    servicer.close()
