"""The serving benchmark: each concurrency level in turn, N streaming requests per level.

A level runs `concurrency` workers over one shared list of prompts, so exactly
`concurrency` requests are in flight until the list runs dry. Warm-up requests go
first, through the same client, and are not measured.
"""

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TextIO

import httpx

from textgen.benchmark.apis import APIS, TgiApi
from textgen.benchmark.client import RequestResult, send_request
from textgen.benchmark.config import ServingConfig
from textgen.benchmark.prompts import make_prompts, with_shared_prefix
from textgen.benchmark.summary import LevelSummary, summarize

Send = Callable[[str], Awaitable[RequestResult]]


class Progress:
    """A counter line on a terminal, rewritten as requests finish; silent elsewhere."""

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self.enabled = stream.isatty()
        self.stream = stream
        self.label = label
        self.total = total
        self.num_done = 0
        self.num_failed = 0

    def update(self, result: RequestResult) -> None:
        self.num_done += 1
        self.num_failed += not result.ok
        if self.enabled:
            line = f"\r{self.label}: {self.num_done}/{self.total} done, {self.num_failed} failed"
            self.stream.write(line)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


async def run_serving(
    config: ServingConfig, progress_stream: TextIO | None = None
) -> list[LevelSummary]:
    """Runs every concurrency level of `config` in turn; progress goes to stderr by default."""
    progress_stream = progress_stream or sys.stderr
    if config.request_rates:
        return [await run_rate(config, rate, progress_stream) for rate in config.request_rates]
    return [
        await run_level(config, concurrency, progress_stream) for concurrency in config.concurrency
    ]


async def run_level(
    config: ServingConfig, concurrency: int, progress_stream: TextIO
) -> LevelSummary:
    num_requests = config.num_requests_for(concurrency)
    prompts = config_prompts(config, config.warmup + num_requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=config.url, limits=limits, timeout=config.timeout
    ) as client:
        send = sender(client, config)
        await run_pool(send, prompts[: config.warmup], concurrency)
        progress = Progress(progress_stream, f"concurrency {concurrency}", num_requests)
        start = time.perf_counter()
        if config.chat_turns:
            questions = prompts[config.warmup :]
            results = await run_chats(send, questions, concurrency, progress.update)
        else:
            results = await run_pool(send, prompts[config.warmup :], concurrency, progress.update)
        wall_s = time.perf_counter() - start
        progress.close()
    return summarize(concurrency, results, wall_s)


async def run_pool(
    send: Send,
    prompts: list[str],
    concurrency: int,
    on_done: Callable[[RequestResult], None] = lambda result: None,
) -> list[RequestResult]:
    """Sends every prompt, at most `concurrency` at a time; results in completion order."""
    results: list[RequestResult] = []
    pending = iter(prompts)  # NOTE: shared by the workers; each prompt is taken exactly once

    async def worker() -> None:
        for prompt in pending:
            result = await send(prompt)
            results.append(result)
            on_done(result)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return results


def sender(client: httpx.AsyncClient, config: ServingConfig) -> Send:
    """Sends one prompt as `config` says (API, output length, model, extra body fields)."""
    api = TgiApi(watermark=True) if config.watermark else APIS[config.api]
    return partial(
        send_request,
        client,
        api,
        max_new_tokens=config.max_new_tokens,
        model=config.model,
        extra=config.extra_fields,
    )


def config_prompts(config: ServingConfig, num_prompts: int) -> list[str]:
    """The level's prompts (a chat's questions), after the shared prefix when one is set."""
    prompts = make_prompts(num_prompts, config.prompt_tokens, config.seed)
    return with_shared_prefix(prompts, config.shared_prefix_tokens, config.seed)


async def run_chats(
    send: Send,
    questions: list[str],
    num_users: int,
    on_done: Callable[[RequestResult], None] = lambda result: None,
) -> list[RequestResult]:
    """`num_users` users at once, each asking its share of `questions` in turn; every turn
    sends the user's whole history (earlier questions and the answers) and the new one."""
    results: list[RequestResult] = []

    async def user(turns: list[str]) -> None:
        history = ""
        for question in turns:
            prompt = f"{history}User: {question}\nAssistant:"
            result = await send(prompt)
            results.append(result)
            on_done(result)
            history = f"{prompt}{result.text}\n"

    await asyncio.gather(*(user(questions[u::num_users]) for u in range(num_users)))
    return results


async def run_rate(config: ServingConfig, rate: float, progress_stream: TextIO) -> LevelSummary:
    """Open loop: requests arrive as a seeded Poisson process at `rate` per second."""
    num_requests = config.num_requests_at_rate(rate)
    prompts = config_prompts(config, config.warmup + num_requests)
    gaps = random.Random(config.seed).expovariate
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=config.url, limits=limits, timeout=config.timeout
    ) as client:
        send = sender(client, config)
        await run_pool(send, prompts[: config.warmup], 1)
        progress = Progress(progress_stream, f"rate {rate:g}/s", num_requests)
        start = time.perf_counter()
        tasks = []
        for prompt in prompts[config.warmup :]:
            task = asyncio.create_task(send(prompt))
            task.add_done_callback(lambda t: progress.update(t.result()))
            tasks.append(task)
            await asyncio.sleep(gaps(rate))
        results = list(await asyncio.gather(*tasks))
        wall_s = time.perf_counter() - start
        progress.close()
    # NOTE: open loop: no fixed concurrency (0); the level is its request rate.
    return summarize(0, results, wall_s, request_rate=rate)
