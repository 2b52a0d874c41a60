"""Load scenarios against a textgen server on 127.0.0.1: sustained, burst, disconnect storm.

    python load_tests/load_scenarios.py --url http://127.0.0.1:8080 [--json]

Every scenario is bounded both in requests and in seconds. After each one the runner
checks that the server is still healthy: `GET /health` answers 200 and one fresh request
streams to its end. The exit status is 1 when a scenario had failures or the server was
unhealthy afterwards, so the runner fits CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import httpx

from textgen.benchmark.apis import TgiApi
from textgen.benchmark.client import RequestResult, iter_sse_data, send_request
from textgen.benchmark.prompts import make_prompts
from textgen.benchmark.summary import Percentiles, percentiles

_LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8080"
    sustained_clients: int = 8  # clients kept busy for the whole sustained scenario
    sustained_seconds: float = 30.0
    sustained_max_requests: int = 200
    burst_requests: int = 32  # sent at the same instant
    disconnect_requests: int = 32  # clients that drop after a few tokens
    disconnect_after_tokens: int = 2
    max_new_tokens: int = 32
    prompt_tokens: int = 64
    timeout: float = 300.0  # per scenario, seconds (sustained: on top of its duration)

    def __post_init__(self) -> None:
        if urlparse(self.url).hostname not in _LOCAL_HOSTS:
            raise ValueError(f"load tests run against 127.0.0.1 only, got {self.url!r}")


@dataclass(frozen=True)
class ScenarioReport:
    name: str
    requests: int
    failures: int
    errors: dict[str, int]
    wall_s: float
    ttft_ms: Percentiles | None
    latency_ms: Percentiles | None
    healthy_after: bool  # /health 200 and one fresh request completed


async def _sustained(client: httpx.AsyncClient, config: LoadConfig) -> list[RequestResult]:
    prompts = make_prompts(config.sustained_max_requests, config.prompt_tokens, seed=1)
    deadline = time.monotonic() + config.sustained_seconds
    results: list[RequestResult] = []

    async def worker() -> None:
        while time.monotonic() < deadline and prompts:
            prompt = prompts.pop()
            results.append(await send_request(client, TgiApi(), prompt, config.max_new_tokens, ""))

    await asyncio.gather(*(worker() for _ in range(config.sustained_clients)))
    return results


async def _burst(client: httpx.AsyncClient, config: LoadConfig) -> list[RequestResult]:
    prompts = make_prompts(config.burst_requests, config.prompt_tokens, seed=2)
    api = TgiApi()
    return list(
        await asyncio.gather(
            *(send_request(client, api, p, config.max_new_tokens, "") for p in prompts)
        )
    )


async def _drop_after_tokens(
    client: httpx.AsyncClient, prompt: str, config: LoadConfig
) -> RequestResult:
    """Streams until a few tokens arrived, then closes the connection mid-stream."""
    body = TgiApi().request_body(prompt, 10 * config.max_new_tokens, "")
    result = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
            else:
                async for _ in iter_sse_data(response.aiter_lines()):
                    result.token_times.append(time.perf_counter())
                    if len(result.token_times) >= config.disconnect_after_tokens:
                        break  # leaving the block closes the connection mid-stream
                if len(result.token_times) < config.disconnect_after_tokens:
                    result.error = "stream ended before the client dropped it"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def _disconnect_storm(client: httpx.AsyncClient, config: LoadConfig) -> list[RequestResult]:
    prompts = make_prompts(config.disconnect_requests, config.prompt_tokens, seed=3)
    return list(await asyncio.gather(*(_drop_after_tokens(client, p, config) for p in prompts)))


async def _healthy(client: httpx.AsyncClient, config: LoadConfig) -> bool:
    try:
        if (await client.get("/health")).status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    probe = await send_request(client, TgiApi(), "hello", 4, "")
    return probe.ok and probe.num_output_tokens == 4


SCENARIOS = {"sustained": _sustained, "burst": _burst, "disconnect_storm": _disconnect_storm}


async def run_scenarios(config: LoadConfig, names: list[str]) -> list[ScenarioReport]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout)
    reports = []
    async with httpx.AsyncClient(base_url=config.url, limits=limits, timeout=timeout) as client:
        for name in names:
            started = time.perf_counter()
            try:
                results = await asyncio.wait_for(
                    SCENARIOS[name](client, config), _time_limit(name, config)
                )
            except asyncio.TimeoutError:
                results = [RequestResult(start=started, error="scenario timed out")]
            wall = time.perf_counter() - started
            reports.append(_report(name, results, wall, await _healthy(client, config)))
    return reports


def _time_limit(name: str, config: LoadConfig) -> float:
    """Seconds a scenario may take: the sustained one runs for its duration first."""
    return config.timeout + (config.sustained_seconds if name == "sustained" else 0.0)


def _report(name: str, results: list[RequestResult], wall: float, healthy: bool) -> ScenarioReport:
    failed = [r for r in results if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error or ""] = errors.get(r.error or "", 0) + 1
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    return ScenarioReport(
        name=name,
        requests=len(results),
        failures=len(failed),
        errors=errors,
        wall_s=wall,
        ttft_ms=percentiles(ttfts),
        latency_ms=percentiles([r.latency * 1000 for r in ok]),
        healthy_after=healthy,
    )


def render(reports: list[ScenarioReport]) -> str:
    header = "requests failures  wall s  TTFT ms p50/p99  E2E ms p50/p99  healthy"
    lines = [f"{'scenario':<17} {header}"]
    for r in reports:
        ttft = f"{r.ttft_ms.p50:.0f}/{r.ttft_ms.p99:.0f}" if r.ttft_ms else "-"
        e2e = f"{r.latency_ms.p50:.0f}/{r.latency_ms.p99:.0f}" if r.latency_ms else "-"
        lines.append(
            f"{r.name:<17} {r.requests:>8} {r.failures:>8} {r.wall_s:>7.1f} {ttft:>16}"
            f" {e2e:>15}  {'yes' if r.healthy_after else 'NO'}"
        )
        lines += [f"  {count} x {error}" for error, count in r.errors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = LoadConfig
    parser.add_argument("--url", default=d.url)
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--sustained-clients", type=int, default=d.sustained_clients)
    parser.add_argument("--sustained-seconds", type=float, default=d.sustained_seconds)
    parser.add_argument("--sustained-max-requests", type=int, default=d.sustained_max_requests)
    parser.add_argument("--burst-requests", type=int, default=d.burst_requests)
    parser.add_argument("--disconnect-requests", type=int, default=d.disconnect_requests)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    parser.add_argument("--timeout", type=float, default=d.timeout)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = LoadConfig(
            url=args.url,
            sustained_clients=args.sustained_clients,
            sustained_seconds=args.sustained_seconds,
            sustained_max_requests=args.sustained_max_requests,
            burst_requests=args.burst_requests,
            disconnect_requests=args.disconnect_requests,
            max_new_tokens=args.max_new_tokens,
            prompt_tokens=args.prompt_tokens,
            timeout=args.timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
    reports = asyncio.run(run_scenarios(config, args.scenario))
    print(json.dumps([asdict(r) for r in reports], indent=2) if args.json else render(reports))
    return 0 if all(r.failures == 0 and r.healthy_after for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
