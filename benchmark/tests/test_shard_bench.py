"""`textgen-benchmark shard` against a real shard process serving a tiny random Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from textgen.benchmark.main import main
from textgen.benchmark.shard import ShardBenchConfig, run_shard_bench
from textgen.proto import generate_pb2 as pb
from textgen.proto.generate_pb2_grpc import TextGenerationServiceStub

STARTUP_TIMEOUT_S = 120


def _save_tiny_llama(path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def _wait_serving(socket_path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the shard exited during start-up"
        if os.path.exists(socket_path):
            with grpc.insecure_channel(f"unix://{socket_path}") as channel:
                try:
                    TextGenerationServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    raise TimeoutError(f"shard not serving on {socket_path} after {STARTUP_TIMEOUT_S}s")


@pytest.fixture(scope="module")
def tiny_shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("bench-shard")
    _save_tiny_llama(tmp / "model")
    uds_prefix = str(tmp / "shard")
    command = [
        str(Path(sys.executable).parent / "textgen-server"), "serve", str(tmp / "model"),
        "--uds-path", uds_prefix, "--dtype", "float32", "--kv-cache-memory-gib", "0.01",
    ]  # fmt: skip
    with open(tmp / "shard.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(uds_prefix + "-0", process)
        yield uds_prefix + "-0"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_shard_bench_reports_both_phases_per_batch_size(tiny_shard, capsys):
    argv = ["shard", "--uds-path", tiny_shard, "--batch-size", "1", "4", "--prompt-length", "8"]
    argv += ["--decode-length", "3", "--runs", "1", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shard"]["dtype"] == "float32"
    phases = [(p["phase"], p["batch_size"], p["num_steps"]) for p in report["phases"]]
    # 1 run: one prefill, decode_length - 1 decodes.
    assert phases == [("prefill", 1, 1), ("decode", 1, 2), ("prefill", 4, 1), ("decode", 4, 2)]
    prefill_b4 = report["phases"][2]
    # Throughput is tokens of the step over its latency: 4 prompts of 8 tokens. One
    # prefill step, so its percentiles are that step's figures (with several steps the
    # median throughput is not the throughput at the median latency).
    expected = 4 * 8 / (prefill_b4["latency_ms"]["p50"] / 1000)
    assert prefill_b4["throughput_tok_s"]["p50"] == pytest.approx(expected, rel=1e-6)


def test_shard_bench_table_has_a_row_per_phase(tiny_shard, capsys):
    argv = ["shard", "--uds-path", tiny_shard, "--batch-size", "2", "--prompt-length", "4"]
    assert main([*argv, "--decode-length", "2", "--runs", "1", "--warmups", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("llama float32 on cpu")
    assert [line.split()[:3] for line in lines[2:]] == [["prefill", "2", "1"], ["decode", "2", "1"]]


def test_shard_bench_refuses_a_batch_the_cache_cannot_hold(tiny_shard):
    # 0.01 GiB of tiny-Llama KV (512 bytes a token) holds about 20k tokens; ask for 33k.
    config = ShardBenchConfig(uds_path=tiny_shard, batch_sizes=(512,), prompt_length=64)
    with pytest.raises(ValueError, match="KV cache holds"):
        run_shard_bench(config)


def test_shard_bench_config_rejects_empty_batch_sizes():
    with pytest.raises(ValueError, match="batch sizes"):
        ShardBenchConfig(batch_sizes=())
