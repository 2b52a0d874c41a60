"""Grammar guidance under load, against a running server (`textgen-launcher`).

    python benchmark/scripts/grammar_serving.py --url http://127.0.0.1:8080

1. Compile: the 20-optional-property and the 8-level nested schema of
   grammar_engines.py through the router's GrammarCompiler (fresh cache),
   against a stated budget, plus a heavy 2,000-property schema (the stall case).
2. Stall: inter-token latency p99 of 16 concurrent unconstrained streams, alone
   and while heavy grammars (a new one every 0.2 s, so never cached) compile.
3. Mask overhead: the router's mask time for 16 constrained requests per step
   (measured in-process on the real tokenizer) over the decode step time (median
   ITL of 16 unconstrained streams), and the median ITL of 16 constrained streams.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from grammar_engines import nested_instance, nested_schema, wide_instance, wide_schema

from textgen.router.grammar import GrammarCompiler, GrammarConfig, GrammarSpec

COMPILE_BUDGET_MS = 50.0
NUM_STREAMS, NUM_TOKENS = 16, 64
PROMPT = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
_ids = itertools.count()


def heavy_schema() -> dict:
    salt = next(_ids)
    pattern = {"type": "string", "pattern": "[a-z]{1,30}"}
    return {"type": "object", "properties": {f"p{i}_{salt}": pattern for i in range(2000)}}


async def stream(client: httpx.AsyncClient, parameters: dict) -> list[float]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NUM_TOKENS, **parameters}}
    times = []
    async with client.stream("POST", "/generate_stream", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                times.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(times)]


async def streams(url: str, parameters: dict, compiling: bool = False) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        runs = [stream(client, parameters) for _ in range(NUM_STREAMS)]
        done = asyncio.Event()

        async def compile_loop() -> int:
            count = 0
            while not done.is_set():
                grammar = {"type": "json", "value": heavy_schema()}
                body = {"inputs": "x", "parameters": {"max_new_tokens": 1, "grammar": grammar}}
                await client.post("/generate", json=body)
                count += 1
                await asyncio.sleep(0.2)
            return count

        compiler = asyncio.create_task(compile_loop()) if compiling else None
        results = await asyncio.gather(*runs)
        done.set()
        if compiler is not None:
            print(f"  heavy grammars compiled during the run: {await compiler}")
    return [itl for result in results for itl in result]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def compile_times(model_dir: str, vocab_size: int, eos: list[int]) -> GrammarCompiler:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = {
        "20 optional properties": wide_schema(),
        "nested depth 8": nested_schema(),
        "heavy: 2000 properties": heavy_schema(),
    }
    compiler = None
    for label, schema in cases.items():
        compiler = GrammarCompiler.from_hf(tokenizer, vocab_size, eos, GrammarConfig())
        start = time.perf_counter()
        compiled = await compiler.compile(GrammarSpec.json_schema(schema))
        compile_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        compiler.token_masks([(0, compiled.new_guide())])
        first_mask_ms = (time.perf_counter() - start) * 1e3
        verdict = "within" if compile_ms + first_mask_ms <= COMPILE_BUDGET_MS else "OVER"
        print(
            f"  {label:24s} compile {compile_ms:7.1f} ms + first mask {first_mask_ms:5.1f} ms "
            f"({verdict} the {COMPILE_BUDGET_MS:g} ms budget)"
        )
    assert compiler is not None
    return compiler


def mask_ms_per_step(compiler: GrammarCompiler, tokenizer_ids: list[int], schema: dict) -> float:
    compiled = asyncio.run(compiler.compile(GrammarSpec.json_schema(schema)))
    guides = [(i, compiled.new_guide()) for i in range(NUM_STREAMS)]
    elapsed = 0.0
    for token in tokenizer_ids:
        start = time.perf_counter()
        compiler.token_masks(guides)
        elapsed += time.perf_counter() - start
        for _, guide in guides:
            guide.accept(token)
    return elapsed / len(tokenizer_ids) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from textgen.launcher.model import resolve_model

    model_dir = args.model_dir or str(resolve_model(None))
    vocab_size = json.loads(Path(model_dir, "config.json").read_text())["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print("compile (router's GrammarCompiler, fresh cache):")
    compiler = asyncio.run(compile_times(model_dir, vocab_size, [tokenizer.eos_token_id]))
    free = {"ignore_eos_token": True}
    alone = asyncio.run(streams(args.url, free))
    busy = asyncio.run(streams(args.url, free, compiling=True))
    ratio = p99(busy) / p99(alone)
    print(f"stall: {NUM_STREAMS} unconstrained streams, ITL p99 alone {p99(alone) * 1e3:.1f} ms, ")
    print(f"  while heavy grammars compile {p99(busy) * 1e3:.1f} ms: ratio {ratio:.2f} (limit 1.5)")
    step_ms = statistics.median(alone) * 1e3
    for label, schema, instance in (
        ("20 optional properties", wide_schema(), wide_instance()),
        ("nested depth 8", nested_schema(), nested_instance()),
    ):
        ids = tokenizer.encode(json.dumps(instance, separators=(",", ":")))
        mask_ms = mask_ms_per_step(compiler, ids, schema)
        print(
            f"mask overhead ({label}): {mask_ms:.2f} ms per step for {NUM_STREAMS} requests = "
            f"{mask_ms / step_ms:.1%} of a {step_ms:.1f} ms decode step"
        )
    grammar = {"type": "json", "value": nested_schema()}
    constrained = asyncio.run(streams(args.url, {"grammar": grammar}))
    print(
        f"end to end: median ITL of {NUM_STREAMS} constrained streams "
        f"{statistics.median(constrained) * 1e3:.1f} ms vs unconstrained {step_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
