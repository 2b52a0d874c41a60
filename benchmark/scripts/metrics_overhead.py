"""Cost of metrics and tracing on the router's per-step path, against an instant shard.

The shard answers every step at once, so the time per step is the router's own
bookkeeping (delivering tokens, detokenizing, filtering) plus whatever metrics and tracing
add. Runs 16 concurrent requests of 256 tokens each, repeatedly, in three setups:

    off      RouterMetrics with every method a no-op, tracing disabled
    metrics  RouterMetrics as served (tracing disabled: the default)
    tracing  RouterMetrics and tracing on, spans to an in-memory exporter

Usage: python benchmark/scripts/metrics_overhead.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from textgen.proto import generate_pb2 as pb
from textgen.router.allocator import BlockAllocator
from textgen.router.client import StepResult
from textgen.router.infer import Infer
from textgen.router.queue import Queue
from textgen.router.request import TokenizerInfo
from textgen.router.scheduler import Scheduler, SchedulerConfig
from textgen.router.telemetry import RouterMetrics
from textgen.router.tracing import RouterTracing
from textgen.router.validation import Validation, ValidationLimits

NUM_STREAMS, NUM_TOKENS = 16, 256


class CharTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class InstantShard:
    """Every step returns one token ('a') per request at once; batches as TGI's protocol."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}
        self.num_steps = 0

    async def prefill(
        self,
        batch: pb.Batch,
        token_masks: object = (),
        cached_batch: pb.CachedBatch | None = None,
    ) -> StepResult:
        running = self.batches.pop(cached_batch.id) if cached_batch is not None else []
        self.batches[batch.id] = running + [r.id for r in batch.requests]
        return self._step(batch.id)

    async def decode(self, batches: list[pb.CachedBatch], token_masks: object = ()) -> StepResult:
        self.batches[batches[0].id] = [i for b in batches for i in self.batches.pop(b.id)]
        return self._step(batches[0].id)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch | None:
        if not request_ids:
            del self.batches[batch_id]
            return None
        self.batches[batch_id] = list(request_ids)
        return pb.CachedBatch(id=batch_id, request_ids=request_ids, size=len(request_ids))

    def _step(self, batch_id: int) -> StepResult:
        self.num_steps += 1
        ids = self.batches[batch_id]
        generations = [
            pb.Generation(request_id=i, tokens=pb.Tokens(ids=[97], logprobs=[-0.1])) for i in ids
        ]
        cached = pb.CachedBatch(id=batch_id, request_ids=ids, size=len(ids))
        return StepResult(generations, cached, 1000, 3000, 1000, 500)


class NoMetrics(RouterMetrics):
    """The same calls, doing nothing: the baseline."""

    def __getattribute__(self, name: str):
        if name.startswith(("request_", "step_", "batch_formed", "tokens_waited")):
            return _nothing
        return super().__getattribute__(name)


def _nothing(*args, **kwargs) -> None:
    return None


async def one_round(metrics: RouterMetrics, tracing: RouterTracing) -> tuple[float, int]:
    shard = InstantShard()
    allocator = BlockAllocator(num_blocks=4096, block_size=16)
    queue = Queue(allocator)
    config = SchedulerConfig(100_000, None, None, 0.0, 20)
    scheduler = Scheduler(shard, queue, allocator, config, metrics, tracing)
    info = TokenizerInfo(CharTokenizer(), frozenset(), frozenset())
    limits = ValidationLimits(1024, 2048, 4, max_new_tokens_default=NUM_TOKENS)
    validation = Validation(lambda text: [ord(c) for c in text], limits)
    infer = Infer(validation, queue, info, 1024, metrics, tracing)
    body = {"inputs": "x" * 32, "parameters": {"max_new_tokens": NUM_TOKENS}}
    entries = [await infer.submit(body) for _ in range(NUM_STREAMS)]
    loop = asyncio.create_task(scheduler.run())
    started = time.perf_counter()
    for entry in entries:
        async for _ in infer.events(entry):
            pass
        infer.finish(entry)
    elapsed = time.perf_counter() - started
    loop.cancel()
    return elapsed, shard.num_steps


def setups() -> dict[str, tuple[RouterMetrics, RouterTracing]]:
    exporter = InMemorySpanExporter()
    traced = RouterTracing.with_processor(SimpleSpanProcessor(exporter), "bench")
    return {
        "off": (NoMetrics.standalone(), RouterTracing.disabled()),
        "metrics": (RouterMetrics.standalone(), RouterTracing.disabled()),
        "tracing": (RouterMetrics.standalone(), traced),
    }


async def main(rounds: int) -> None:
    import logging

    logging.disable(logging.INFO)  # the per-request log line is not what is measured
    per_step: dict[str, list[float]] = {name: [] for name in setups()}
    for _ in range(rounds):
        for name, (metrics, tracing) in setups().items():  # interleaved: fair to drift
            gc.collect()  # not the previous setup's garbage on this one's clock
            elapsed, steps = await one_round(metrics, tracing)
            per_step[name].append(elapsed / steps * 1e6)
    # The best round is the one least disturbed by other processes on the machine.
    base = min(per_step["off"])
    print(f"{NUM_STREAMS} streams x {NUM_TOKENS} tokens, {rounds} rounds; router time per step:")
    for name, values in per_step.items():
        best, median = min(values), statistics.median(values)
        print(
            f"  {name:8s} best {best:7.1f} us ({best / base:.3f}x off, +{best - base:5.1f} us)"
            f"  median {median:7.1f} us"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    asyncio.run(main(parser.parse_args().rounds))
