"""How far a shard's arithmetic moves the default model's logits from float32's.

Loads the default model twice, as a float32 shard with no rounding of its own (the
reference: exact weights, float32 products and cache) and as the shard the flags describe
(by default the platform's own choice for this CPU), and compares their logits at every
position of three 512-token texts of this repository: top-1 agreement and the KL
divergence KL(reference || tested), per text.

    python benchmark/scripts/accuracy.py                       # this CPU's defaults
    python benchmark/scripts/accuracy.py --dtype bfloat16 --kv-cache-dtype int8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from textgen.launcher.model import resolve_model
from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.platform import Platform

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [ROOT / "README.md", ROOT / "benchmark" / "RESULTS.md", ROOT / "benchmark" / "README.md"]
TOKENS = 512
BLOCK_SIZE = 16


def all_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    """Every position's logits of one prefill: [len(prompt), V] float32."""
    num_blocks = len(prompt) // BLOCK_SIZE + 1
    runner.allocate_kv_cache(num_blocks + 1)
    table = list(range(1, num_blocks + 1))
    slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(len(prompt))]
    return runner.forward([SequenceInput(prompt, 0, slots, table, all_logits=True)])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--int8-activations", action=argparse.BooleanOptionalAction)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="of each text")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cpu = torch.device("cpu")
    reference = ModelRunner.load(
        model_dir,
        Platform.detect(cpu, "float32", int8_activations=False),
        BLOCK_SIZE,
        ParallelGroup(),
    )
    platform = Platform.detect(cpu, args.dtype, int8_activations=args.int8_activations)
    tested = ModelRunner.load(
        model_dir, platform, BLOCK_SIZE, ParallelGroup(), kv_cache_dtype=args.kv_cache_dtype
    )
    cache = ", int8 KV cache" if args.kv_cache_dtype == "int8" else ""
    print(f"{platform.describe()}{cache}, against float32, {args.tokens} tokens of each text")
    print(f"{'text':>22} {'top-1 agreement':>16} {'KL':>8}")
    for path in TEXTS:
        prompt = tokenizer(path.read_text())["input_ids"][: args.tokens]
        expected, got = all_logits(reference, prompt), all_logits(tested, prompt)
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        kl = F.kl_div(
            got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()
        print(f"{path.relative_to(ROOT)!s:>22} {100 * agree:15.1f}% {kl:8.4f}")


if __name__ == "__main__":
    main()
