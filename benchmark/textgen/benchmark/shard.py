"""The shard-level benchmark (TGI's `text-generation-benchmark`): gRPC straight to a shard.

No router, tokenizer or HTTP: the benchmark owns the shard. It calls Warmup (which
reallocates the KV cache, so never point it at a shard a router is serving), then for
every batch size runs `runs` rounds of one Prefill of `batch_size` prompts followed by
`decode_length` Decode steps, timing each RPC from the client side.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import grpc

from textgen.benchmark.summary import Percentiles, percentiles
from textgen.proto import generate_pb2 as pb
from textgen.proto.generate_pb2_grpc import TextGenerationServiceStub

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


@dataclass(frozen=True)
class ShardBenchConfig:
    """What `textgen-benchmark shard` runs. CLI defaults come from here."""

    uds_path: str = "/tmp/textgen-server-0"  # the shard's socket file (launcher: PREFIX-0)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    prompt_length: int = 200  # tokens per prompt
    decode_length: int = 16  # decode steps per run
    runs: int = 3  # prefill + decodes, per batch size
    warmups: int = 1  # unmeasured runs before each batch size
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.prompt_length < 1 or self.decode_length < 1 or self.runs < 1:
            raise ValueError("prompt_length, decode_length and runs must be >= 1")
        if self.warmups < 0:
            raise ValueError(f"warmups must be >= 0, got {self.warmups}")

    @property
    def total_length(self) -> int:
        return self.prompt_length + self.decode_length


@dataclass(frozen=True)
class PhaseSummary:
    """One phase (prefill or decode) at one batch size."""

    phase: str
    batch_size: int
    num_steps: int
    latency_ms: Percentiles
    throughput_tok_s: Percentiles  # tokens per second of each step: processed (prefill) or new


@dataclass
class _Timings:
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


class ShardBench:
    """One gRPC channel to one shard, and the request building the runs need."""

    def __init__(self, config: ShardBenchConfig) -> None:
        self.config = config
        self.channel = grpc.insecure_channel(f"unix://{config.uds_path}", options=_CHANNEL_OPTIONS)
        self.stub = TextGenerationServiceStub(self.channel)
        self.rng = random.Random(config.seed)
        self.next_id = 1

    def close(self) -> None:
        self.channel.close()

    def warmup(self) -> tuple[pb.InfoResponse, int, int]:
        """Info, then Warmup sized for the largest batch; returns (info, num_blocks, block_size)."""
        c = self.config
        info = self.stub.Info(pb.InfoRequest(), timeout=30)
        largest = max(c.batch_sizes)
        reply = self.stub.Warmup(
            pb.WarmupRequest(
                max_input_tokens=c.prompt_length,
                max_total_tokens=c.total_length,
                max_prefill_tokens=c.prompt_length * largest,
                max_batch_size=largest,
            ),
            timeout=3600,
        )
        blocks_each = math.ceil(c.total_length / reply.block_size)
        if blocks_each * largest + 1 > reply.num_blocks:
            raise ValueError(
                f"the shard's KV cache holds {reply.num_blocks} blocks of {reply.block_size}; "
                f"batch {largest} x {c.total_length} tokens needs {blocks_each * largest + 1}"
            )
        return info, reply.num_blocks, reply.block_size

    def run(self, batch_size: int, block_size: int, vocab_size: int, timings: _Timings) -> None:
        """One Prefill of batch_size prompts, then decode_length Decodes; drops the batch."""
        c = self.config
        batch = self._batch(batch_size, block_size, vocab_size)
        started = time.perf_counter()
        cached = self.stub.Prefill(pb.PrefillRequest(batch=batch), timeout=3600).batch
        timings.prefill_s.append(time.perf_counter() - started)
        for _ in range(c.decode_length - 1):
            started = time.perf_counter()
            cached = self.stub.Decode(pb.DecodeRequest(batches=[cached]), timeout=3600).batch
            timings.decode_s.append(time.perf_counter() - started)
        self.stub.ClearCache(pb.ClearCacheRequest(id=cached.id), timeout=60)

    def _batch(self, batch_size: int, block_size: int, vocab_size: int) -> pb.Batch:
        c = self.config
        blocks_each = math.ceil(c.total_length / block_size)
        requests = []
        for i in range(batch_size):
            # NOTE: block 0 is the router's health-probe block; requests start at 1.
            blocks = [1 + i * blocks_each + j for j in range(blocks_each)]
            prompt = [self.rng.randrange(vocab_size) for _ in range(c.prompt_length)]
            requests.append(
                pb.Request(
                    id=self.next_id + i,
                    input_ids=prompt,
                    parameters=_greedy(),
                    blocks=blocks,
                    max_new_tokens=c.decode_length,
                )
            )
        batch_id, self.next_id = self.next_id, self.next_id + batch_size
        return pb.Batch(
            id=batch_id, requests=requests, size=batch_size, max_tokens=batch_size * c.total_length
        )


def _greedy() -> pb.SamplingParameters:
    return pb.SamplingParameters(
        temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0, do_sample=False
    )


def run_shard_bench(config: ShardBenchConfig) -> tuple[pb.InfoResponse, list[PhaseSummary]]:
    """Warmup, then every batch size in turn; returns the shard's Info and one summary per phase."""
    bench = ShardBench(config)
    try:
        info, _, block_size = bench.warmup()
        summaries = []
        for batch_size in config.batch_sizes:
            for _ in range(config.warmups):
                bench.run(batch_size, block_size, info.vocab_size, _Timings())
            timings = _Timings()
            for _ in range(config.runs):
                bench.run(batch_size, block_size, info.vocab_size, timings)
            summaries += _summaries(batch_size, config.prompt_length, timings)
        return info, summaries
    finally:
        bench.close()


def _summaries(batch_size: int, prompt_length: int, timings: _Timings) -> list[PhaseSummary]:
    phases = [("prefill", timings.prefill_s, batch_size * prompt_length)]
    if timings.decode_s:
        phases.append(("decode", timings.decode_s, batch_size))
    return [
        PhaseSummary(
            phase=name,
            batch_size=batch_size,
            num_steps=len(seconds),
            latency_ms=percentiles([s * 1000 for s in seconds]),
            throughput_tok_s=percentiles([tokens / s for s in seconds]),
        )
        for name, seconds, tokens in phases
    ]
