"""Tensor-parallel measurements on CPU: per-shard weight memory and the LM head's collective.

    python benchmark/scripts/tensor_parallel.py memory [MODEL_DIR]   # N = 1 vs N = 2
    python benchmark/scripts/tensor_parallel.py lm-head              # all-gather vs argmax

`memory` loads every rank's slice in its own process (loading needs no process
group) and prints the parameter bytes and the private (anonymous) resident
memory the load added; the checkpoint's mmap'd pages are page cache, shared
by all shards, and not counted.
`lm-head` runs 2 gloo ranks on a [B, V/2] logits slice and times the two ways
to reach the next token: all-gather the logits (what the shard does, because
sampling, top-n and logprobs need the whole distribution) or an argmax per
rank and an all-gather of (max, index) pairs (enough for greedy only).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

MEMORY_WORKER = """
import json, sys, torch
from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner
from textgen.server.platform import Platform

def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

model_dir, rank, world_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
before = status_kib("RssAnon")
platform = Platform.detect(torch.device("cpu"), "float32")
runner = ModelRunner.load(model_dir, platform, 16, ParallelGroup(rank, world_size))
after = status_kib("RssAnon")
tensors = {p.data_ptr(): p.numel() * p.element_size() for p in runner.model.parameters()}
print(json.dumps({"param_bytes": sum(tensors.values()), "rss_added_kib": after - before}))
"""

LM_HEAD_WORKER = """
import json, sys, time, torch
import torch.distributed as dist
rank, port, vocab, hidden = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
weight = torch.randn(vocab // 2, hidden)
results = {}
for batch in (1, 8, 64):
    local = torch.randn(batch, hidden) @ weight.T  # [B, V/2]: the same for both, not timed
    def gather():
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1).argmax(-1)
    def sharded_argmax():
        best, index = local.max(-1)  # [B]
        pair = torch.stack([best, (index + rank * (vocab // 2)).float()], dim=-1)  # [B, 2]
        parts = [torch.empty_like(pair) for _ in range(2)]
        dist.all_gather(parts, pair)
        pairs = torch.stack(parts)  # [2, B, 2]
        winner = pairs[..., 0].argmax(0)  # [B]
        return pairs[winner, torch.arange(batch), 1].long()
    for name, step in (("all_gather", gather), ("sharded_argmax", sharded_argmax)):
        for _ in range(5):
            step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(30):
            step()
        results[f"{name} B={batch}"] = (time.perf_counter() - start) / 30 * 1e3
if rank == 0:
    print(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
"""


def default_model_dir() -> str:
    from textgen.launcher.model import resolve_model

    return str(resolve_model(None))


def run_json(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(model_dir: str) -> None:
    print(f"{'shards':>6} {'rank':>4} {'weights MiB':>11} {'private RSS added MiB':>21}")
    for world_size in (1, 2):
        for rank in range(world_size):
            r = run_json([MEMORY_WORKER, model_dir, str(rank), str(world_size)])
            print(
                f"{world_size:>6} {rank:>4} {r['param_bytes'] / 2**20:>11.1f} "
                f"{r['rss_added_kib'] / 1024:>21.1f}"
            )


def lm_head(vocab: int, hidden: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", LM_HEAD_WORKER, str(r), port, str(vocab), str(hidden)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in ranks]
    for name, ms in json.loads(outputs[0].strip().splitlines()[-1]).items():
        print(f"{name:<22} {ms:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    mem = commands.add_parser("memory")
    mem.add_argument("model_dir", nargs="?")
    head = commands.add_parser("lm-head")
    head.add_argument("--vocab", type=int, default=49152)
    head.add_argument("--hidden", type=int, default=576)
    args = parser.parse_args()
    start = time.monotonic()
    if args.command == "memory":
        memory(args.model_dir or default_model_dir())
    else:
        lm_head(args.vocab, args.hidden)
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
