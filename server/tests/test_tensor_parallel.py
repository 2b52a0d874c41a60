"""Two gloo ranks on CPU: sliced weights + all-reduce/all-gather give the full model's logits."""

from __future__ import annotations

import socket
import subprocess
import sys

import torch

WORLD_SIZE = 2

# Each rank loads its slices of the checkpoint, runs one prefill and saves its logits.
WORKER = """
import sys, torch
from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner, SequenceInput
model_dir, rank, world_size, port, out = sys.argv[1:]
group = ParallelGroup.initialize(int(rank), int(world_size), "127.0.0.1", int(port))
runner = ModelRunner.load(model_dir, torch.float32, 4, group, torch.device("cpu"))
runner.allocate_kv_cache(16)
prompt = [1, 17, 42, 99, 3, 250, 7]
(logits,) = runner.forward([SequenceInput(prompt, 0, list(range(7)), [0, 1], all_logits=True)])
(step,) = runner.forward([SequenceInput([5], 7, [7], [0, 1])])
torch.save({"prefill": logits, "decode": step, "heads": runner.kv_cache_spec.num_kv_heads}, out)
group.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_transformers(tiny_llama, tmp_path):
    model_dir, hf_model = tiny_llama
    port = str(free_port())
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD_SIZE)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(model_dir), str(r), str(WORLD_SIZE), port, out]
        )
        for r, out in enumerate(outs)
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0] * WORLD_SIZE
    with torch.no_grad():
        reference = hf_model(torch.tensor([[1, 17, 42, 99, 3, 250, 7, 5]])).logits[0]
    for out in outs:
        result = torch.load(out)
        assert result["heads"] == 1  # 2 KV heads split over 2 ranks
        d = max(
            (result["prefill"] - reference[:7]).abs().max().item(),
            (result["decode"] - reference[7:]).abs().max().item(),
        )
        print(f"max abs diff {d:.2e}")
        assert d < 1e-4
