"""The watermark is the same whatever the number of shards: 1 rank vs 2 gloo ranks.

The processor runs on the full-vocabulary logits after the LM head's
all-gather, and every rank samples the same batch with the same seeds, so a
seeded request must produce the same tokens on every rank of a 2-shard group
as on a single shard. (The launcher cannot start 2 shards yet; this drives
the shards directly, as the router would.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import torch

from textgen.server.watermark import MASK32, WatermarkParams, green_mask, row_seeds

KEY = 2**64 - 3
NUM_TOKENS = 40

# Each rank runs Warmup, one Prefill of 4 requests and decodes, and saves every token.
WORKER = """
import json, sys, torch
from textgen.proto import generate_pb2 as pb
from textgen.server.config import ServerConfig
from textgen.server.distributed import ParallelGroup
from textgen.server.shard import Shard
model_dir, rank, world_size, port, key, num_tokens, out = sys.argv[1:]
rank, world_size, num_tokens = int(rank), int(world_size), int(num_tokens)
group = ParallelGroup.initialize(rank, world_size, "127.0.0.1", int(port))
config = ServerConfig(
    model_dir, rank=rank, world_size=world_size, kv_cache_memory_gib=2**-10, block_size=4,
    dtype="float32",
)
shard = Shard.load(config, group, torch.device("cpu"))
shard.warmup(pb.WarmupRequest(
    max_input_tokens=32, max_total_tokens=48, max_prefill_tokens=64, max_batch_size=4
))
mark = pb.WatermarkParameters(key=int(key), gamma=0.5, delta=2.0)
def request(i, sampled, marked):
    return pb.Request(
        id=i, input_ids=[1, 17, 42, 99], blocks=range(1 + 12 * i, 13 + 12 * i),
        parameters=pb.SamplingParameters(do_sample=sampled, seed=1234),
        max_new_tokens=num_tokens, watermark=mark if marked else None,
    )
requests = [request(0, True, True), request(1, True, False),
            request(2, False, True), request(3, False, False)]
step = shard.prefill(pb.Batch(id=0, requests=requests, size=4))
tokens = {g.request_id: list(g.tokens.ids) for g in step.generations}
for _ in range(num_tokens - 1):
    step = shard.decode([step.batch])
    for g in step.generations:
        tokens[g.request_id] += list(g.tokens.ids)
json.dump({str(i): ids for i, ids in tokens.items()}, open(out, "w"))
group.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(model_dir, world_size: int, tmp_path) -> list[dict[str, list[int]]]:
    port = str(free_port())
    outs = [tmp_path / f"world{world_size}-rank{r}.json" for r in range(world_size)]
    command = [sys.executable, "-c", WORKER, str(model_dir)]
    args = [str(world_size), port, str(KEY), str(NUM_TOKENS)]
    ranks = [subprocess.Popen([*command, str(r), *args, out]) for r, out in enumerate(outs)]
    assert [p.wait(timeout=120) for p in ranks] == [0] * world_size
    return [json.loads(out.read_text()) for out in outs]


def num_green(prompt_last: int, tokens: list[int]) -> int:
    prev = torch.tensor([prompt_last, *tokens[:-1]])  # [T]
    seeds = row_seeds(torch.full_like(prev, KEY & MASK32), torch.full_like(prev, KEY >> 32), prev)
    threshold = WatermarkParams(KEY, 0.5, 2.0).threshold
    green = green_mask(seeds, [threshold] * len(tokens), 256)  # [T, V]
    return int(green[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


def test_one_and_two_shards_mark_the_same_tokens(tiny_llama, tmp_path):
    (single,) = run_group(tiny_llama[0], 1, tmp_path)
    rank0, rank1 = run_group(tiny_llama[0], 2, tmp_path)
    assert rank0 == rank1 == single
    sampled_marked, sampled_plain, greedy_marked, greedy_plain = (single[str(i)] for i in range(4))
    assert len(sampled_marked) == NUM_TOKENS
    # The bias changed the output, and towards the green lists.
    assert sampled_marked != sampled_plain
    assert greedy_marked != greedy_plain
    assert num_green(99, sampled_marked) > num_green(99, sampled_plain)
    assert num_green(99, greedy_marked) > num_green(99, greedy_plain)
