"""Gloo ranks on CPU: sliced weights + all-reduce/all-gather give the full model's logits.

Three head layouts: an even split, an uneven one (KV groups 2 + 1) and KV
replication (one KV head shared by both ranks). A layout no split fits is
refused with the valid shard counts.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from conftest import cpu_platform

from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner
from textgen.server.sharding import HeadSplit, ShardCountError, balanced_range

WORLD_SIZE = 2

# Each rank loads its slices of the checkpoint, runs one prefill and saves its logits.
WORKER = """
import sys, torch, weakref
from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.platform import Platform
model_dir, rank, world_size, port, out = sys.argv[1:]
group = ParallelGroup.initialize(int(rank), int(world_size), "127.0.0.1", int(port))
platform = Platform.detect(torch.device("cpu"), "float32")
runner = ModelRunner.load(model_dir, platform, 4, group)
runner.allocate_kv_cache(16)
prompt = [1, 17, 42, 99, 3, 250, 7]
(logits,) = runner.forward([SequenceInput(prompt, 0, list(range(7)), [0, 1], all_logits=True)])
(step,) = runner.forward([SequenceInput([5], 7, [7], [0, 1])])
shape = runner.model.shape
heads = (shape.num_heads, shape.num_kv_heads)
torch.save({"prefill": logits, "decode": step, "heads": heads}, out)
# NOTE: a rank that leaves while its peer still talks to it aborts the peer.
torch.distributed.barrier()
released = weakref.ref(group._group)
group.shutdown()
assert released() is None, "the process group outlives shutdown()"
"""

# (config overrides, (query heads, KV heads) of rank 0 and rank 1)
LAYOUTS = {
    "even": (dict(num_attention_heads=4, num_key_value_heads=2), [(2, 1), (2, 1)]),
    "uneven": (
        # ... and an uneven MLP: 65 + 64 intermediate features.
        dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96, intermediate_size=129),
        [(4, 2), (2, 1)],
    ),
    "replicated": (dict(num_attention_heads=4, num_key_value_heads=1), [(2, 1), (2, 1)]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_match_transformers(make_tiny_llama, tmp_path, layout):
    overrides, expected_heads = LAYOUTS[layout]
    model_dir, hf_model = make_tiny_llama(**overrides)
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
    for out, heads in zip(outs, expected_heads, strict=True):
        result = torch.load(out)
        assert result["heads"] == heads
        d = max(
            (result["prefill"] - reference[:7]).abs().max().item(),
            (result["decode"] - reference[7:]).abs().max().item(),
        )
        print(f"{layout}: max abs diff {d:.2e}")
        assert d < 1e-4


def test_shard_count_that_fits_no_split_is_refused_with_valid_counts(make_tiny_llama):
    # 4 heads, 2 KV heads: 3 ranks can neither split the KV heads nor replicate them evenly.
    model_dir, _ = make_tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ShardCountError, match=r"valid shard counts: 1, 2, 4$"):
        ModelRunner.load(model_dir, cpu_platform(torch.float32), 4, ParallelGroup(0, 3))


def test_kv_cache_holds_only_local_heads(make_tiny_llama):
    model_dir, _ = make_tiny_llama(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    f32 = cpu_platform(torch.float32)
    full = ModelRunner.load(model_dir, f32, 4, ParallelGroup()).kv_cache_spec
    rank1 = ModelRunner.load(model_dir, f32, 4, ParallelGroup(1, 2)).kv_cache_spec
    assert (full.num_kv_heads, rank1.num_kv_heads) == (3, 1)
    assert 3 * rank1.bytes_per_block == full.bytes_per_block  # Warmup sizes the cache from it


@pytest.mark.parametrize(
    ("heads", "world_size", "expected"),
    [
        # SmolLM2: 9 query heads in 3 KV groups.
        ((9, 3), 2, [HeadSplit(0, 6, 0, 2), HeadSplit(6, 3, 2, 1)]),
        ((9, 3), 3, [HeadSplit(0, 3, 0, 1), HeadSplit(3, 3, 1, 1), HeadSplit(6, 3, 2, 1)]),
        # Replication: 2 ranks per KV head, each with half its group.
        ((8, 2), 4, [HeadSplit(0, 2, 0, 1), HeadSplit(2, 2, 0, 1),
                     HeadSplit(4, 2, 1, 1), HeadSplit(6, 2, 1, 1)]),
    ],
)  # fmt: skip
def test_head_split(heads, world_size, expected):
    assert [HeadSplit.for_rank(*heads, world_size, r) for r in range(world_size)] == expected


def test_balanced_range_covers_every_unit_once():
    assert [balanced_range(1536, 2, r) for r in range(2)] == [(0, 768), (768, 1536)]
    assert [balanced_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_each_rank_holds_about_half_of_the_weights(make_tiny_llama):
    model_dir, _ = make_tiny_llama(num_attention_heads=4, num_key_value_heads=2)

    def load(group: ParallelGroup) -> dict[str, torch.Size]:
        runner = ModelRunner.load(model_dir, cpu_platform(torch.float32), 4, group)
        return {name: p.shape for name, p in runner.model.named_parameters()}

    def num_bytes(shapes: dict[str, torch.Size]) -> int:
        return 4 * sum(shape.numel() for shape in shapes.values())

    full = load(ParallelGroup())
    for rank in range(2):
        local = load(ParallelGroup(rank, 2))
        print(f"rank {rank}: {num_bytes(local)} of {num_bytes(full)} weight bytes")
        assert num_bytes(local) < 0.51 * num_bytes(full)
        # No split weight is held whole: only the (tiny) norms are replicated.
        whole = {name for name, shape in local.items() if shape == full[name]}
        assert whole and all("norm" in name for name in whole)
