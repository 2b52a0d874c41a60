"""Prefix caching side by side: each server with its cache on and off, one at a time.

Two scenarios, driven by `textgen-benchmark serving` against every server:

    shared  8 concurrent streams; every prompt is one 800-word prefix (a system
            prompt) and 32 words of its own; 32 output tokens each
    chat    16 users at once, 5 turns each; every turn resends the user's whole
            history (its questions and the answers) and a new 32-word question

The servers and how their cache is turned off:

    textgen   --no-prefix-caching (on by default)
    vllm      --no-enable-prefix-caching (on by default in vLLM's V1 engine)
    llamacpp  `"cache_prompt": false` in every request (its slots reuse their
              previous prompt's KV by default); 16 slots of 2,048 tokens

Each server starts once per setting, is warmed up with one request that carries
the shared prefix (so "on" measures a cached system prompt, as in production),
and is stopped before the next one starts. Prints, per server, requests/s and
TTFT p50 for both settings and the speed-up from sharing; and, for textgen, the
TTFT p50 of a hit on the 800-word prefix over a miss.

    python benchmark/scripts/prefix_cache.py --servers textgen vllm llamacpp \\
        --llama-server .../llama-server --vllm-python /tmp/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from side_by_side import _cpu, servers, start, stop

from textgen.benchmark.config import ServingConfig
from textgen.benchmark.serving import run_serving

SCENARIOS = {
    "shared": {"concurrency": (8,), "num_requests": 32, "shared_prefix_tokens": 800},
    "chat": {"concurrency": (16,), "chat_turns": 5},
}
OFF = {
    "textgen": {"flags": ["--no-prefix-caching"]},
    "vllm": {"flags": ["--no-enable-prefix-caching"]},
    "llamacpp": {"extra_body": json.dumps({"cache_prompt": False})},
}


def run(server, scenario: str, extra_body: str, seed: int) -> dict:
    config = ServingConfig(
        url=server.url,
        api=server.api,
        model=server.model,
        max_new_tokens=32,
        prompt_tokens=32,
        warmup=1,
        timeout=900,
        seed=seed,
        extra_body=extra_body,
        **SCENARIOS[scenario],
    )
    return asdict(asyncio.run(run_serving(config))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", default=["textgen"], choices=list(OFF))
    parser.add_argument("--textgen-args", default="", help="launcher flags, one string")
    parser.add_argument("--llama-server", default="llama-server", help="llama.cpp's binary")
    parser.add_argument("--vllm-python", default="python", help="the python of vLLM's venv")
    parser.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="prefix_cache.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from textgen.launcher.model import default_gguf_path, resolve_model

    table = servers(args, default_gguf_path(), resolve_model(None))
    # llama.cpp splits its context among its slots: 16 slots of 2,048 tokens hold the
    # 800-word prefix and a 5-turn history (64 slots of 512 do not).
    llamacpp = table["llamacpp"].command
    llamacpp[llamacpp.index("-np") + 1] = "16"
    results: dict = {"cpu": _cpu(), "servers": {}}
    print(results["cpu"], flush=True)
    for index, name in enumerate(args.servers):
        for setting in ("on", "off"):
            server, extra_body = table[name], ""
            if setting == "off":
                server = replace(server, command=[*server.command, *OFF[name].get("flags", [])])
                extra_body = OFF[name].get("extra_body", "")
            process, _ = start(server)
            try:
                for scenario in SCENARIOS:
                    level = run(server, scenario, extra_body, args.seed + 100 * index)
                    results["servers"].setdefault(name, {}).setdefault(setting, {})[scenario] = (
                        level
                    )
                    print(name, setting, scenario, _line(level), flush=True)
            finally:
                stop(process)
    results["summary"] = summary = _summary(results["servers"])
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


def _summary(found: dict) -> dict:
    summary: dict = {}
    for name, settings in found.items():
        per = summary[name] = {}
        for scenario in SCENARIOS:
            on, off = settings["on"][scenario], settings["off"][scenario]
            ttft_on, ttft_off = _ttft(on), _ttft(off)
            per[scenario] = {
                "requests_per_s_on": round(on["requests_per_s"], 3),
                "requests_per_s_off": round(off["requests_per_s"], 3),
                "speedup_from_sharing": _ratio(on["requests_per_s"], off["requests_per_s"], 2),
                "ttft_p50_ms_on": ttft_on,
                "ttft_p50_ms_off": ttft_off,
                "ttft_on_over_off": _ratio(ttft_on, ttft_off, 3),
                "failed": on["num_failed"] + off["num_failed"],
            }
    return summary


def _ttft(level: dict) -> float | None:
    return round(level["ttft_ms"]["p50"]) if level["ttft_ms"] else None


def _ratio(a: float | None, b: float | None, digits: int) -> float | None:
    """a / b, or None when either is missing or b is 0 (every request failed)."""
    return round(a / b, digits) if a is not None and b else None


def _line(level: dict) -> str:
    ttft = level["ttft_ms"]["p50"] if level["ttft_ms"] else float("nan")
    return (
        f"ok {level['num_ok']} failed {level['num_failed']} req/s {level['requests_per_s']:.2f} "
        f"ttft50 {ttft:.0f} ms out {level['output_tokens_per_s']:.1f} tok/s"
    )


if __name__ == "__main__":
    main()
