"""One shard's forward timed in-process: prefill and decode steps, no gRPC, no router.

Loads the model as a shard does (`ModelRunner`), fills a paged cache and times the median
forward of a prefill of 200-token prompts and of decode steps at the given batch sizes,
each sequence with a 200-token context. The quickest A/B for shard-side speed work:

    python benchmark/scripts/decode_step.py --threads 2 --batch-size 1 16 64
    python benchmark/scripts/decode_step.py --threads 2 --int8-activations --prefill-prompts 20
    python benchmark/scripts/decode_step.py --threads 2 --kv-cache-dtype int8 --batch-size 64
    TEXTGEN_CPU_ISA=none python benchmark/scripts/decode_step.py   # no native operators
    TEXTGEN_CPU_ISA=avx2 python benchmark/scripts/decode_step.py   # the AVX2 builds
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from textgen.launcher.model import resolve_model
from textgen.server.distributed import ParallelGroup
from textgen.server.model_runner import ModelRunner, SequenceInput
from textgen.server.platform import Platform

BLOCK_SIZE = 16
CONTEXT = 200


def sequences(batch: int, context: int, new: int, blocks_each: int) -> list[SequenceInput]:
    """`batch` sequences of `context` tokens whose last `new` are computed in this forward."""
    out = []
    for b in range(batch):
        table = list(range(b * blocks_each, (b + 1) * blocks_each))
        start = context - new
        out.append(
            SequenceInput(
                token_ids=[(7 * b + i) % 40000 + 100 for i in range(new)],
                start_pos=start,
                slots=[
                    table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                    for p in range(start, context)
                ],
                block_table=table,
            )
        )
    return out


def median_ms(step: Callable[[], object], runs: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="default: the default model, converted")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--prefill-prompts", type=int, default=4, help="prompts in the prefill")
    parser.add_argument(
        "--int8-activations", action=argparse.BooleanOptionalAction, help="as the shard's flag"
    )
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir or str(resolve_model(None)))
    platform = Platform.detect(
        torch.device("cpu"), args.dtype, int8_activations=args.int8_activations
    )
    runner = ModelRunner.load(
        model_dir, platform, BLOCK_SIZE, ParallelGroup(), kv_cache_dtype=args.kv_cache_dtype
    )
    blocks_each = -(-(CONTEXT + 1) // BLOCK_SIZE)
    prompts = args.prefill_prompts
    runner.allocate_kv_cache(max(*args.batch_size, prompts) * blocks_each + 1)
    cache = ", int8 KV cache" if args.kv_cache_dtype == "int8" else ""
    print(f"{platform.describe()}{cache}, {args.threads} thread(s), contexts of {CONTEXT} tokens")
    ms = median_ms(lambda: runner.forward(sequences(prompts, CONTEXT, CONTEXT, blocks_each)), 2)
    rate = prompts * CONTEXT / ms * 1000
    print(f"prefill {prompts} x {CONTEXT}: {ms:.1f} ms ({rate:.0f} tokens/s)")
    for batch in args.batch_size:
        step = sequences(batch, CONTEXT + 1, 1, blocks_each)
        ms = median_ms(lambda step=step: runner.forward(step), args.runs)
        print(f"decode batch {batch}: {ms:.1f} ms ({batch / ms * 1000:.0f} tokens/s)")


if __name__ == "__main__":
    main()
