"""The int8-activation product (`--int8-activations`) against oneDNN's bf16 product, per shape.

Times `textgen.server.layers.gguf.int8_linear` on random Q4_1 blocks against the bf16
product on the same weights, prepacked as the shard packs them, for the default model's
projection shapes at a decode batch (64 tokens) and a prefill (4000 tokens):

    python benchmark/scripts/int8_linear.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from textgen.server.layers import gguf
from textgen.server.layers.packed import pack, packed_linear
from textgen.server.weights import GGUFBlocks

# (in, out) of q/k/v fused, o, gate/up fused, down: SmolLM2-135M
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def best_ms(step, runs: int) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 4000])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.threads} thread(s); GOP/s = 2 M K N / time")
    print(f"{'M x K x N':>20} {'int8':>8} {'bf16':>8} {'ratio':>6}")
    for tokens in args.tokens:
        for k, n in SHAPES:
            data = quantize((torch.randn(n, k) * 0.05).numpy(), GGMLQuantizationType.Q4_1)
            weight = gguf.pack_int8(GGUFBlocks(torch.from_numpy(data), "Q4_1"))
            if weight is None:
                raise SystemExit("no int8 kernel here (needs AVX-512 VNNI and a C compiler)")
            dense = dequantize(data, GGMLQuantizationType.Q4_1).copy()
            packed = pack(torch.from_numpy(dense).to(torch.bfloat16))
            if packed is None:
                raise SystemExit("no native bf16 here: nothing to compare with")
            x = torch.randn(tokens, k).to(torch.bfloat16)
            int8_ms = best_ms(lambda x=x, w=weight: gguf.int8_linear(x, w), args.runs)
            bf16_ms = best_ms(lambda x=x, p=packed: packed_linear(x, p, None), args.runs)
            ops = 2 * tokens * k * n / 1e6  # per ms: GOP/s
            shape = f"{tokens} x {k} x {n}"
            print(f"{shape:>20} {ops / int8_ms:8.0f} {ops / bf16_ms:8.0f} {bf16_ms / int8_ms:6.2f}")


if __name__ == "__main__":
    main()
