"""textgen vs vLLM-CPU vs transformers' generate, interleaved on one machine.

Both servers must already run (see benchmark/RESULTS.md for the commands). Each scenario
runs on textgen, then on vLLM, `--rounds` times, alternating, so that noise from other
work on a shared machine hits both alike; the report gives per-round ratios and their
median. transformers' `generate` runs one request at a time in this process.

    python benchmark/scripts/side_by_side.py --textgen http://127.0.0.1:8021 \
        --vllm http://127.0.0.1:8011 --model-dir DIR --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict

from textgen.benchmark.config import ServingConfig
from textgen.benchmark.prompts import make_prompts
from textgen.benchmark.serving import run_serving

SCENARIOS = {
    # name: (concurrency, requests, prompt tokens, output tokens)
    "single": (1, 3, 200, 64),
    "c16": (16, 16, 200, 64),
    "c64": (64, 64, 200, 128),
    "c128": (128, 128, 200, 128),  # beyond the scenarios: the load past c64
}
DEFAULT_SCENARIOS = ["single", "c16", "c64"]


def run_one(url: str, api: str, model: str, scenario: str, seed: int = 0) -> dict:
    concurrency, requests, prompt, output = SCENARIOS[scenario]
    config = ServingConfig(
        url=url,
        api=api,
        model=model,
        concurrency=(concurrency,),
        num_requests=requests,
        max_new_tokens=output,
        prompt_tokens=prompt,
        warmup=1,
        timeout=600,
        seed=seed,
    )
    return asdict(asyncio.run(run_serving(config))[0])


def transformers_baseline(model_dir: str, dtype: str, num_requests: int) -> dict:
    """generate() one request at a time: output tokens/s over the whole run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    prompts = make_prompts(num_requests + 1, 200, seed=0)
    tokens, started = 0, 0.0
    for i, prompt in enumerate(prompts):
        if i == 1:  # the first request warms up and is not counted
            tokens, started = 0, time.perf_counter()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=128, min_new_tokens=128, do_sample=False
            )  # [1, prompt + 128]
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - started
    return {"output_tokens_per_s": tokens / wall, "requests": num_requests, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--textgen", default="http://127.0.0.1:8021")
    parser.add_argument("--vllm", default="http://127.0.0.1:8011")
    parser.add_argument("--vllm-model", default="smollm2")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--scenario", nargs="+", default=DEFAULT_SCENARIOS, choices=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--transformers-requests", type=int, default=2)
    parser.add_argument("--out", default="side_by_side.json")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="scenario i, round r sends the prompts of seed + 100 i + r, so no server sees "
        "a prompt twice (vLLM's prefix cache would serve repeats from cache)",
    )
    args = parser.parse_args()
    results: dict = {"scenarios": {}}
    # transformers runs before and after the servers and is compared by the mean of the
    # two: a shared machine's speed drifts by 10-20 % over the minutes of a run.
    baseline = []
    if args.transformers_requests:
        baseline.append(_transformers(args, "before"))
    for scenario_index, scenario in enumerate(args.scenario):
        rounds = []
        for round_index in range(args.rounds):
            seed = args.seed + 100 * scenario_index + round_index
            tg = run_one(args.textgen, "tgi", "textgen", scenario, seed)
            vl = run_one(args.vllm, "openai", args.vllm_model, scenario, seed)
            rounds.append({"textgen": tg, "vllm": vl})
            print(scenario, f"seed {seed}", _line(tg), "|", _line(vl), flush=True)
        ratios = _ratios(rounds)
        results["scenarios"][scenario] = {"rounds": rounds, "median_ratios": ratios}
        print(scenario, "median ratios textgen/vllm:", ratios, flush=True)
    if args.transformers_requests:
        baseline.append(_transformers(args, "after"))
        mean = statistics.mean(run["output_tokens_per_s"] for run in baseline)
        results["transformers"] = {"before": baseline[0], "after": baseline[1], "mean": mean}
        for scenario, found in results["scenarios"].items():
            rates = [r["textgen"]["output_tokens_per_s"] for r in found["rounds"]]
            found["textgen_over_transformers"] = ratio = statistics.median(rates) / mean
            print(scenario, f"textgen / transformers: {ratio:.1f}x")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


def _transformers(args: argparse.Namespace, when: str) -> dict:
    found = transformers_baseline(args.model_dir, "bfloat16", args.transformers_requests)
    print(f"transformers generate, one at a time ({when}):", found, flush=True)
    return found


def _line(level: dict) -> str:
    return (
        f"ok {level['num_ok']} out {level['output_tokens_per_s']:.1f} tok/s "
        f"ttft50 {level['ttft_ms']['p50']:.0f} itl50 {level['itl_ms']['p50']:.1f} "
        f"itl99 {level['itl_ms']['p99']:.1f}"
    )


def _ratios(rounds: list[dict]) -> dict:
    def ratio(key: str, pct: str | None) -> float:
        values = []
        for r in rounds:
            tg, vl = r["textgen"][key], r["vllm"][key]
            values.append(tg[pct] / vl[pct] if pct else tg / vl)
        return round(statistics.median(values), 3)

    return {
        "output_tokens_per_s": ratio("output_tokens_per_s", None),
        "ttft_p50": ratio("ttft_ms", "p50"),
        "itl_p50": ratio("itl_ms", "p50"),
        "itl_p99": ratio("itl_ms", "p99"),
    }


if __name__ == "__main__":
    main()
