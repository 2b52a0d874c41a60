"""The paged Llama against transformers' LlamaForCausalLM, in float32."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_platform

from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner, SequenceInput

TOLERANCE = 1e-4
CPU = torch.device("cpu")


def load_runner(path, block_size: int, num_blocks: int = 64) -> ModelRunner:
    runner = ModelRunner.load(path, cpu_platform(torch.float32), block_size, ParallelGroup())
    runner.allocate_kv_cache(num_blocks)
    return runner


def reference_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()  # [T, V]


def slots_of(block_table: list[int], positions: range, block_size: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]


def prefill_input(prompt, block_table, block_size, cache_len=0) -> SequenceInput:
    positions = range(cache_len, len(prompt))
    return SequenceInput(
        token_ids=prompt[cache_len:],
        start_pos=cache_len,
        slots=slots_of(block_table, positions, block_size),
        block_table=block_table,
        all_logits=True,
    )


def decode_input(token: int, position: int, block_table, block_size) -> SequenceInput:
    slots = slots_of(block_table, range(position, position + 1), block_size)
    return SequenceInput([token], position, slots, block_table)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_and_compare(runner, hf_model, prompts, block_tables, block_size, num_steps=6) -> float:
    """Prefill all prompts in one forward, then decode greedily; return the worst diff."""
    pairs = list(zip(prompts, block_tables, strict=True))
    outputs = runner.forward([prefill_input(p, t, block_size) for p, t in pairs])
    refs = [reference_logits(hf_model, p) for p in prompts]
    worst = max(max_diff(o, r) for o, r in zip(outputs, refs, strict=True))
    tokens = [list(p) for p in prompts]
    last = [o[-1] for o in outputs]
    for _ in range(num_steps):
        for seq, logits in zip(tokens, last, strict=True):
            seq.append(int(logits.argmax()))
        steps = [
            decode_input(seq[-1], len(seq) - 1, t, block_size)
            for seq, t in zip(tokens, block_tables, strict=True)
        ]
        last = [o[-1] for o in runner.forward(steps)]
        refs = [reference_logits(hf_model, seq)[-1] for seq in tokens]
        worst = max(worst, *(max_diff(a, b) for a, b in zip(last, refs, strict=True)))
    return worst


PROMPTS = [[1, 17, 42, 99, 3, 250, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 200, 31], [77]]


@pytest.mark.parametrize(
    ("block_size", "block_tables"),
    [
        (16, [[1, 2], [3, 4], [5, 6]]),
        # Several blocks per sequence, out of order and interleaved.
        (4, [[9, 2, 14, 5], [1, 12, 7, 3, 11, 6], [13, 4, 8]]),
    ],
    ids=["contiguous-blocks", "scattered-blocks"],
)
def test_prefill_and_decode_match_transformers(tiny_llama, block_size, block_tables):
    path, hf_model = tiny_llama
    runner = load_runner(path, block_size)
    d = run_and_compare(runner, hf_model, PROMPTS, block_tables, block_size)
    print(f"max abs diff {d:.2e}")
    assert d < TOLERANCE


def test_tied_embeddings_match_transformers(make_tiny_llama):
    path, hf_model = make_tiny_llama(tie_word_embeddings=True)
    runner = load_runner(path, block_size=4)
    d = run_and_compare(runner, hf_model, PROMPTS[:2], [[5, 1, 3, 9], [2, 8, 4, 6, 7]], 4)
    print(f"max abs diff {d:.2e}")
    assert d < TOLERANCE


def test_prefill_with_cached_prefix_matches_transformers(tiny_llama):
    """cache_len > 0: only the suffix is computed, attending over the cached prefix."""
    path, hf_model = tiny_llama
    runner = load_runner(path, block_size=4)
    prompt, table = PROMPTS[1], [10, 3, 7, 1]
    runner.forward([prefill_input(prompt[:8], table, 4)])
    (suffix_logits,) = runner.forward([prefill_input(prompt, table, 4, cache_len=8)])
    d = max_diff(suffix_logits, reference_logits(hf_model, prompt)[8:])
    print(f"max abs diff {d:.2e}")
    assert d < TOLERANCE


def test_llama3_rope_scaling_matches_transformers(make_tiny_llama):
    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    path, hf_model = make_tiny_llama(rope_parameters=rope)
    runner = load_runner(path, block_size=4)
    d = run_and_compare(runner, hf_model, PROMPTS[1:2], [[0, 1, 2, 3, 4, 5]], 4, num_steps=4)
    print(f"max abs diff {d:.2e}")
    assert d < TOLERANCE
