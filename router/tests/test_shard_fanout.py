"""ShardClient over real gRPC to two shard stand-ins: fan-out, rank 0's reply, min Warmup.

An error from any one shard must fail the step, whichever rank it comes from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from textgen.proto import generate_pb2 as pb
from textgen.proto import generate_pb2_grpc
from textgen.router.client import ShardClient


class StandInShard(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, rank: int, urls: list[str], num_blocks: int) -> None:
        self.rank = rank
        self.urls = urls
        self.num_blocks = num_blocks
        self.fail_decode = False
        self.calls: list[str] = []

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def Warmup(self, request, context):
        self.calls.append("Warmup")
        return pb.WarmupResponse(num_blocks=self.num_blocks, block_size=16)

    async def Decode(self, request, context):
        self.calls.append("Decode")
        if self.fail_decode:
            await context.abort(grpc.StatusCode.INTERNAL, f"rank {self.rank}: all_reduce failed")
        token = pb.Tokens(ids=[100 + self.rank], logprobs=[-0.5])
        return pb.DecodeResponse(generations=[pb.Generation(request_id=7, tokens=token)])


@pytest.fixture
async def shards(tmp_path: Path) -> AsyncIterator[list[StandInShard]]:
    urls = [f"unix://{tmp_path}/shard-{rank}" for rank in range(2)]
    stand_ins = [StandInShard(rank, urls, num_blocks) for rank, num_blocks in ((0, 90), (1, 60))]
    servers = []
    for url, stand_in in zip(urls, stand_ins, strict=True):
        server = grpc.aio.server()
        generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(stand_in, server)
        server.add_insecure_port(url)
        await server.start()
        servers.append(server)
    yield stand_ins
    for server in servers:
        await server.stop(None)


async def connect(tmp_path: Path) -> ShardClient:
    return await ShardClient.connect(f"{tmp_path}/shard-0")


async def test_every_rpc_reaches_every_shard_and_rank_0_answers(shards, tmp_path):
    client = await connect(tmp_path)
    try:
        assert client.num_shards == 2
        assert await client.warmup(pb.WarmupRequest()) == 60  # the smaller shard bounds the cache
        result = await client.decode([pb.CachedBatch(id=0)])
        assert [g.tokens.ids[0] for g in result.generations] == [100]
        assert [s.calls for s in shards] == [["Warmup", "Decode"]] * 2
    finally:
        await client.close()


@pytest.mark.parametrize("failing_rank", [0, 1])
async def test_an_error_from_any_shard_fails_the_step(shards, tmp_path, failing_rank):
    shards[failing_rank].fail_decode = True
    client = await connect(tmp_path)
    try:
        with pytest.raises(grpc.aio.AioRpcError, match=f"rank {failing_rank}: all_reduce"):
            await client.decode([pb.CachedBatch(id=0)])
        shards[failing_rank].fail_decode = False
        assert len((await client.decode([pb.CachedBatch(id=0)])).generations) == 1
    finally:
        await client.close()
