"""The int8-activation product (`--int8-activations`) against the products it could be, per shape.

Times `textgen.server.layers.gguf.int8_linear` on random Q4_1 blocks, for the default
model's projection shapes at a decode batch (64 tokens) and a prefill (4000 tokens),
against, on the same weights and activations:

- dense: the shard's own product in its dtype (oneDNN's prepacked bf16 where the CPU has
  native bf16, else float32 `F.linear`, MKL);
- torch's own int8 and int4 CPU products: `torch._int_mm` (int8 x int8, the product of
  dynamic int8 quantization, timed without the quantization), `_weight_int8pack_mm`
  (int8 weights, per channel) and `_weight_int4pack_mm_for_cpu` (int4 weights in groups
  of 32, as Q4 blocks), with `--torch-ops`;
- torchao's int8 configurations, with `--torchao` where it is importable.

    python benchmark/scripts/int8_linear.py --threads 2 --torch-ops
"""

from __future__ import annotations

import argparse
import time

import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from textgen.server.layers import gguf
from textgen.server.layers.packed import pack, packed_linear
from textgen.server.platform import Platform
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


def dense_product(platform: Platform, weight: torch.Tensor):
    """The shard's own dense product of its dtype on `weight` [out, in] float32."""
    if platform.packed_bf16_linear:
        packed = pack(weight.to(torch.bfloat16), True)
        return torch.bfloat16, lambda x: packed_linear(x, packed, None)
    return torch.float32, lambda x: torch.nn.functional.linear(x, weight)


def torch_products(weight: torch.Tensor, dtype: torch.dtype) -> dict:
    """torch's int8 and int4 CPU products on `weight` [out, in], each as x -> y."""
    n, k = weight.shape
    int8_weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, dtype=dtype)
    int4_weight = torch._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32), 1
    )
    int4_scales = torch.rand(k // 32, n, 2, dtype=dtype)
    transposed = int8_weight.t().contiguous()
    return {
        "_int_mm": lambda x: torch._int_mm(x.to(torch.int8), transposed),
        "int8pack": lambda x: torch._weight_int8pack_mm(x, int8_weight, scales),
        "int4pack": lambda x: torch._weight_int4pack_mm_for_cpu(x, int4_weight, 32, int4_scales),
    }


def torchao_products(weight: torch.Tensor, dtype: torch.dtype) -> dict:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    products = {}
    for name, config in (
        ("ao int8 dyn", Int8DynamicActivationInt8WeightConfig()),
        ("ao int8 w", Int8WeightOnlyConfig()),
    ):
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
        layer.weight.data.copy_(weight)
        quantize_(layer, config)
        products[name] = layer
    return products


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 4000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--torch-ops", action="store_true", help="torch's int8/int4 products")
    parser.add_argument("--torchao", action="store_true", help="torchao's int8 configurations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    platform = Platform.detect(torch.device("cpu"))
    if not platform.int8_products:
        raise SystemExit(f"no int8 product here: {platform.describe()}")
    dtype = platform.dtype
    names = ["int8", "dense"]
    names += ["_int_mm", "int8pack", "int4pack"] if args.torch_ops else []
    names += ["ao int8 dyn", "ao int8 w"] if args.torchao else []
    print(f"{args.threads} thread(s), {platform.describe()}; GOP/s = 2 M K N / time")
    print(f"{'M x K x N':>20} " + " ".join(f"{name:>11}" for name in names))
    for tokens in args.tokens:
        for k, n in SHAPES:
            data = quantize((torch.randn(n, k) * 0.05).numpy(), GGMLQuantizationType.Q4_1)
            weight = gguf.pack_int8(GGUFBlocks(torch.from_numpy(data), "Q4_1"))
            dense = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q4_1).copy())
            dense_dtype, dense_product_of = dense_product(platform, dense)
            x = torch.randn(tokens, k)
            products = {
                "int8": lambda x, w=weight: gguf.int8_linear(x.to(dtype), w),
                "dense": lambda x, f=dense_product_of, d=dense_dtype: f(x.to(d)),
            }
            if args.torch_ops:
                products.update(torch_products(dense, dtype))
            if args.torchao:
                products.update(torchao_products(dense, dtype))
            ops = 2 * tokens * k * n / 1e6  # per ms: GOP/s
            with torch.inference_mode():
                rates = [
                    ops / best_ms(lambda f=products[name], x=x: f(x), args.runs) for name in names
                ]
            shape = f"{tokens} x {k} x {n}"
            print(f"{shape:>20} " + " ".join(f"{rate:11.0f}" for rate in rates))


if __name__ == "__main__":
    main()
