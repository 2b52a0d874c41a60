"""textgen against its CPU peers, one server at a time, on one machine.

Each server in turn is started from its command, timed from launch to a healthy answer,
timed on its first and second request (the first should be no slower), given every
scenario, and stopped, so that no two servers share the cores. `--rounds` repeats the
cycle; transformers' `generate` (one request at a time, in this process) runs before and
after the servers and is compared by the mean of the two, since a shared machine's speed
drifts over the minutes of a run. Every round sends prompts no server has seen (a prefix
cache would serve repeats). The servers:

    textgen   textgen-launcher on the default model, TGI's /generate_stream
    llamacpp  llama.cpp's llama-server on the same GGUF file, /v1/completions
    vllm      vLLM-CPU's OpenAI server from its own venv, on the same converted weights

    python benchmark/scripts/side_by_side.py --servers textgen llamacpp vllm \\
        --llama-server ~/llama.cpp/build/bin/llama-server --vllm-python /tmp/vllm/bin/python \\
        --rounds 2 --out side_by_side.json

benchmark/RESULTS.md says how the peers are built and which runs its tables come from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from textgen.benchmark.apis import APIS
from textgen.benchmark.config import ServingConfig
from textgen.benchmark.prompts import make_prompts
from textgen.benchmark.serving import run_serving

SCENARIOS = {
    # name: (concurrency, requests, prompt words, output tokens)
    "single": (1, 3, 200, 128),
    "c16": (16, 16, 200, 128),
    "c64": (64, 64, 200, 128),
    "c128": (128, 128, 200, 128),  # the load past c64
}
DEFAULT_SCENARIOS = ["single", "c16", "c64"]
START_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Server:
    """How to start one server and talk to it."""

    name: str
    command: list[str]
    url: str
    api: str  # a key of textgen.benchmark.apis.APIS
    model: str  # the "model" field of OpenAI requests
    env: dict[str, str] = field(default_factory=dict)


def servers(args: argparse.Namespace, gguf: Path, model_dir: Path) -> dict[str, Server]:
    host, threads = "127.0.0.1", str(os.cpu_count() or 1)
    textgen = [sys.executable, "-m", "textgen.launcher", "--port", "8021", "--hostname", host]
    llamacpp = [args.llama_server, "-m", str(gguf), "--host", host, "--port", "8012"]
    llamacpp += ["-t", threads, "-np", "64", "-c", "32768", "--cont-batching"]
    vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    vllm += [str(model_dir), "--served-model-name", "smollm2", "--host", host, "--port", "8011"]
    vllm += ["--dtype", args.vllm_dtype, "--max-model-len", "4096"]
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1"}
    return {
        "textgen": Server(
            "textgen", [*textgen, *shlex.split(args.textgen_args)], f"http://{host}:8021", "tgi", ""
        ),
        "llamacpp": Server("llamacpp", llamacpp, f"http://{host}:8012", "openai", "smollm2"),
        "vllm": Server("vllm", vllm, f"http://{host}:8011", "openai", "smollm2", vllm_env),
    }


def start(server: Server) -> tuple[subprocess.Popen, float]:
    """The server's process, once /health answers 200, and the seconds that took."""
    started = time.perf_counter()
    process = subprocess.Popen(
        server.command,
        env={**os.environ, **server.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while time.perf_counter() - started < START_TIMEOUT_S:
        if process.poll() is not None:
            raise SystemExit(f"{server.name} exited with {process.returncode} while starting")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(process)
    raise SystemExit(f"{server.name} was not healthy within {START_TIMEOUT_S:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def first_requests(server: Server, seed: int) -> list[float]:
    """Seconds of the first two requests after start-up, one at a time (64 tokens each)."""
    api = APIS[server.api]
    timings = []
    for prompt in make_prompts(2, 200, seed=seed):
        body = api.request_body(prompt, 64, server.model)
        started = time.perf_counter()
        with httpx.stream("POST", f"{server.url}{api.path}", json=body, timeout=600) as reply:
            reply.raise_for_status()
            for _ in reply.iter_bytes():
                pass
        timings.append(time.perf_counter() - started)
    return timings


def run_scenario(server: Server, scenario: str, seed: int) -> dict:
    concurrency, requests, prompt, output = SCENARIOS[scenario]
    config = ServingConfig(
        url=server.url,
        api=server.api,
        model=server.model,
        concurrency=(concurrency,),
        num_requests=requests,
        max_new_tokens=output,
        prompt_tokens=prompt,
        warmup=1,
        timeout=900,
        seed=seed,
    )
    return asdict(asyncio.run(run_serving(config))[0])


def transformers_baseline(model_dir: Path, dtype: str, num_requests: int) -> dict:
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
    parser.add_argument("--servers", nargs="+", default=["textgen", "llamacpp"])
    parser.add_argument("--textgen-args", default="", help="launcher flags, one string")
    parser.add_argument("--llama-server", default="llama-server", help="llama.cpp's binary")
    parser.add_argument("--vllm-python", default="python", help="the python of vLLM's venv")
    parser.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--scenario", nargs="+", default=DEFAULT_SCENARIOS, choices=list(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--transformers-requests", type=int, default=2)
    parser.add_argument("--transformers-dtype", default="float32")
    parser.add_argument("--out", default="side_by_side.json")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="round r, server s, scenario i sends the prompts of seed + 1000 r + 100 s + i",
    )
    args = parser.parse_args()
    from textgen.launcher.model import default_gguf_path, resolve_model

    model_dir, gguf = resolve_model(None), default_gguf_path()
    table = servers(args, gguf, model_dir)
    unknown = set(args.servers) - set(table)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; have {sorted(table)}")
    print(_cpu(), flush=True)
    results: dict = {"cpu": _cpu(), "servers": {}, "transformers": {}}
    baseline = [_transformers(args, model_dir, "before")] if args.transformers_requests else []
    for round_index in range(args.rounds):
        for server_index, name in enumerate(args.servers):
            server = table[name]
            process, startup_s = start(server)
            try:
                seed = args.seed + 1000 * round_index + 100 * server_index
                found = {"startup_s": startup_s, "first_requests_s": first_requests(server, seed)}
                for scenario_index, scenario in enumerate(args.scenario):
                    found[scenario] = level = run_scenario(server, scenario, seed + scenario_index)
                    print(name, f"round {round_index}", scenario, _line(level), flush=True)
            finally:
                stop(process)
            print(
                name, f"round {round_index}: healthy after {startup_s:.1f} s, first requests "
                + ", ".join(f"{s:.2f} s" for s in found["first_requests_s"]),
                flush=True,
            )  # fmt: skip
            results["servers"].setdefault(name, []).append(found)
    if args.transformers_requests:
        baseline.append(_transformers(args, model_dir, "after"))
        mean = statistics.mean(run["output_tokens_per_s"] for run in baseline)
        results["transformers"] = {"before": baseline[0], "after": baseline[1], "mean": mean}
    results["summary"] = summary = _summary(results, args.scenario)
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


def _summary(results: dict, scenarios: list[str]) -> dict:
    """Per server and scenario the medians over rounds; textgen's ratios to each peer."""
    medians: dict = {}
    for name, rounds in results["servers"].items():
        medians[name] = {
            "startup_s": statistics.median(r["startup_s"] for r in rounds),
            "first_request_s": statistics.median(r["first_requests_s"][0] for r in rounds),
            "second_request_s": statistics.median(r["first_requests_s"][1] for r in rounds),
        }
        for scenario in scenarios:
            levels = [r[scenario] for r in rounds]
            medians[name][scenario] = {
                "output_tokens_per_s": statistics.median(x["output_tokens_per_s"] for x in levels),
                "ttft_p50_ms": statistics.median(x["ttft_ms"]["p50"] for x in levels),
                "itl_p50_ms": statistics.median(x["itl_ms"]["p50"] for x in levels),
                "itl_p99_ms": statistics.median(x["itl_ms"]["p99"] for x in levels),
                "failed": sum(x["num_failed"] for x in levels),
            }
    summary: dict = {"medians": medians}
    if "textgen" in medians:
        ours = medians["textgen"]
        for peer in set(medians) - {"textgen"}:
            summary[f"textgen_over_{peer}"] = {
                scenario: {
                    key: round(ours[scenario][key] / medians[peer][scenario][key], 3)
                    for key in ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms")
                    if medians[peer][scenario][key]
                }
                for scenario in scenarios
            }
        mean = results["transformers"].get("mean")
        if mean:
            summary["textgen_over_transformers"] = {
                s: round(ours[s]["output_tokens_per_s"] / mean, 2) for s in scenarios
            }
    return summary


def _transformers(args: argparse.Namespace, model_dir: Path, when: str) -> dict:
    found = transformers_baseline(model_dir, args.transformers_dtype, args.transformers_requests)
    print(f"transformers generate, one at a time ({when}):", found, flush=True)
    return found


def _cpu() -> str:
    """The CPU's model name and vector extensions, for the record."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return f"{name}, {os.cpu_count()} cores, {' '.join(f for f in wanted if f in flags)}"


def _line(level: dict) -> str:
    return (
        f"ok {level['num_ok']} failed {level['num_failed']} out {level['output_tokens_per_s']:.1f} "
        f"tok/s ttft50 {level['ttft_ms']['p50']:.0f} itl50 {level['itl_ms']['p50']:.1f} "
        f"itl99 {level['itl_ms']['p99']:.1f}"
    )


if __name__ == "__main__":
    main()
