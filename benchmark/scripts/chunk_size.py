"""Choosing `--prefill-chunk-tokens`: what each chunk size costs and buys, one server at a time.

For each setting (whole prompts, then each chunk size) textgen is started on the
default model and given two scenarios:

    long    8 streams decode (200-word prompts, 256 tokens each); 2 s in, a
            3,500-word prompt arrives; 3 s after it, a 20-word request. Reports
            the small request's time to first token, the long prompt's, and the
            streams' largest gap between two tokens (a stall behind a prefill).
    c16     16 streams of 200-word prompts and 128 tokens (side_by_side.py's c16):
            output tokens/s, TTFT p50, ITL p50 and p99: what chunking costs.

    python benchmark/scripts/chunk_size.py --chunks 0 256 512 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from side_by_side import Server, _cpu, start, stop

from textgen.benchmark.apis import APIS
from textgen.benchmark.client import send_request
from textgen.benchmark.config import ServingConfig
from textgen.benchmark.prompts import make_prompts
from textgen.benchmark.serving import run_serving

URL = "http://127.0.0.1:8021"


def textgen(chunk: int) -> Server:
    command = [
        sys.executable,
        "-m",
        "textgen.launcher",
        "--port",
        "8021",
        "--hostname",
        "127.0.0.1",
    ]
    if chunk:
        command += ["--prefill-chunk-tokens", str(chunk)]
    return Server(f"textgen chunk {chunk or 'off'}", command, URL, "tgi", "")


async def long_prompt_beside_streams(seed: int) -> dict:
    api = APIS["tgi"]
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=URL, timeout=900, limits=limits) as client:

        async def send(prompt: str, tokens: int):
            return await send_request(client, api, prompt, tokens, "")

        await send("warm up", 4)
        streams = [asyncio.create_task(send(prompt, 256)) for prompt in make_prompts(8, 200, seed)]
        await asyncio.sleep(2.0)
        long = asyncio.create_task(send(make_prompts(1, 3500, seed + 1)[0], 16))
        await asyncio.sleep(3.0)
        small = await send(make_prompts(1, 20, seed + 2)[0], 16)
        long_result, stream_results = await long, await asyncio.gather(*streams)
    gaps = [gap for result in stream_results for gap in result.inter_token_latencies]
    failed = sum(not r.ok for r in [small, long_result, *stream_results])
    return {
        "small_ttft_s": small.ttft,
        "long_ttft_s": long_result.ttft,
        "stream_max_gap_s": max(gaps) if gaps else None,
        "stream_gap_p50_s": sorted(gaps)[len(gaps) // 2] if gaps else None,
        "failed": failed,
    }


def c16(seed: int) -> dict:
    config = ServingConfig(
        url=URL,
        concurrency=(16,),
        num_requests=16,
        max_new_tokens=128,
        prompt_tokens=200,
        warmup=1,
        timeout=900,
        seed=seed,
    )
    return asdict(asyncio.run(run_serving(config))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 512, 1024])
    parser.add_argument("--out", default="chunk_size.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results: dict = {"cpu": _cpu(), "settings": {}}
    print(results["cpu"], flush=True)
    for index, chunk in enumerate(args.chunks):
        server = textgen(chunk)
        process, _ = start(server)
        try:
            seed = args.seed + 100 * index
            long = asyncio.run(long_prompt_beside_streams(seed))
            level = c16(seed + 50)
        finally:
            stop(process)
        found = {
            **long,
            "c16_tokens_per_s": level["output_tokens_per_s"],
            "c16_ttft_p50_ms": level["ttft_ms"]["p50"],
            "c16_itl_p50_ms": level["itl_ms"]["p50"],
            "c16_itl_p99_ms": level["itl_ms"]["p99"],
            "c16_failed": level["num_failed"],
        }
        results["settings"][chunk or "off"] = found
        print(server.name, json.dumps({k: _round(v) for k, v in found.items()}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


def _round(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
