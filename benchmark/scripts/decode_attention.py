"""The CPU decode attention kernel alone: one decode step's attention over a paged cache.

Times the native operator `kernels.paged_decode` for every layer of the default
model's shape (9 query heads, 3 KV heads, head_dim 64, 30 layers, blocks of 16 tokens)
at a batch of sequences with the same context, and reports the rate at which the step
reads the cache (keys and values in the queries' dtype, by default the platform's; int8
and their scales with `--kv-cache-dtype int8`, the cache kind of the shard's flag). The
ISA level is the platform's (TEXTGEN_CPU_ISA selects another). `--scattered` gives each
sequence its blocks in random order, as a long-running cache does; by default they lie in
address order.
`--resident` reuses one layer's cache for every layer, so that it stays in the CPU's
caches: the kernel's arithmetic without the memory traffic.

    python benchmark/scripts/decode_attention.py --threads 2 --batch-size 64 --context 264
"""

from __future__ import annotations

import argparse
import time

import torch

from textgen.server.attention.backend import AttentionMetadata
from textgen.server.attention.cpu import _native_decode
from textgen.server.kv_cache import KVCache, KVCacheSpec
from textgen.server.platform import Platform

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 264])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scattered", action="store_true")
    parser.add_argument("--resident", action="store_true")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    platform = Platform.detect(torch.device("cpu"), args.dtype)
    if not platform.native_ops:
        raise SystemExit(f"no native attention operator here: {platform.describe()}")
    torch.manual_seed(0)
    layout = "scattered" if args.scattered else "in order"
    where = "one layer's cache, resident" if args.resident else f"{LAYERS} layers' caches"
    dtype = platform.dtype
    cache_dtype = torch.int8 if args.kv_cache_dtype == "int8" else dtype
    print(
        f"{args.threads} thread(s), {platform.describe()}, {str(dtype)[6:]} queries, "
        f"{str(cache_dtype)[6:]} cache, blocks {layout}, {where}"
    )
    print(f"{'batch':>6} {'context':>8} {'ms/step':>8} {'GB/s':>6}")
    for batch in args.batch_size:
        for context in args.context:
            per_seq = -(-context // BLOCK)
            num_blocks = batch * per_seq
            order = torch.randperm(num_blocks) if args.scattered else torch.arange(num_blocks)
            meta = AttentionMetadata(
                slots=torch.zeros(batch, dtype=torch.long),
                query_lens=[1] * batch,
                context_lens=torch.full((batch,), context),
                block_tables=order.view(batch, per_seq),
                block_size=BLOCK,
                max_context_len=context,
            )
            spec = KVCacheSpec(
                1 if args.resident else LAYERS, KV_HEADS, HEAD_DIM, BLOCK, cache_dtype
            )
            cache = KVCache(spec, num_blocks, torch.device("cpu"), native=True)
            caches = [cache.layer(i) for i in range(spec.num_layers)]
            slots = torch.arange(num_blocks * BLOCK)
            for layer in caches:
                rows = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM).to(dtype)
                layer.store(slots, rows, torch.randn_like(rows))
            q = torch.randn(batch, HEADS, HEAD_DIM).to(dtype)

            def step(caches=caches, q=q, meta=meta) -> None:
                for layer in range(LAYERS):
                    _native_decode(q, caches[layer % len(caches)], meta)

            step()  # warm-up
            best = float("inf")
            for _ in range(args.runs):
                started = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - started)
            read = LAYERS * batch * context * spec.bytes_per_block // (spec.num_layers * BLOCK)
            print(f"{batch:>6} {context:>8} {1000 * best:8.1f} {read / best / 1e9:6.1f}")


if __name__ == "__main__":
    main()
