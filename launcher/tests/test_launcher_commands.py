"""The children's command lines: exactly the flags textgen-server and textgen-router take."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from textgen.launcher import commands as commands_mod
from textgen.launcher import parallel
from textgen.launcher.commands import TextgenCommands, console_script
from textgen.launcher.config import LauncherConfig, TokenLimits
from textgen.launcher.parallel import free_port, threads_per_shard

MODEL_DIR = Path("/models/smol")


def make_commands(num_threads: int | None = None, **overrides: object) -> TextgenCommands:
    config = LauncherConfig(**overrides)  # type: ignore[arg-type]
    return TextgenCommands(
        config=config,
        model_dir=MODEL_DIR,
        model_name="org/smol",
        limits=TokenLimits.derive(config, 8192),
        dtype="float32",
        master_port=1234,
        num_threads=num_threads,
    )


def test_shard_command() -> None:
    argv = make_commands(shard_uds_path="/tmp/s").shard(0)
    assert argv[0].endswith("textgen-server") or "textgen.server.cli" in argv[-1]
    assert argv[argv.index("serve") :] == [
        "serve", "/models/smol", "--uds-path", "/tmp/s", "--rank", "0", "--world-size", "1",
        "--dtype", "float32", "--kv-cache-memory-gib", "1.0",
        "--master-addr", "localhost", "--master-port", "1234",
    ]  # fmt: skip


def test_shard_commands_of_a_group() -> None:
    commands = make_commands(num_threads=3, num_shard=2, shard_uds_path="/tmp/s")
    argv = commands.shard(1)
    assert argv[argv.index("--rank") + 1 : argv.index("--rank") + 4] == ["1", "--world-size", "2"]
    assert argv[argv.index("--uds-path") + 1] == "/tmp/s"  # the shard appends -{rank}
    assert argv[-2:] == ["--num-threads", "3"]
    assert commands.shard(0)[-2:] == ["--num-threads", "3"]


@pytest.mark.parametrize(("num_shard", "expected"), [(1, None), (2, 4), (3, 2), (16, 1)])
def test_threads_per_shard_divide_the_cores(
    monkeypatch: pytest.MonkeyPatch, num_shard: int, expected: int | None
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert threads_per_shard(num_shard) == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads_per_shard(num_shard) is None  # the user's setting, inherited


def test_master_port_defaults_to_a_free_port() -> None:
    first, second = free_port("127.0.0.1"), free_port("127.0.0.1")
    assert first != 29500 and 0 < first < 65536 and 0 < second < 65536


def test_router_command_with_defaults() -> None:
    argv = make_commands(port=9000, hostname="127.0.0.1").router()
    flags = argv[argv.index("--model-dir") :]
    assert flags == [
        "--model-dir", "/models/smol", "--model-id", "org/smol",
        "--port", "9000", "--hostname", "127.0.0.1",
        "--master-shard-uds-path", "/tmp/textgen-server-0",
        "--max-input-tokens", "4095", "--max-total-tokens", "4096",
        "--max-batch-prefill-tokens", "4145", "--prefill-chunk-tokens", "512",
        "--max-concurrent-requests", "128", "--waiting-served-ratio", "0.3",
        "--max-waiting-tokens", "20", "--max-stop-sequences", "4",
        "--max-top-n-tokens", "5", "--max-best-of", "2", "--payload-limit", "2000000",
        "--graceful-termination-timeout", "90.0", "--stream-keepalive-interval", "10.0",
    ]  # fmt: skip


def test_security_flags_reach_the_router_and_the_key_stays_off_its_command_line() -> None:
    from textgen.launcher.config import LauncherConfig
    from textgen.launcher.main import build_parser
    from textgen.router.main import parse_args

    args = build_parser().parse_args(
        [
            "--api-key", "s3cret", "--api-key-file", "/etc/keys",
            "--cors-allow-origin", "https://a.example,https://b.example",
            "--cors-allow-origin", "https://c.example",
            "--graceful-termination-timeout", "5",
        ]
    )  # fmt: skip
    config = LauncherConfig.from_args(args)
    assert config.cors_allow_origin == [
        "https://a.example",
        "https://b.example",
        "https://c.example",
    ]
    argv = make_commands(
        api_key=config.api_key,
        api_key_file=config.api_key_file,
        cors_allow_origin=config.cors_allow_origin,
        graceful_termination_timeout=config.graceful_termination_timeout,
    ).router()
    assert "s3cret" not in " ".join(argv)
    router = parse_args(argv[argv.index("--model-dir") :])
    assert router.api_key_file == "/etc/keys"
    assert router.cors_allow_origins == (
        "https://a.example",
        "https://b.example",
        "https://c.example",
    )
    assert router.graceful_termination_timeout == 5.0


def test_router_accepts_the_tgi_limits_the_launcher_passes() -> None:
    from textgen.router.main import parse_args

    argv = make_commands(max_top_n_tokens=3, max_best_of=4, payload_limit=1000).router()
    config = parse_args(argv[argv.index("--model-dir") :])
    assert (config.max_top_n_tokens, config.max_best_of, config.payload_limit) == (3, 4, 1000)


def test_router_command_with_optional_flags() -> None:
    from textgen.router.main import parse_args

    argv = make_commands(
        max_batch_total_tokens=10000, max_batch_size=4, json_output=True, prefill_chunk_tokens=64
    ).router()
    assert argv[argv.index("--max-batch-total-tokens") + 1] == "10000"
    assert argv[argv.index("--max-batch-size") + 1] == "4"
    assert argv[argv.index("--prefill-chunk-tokens") + 1] == "64"
    assert argv[-1] == "--json-output"
    config = parse_args(argv[argv.index("--model-dir") :])
    assert config.prefill_chunk_tokens == 64


def test_console_script_from_the_venv() -> None:
    script = Path(sys.executable).parent / "textgen-router"
    assert script.is_file()  # the project is installed in this environment
    assert console_script("textgen-router", "textgen.router.main") == [str(script)]


def test_console_script_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands_mod.sys, "executable", str(tmp_path / "python"))
    argv = console_script("textgen-router", "textgen.router.main")
    assert argv[:2] == [str(tmp_path / "python"), "-c"]
    assert "from textgen.router.main import main" in argv[2]


def test_int8_activations_reach_the_shards_config() -> None:
    from textgen.server.cli import build_parser, config_from_args

    def shard_config(argv: list[str]):
        return config_from_args(build_parser().parse_args(argv[argv.index("serve") :]))

    assert "--int8-activations" not in make_commands().shard(0)
    assert shard_config(make_commands().shard(0)).int8_activations is None  # the platform's
    argv = make_commands(int8_activations=True).shard(0)
    assert "--int8-activations" in argv
    assert shard_config(argv).int8_activations is True
    argv = make_commands(int8_activations=False).shard(0)
    assert "--no-int8-activations" in argv
    assert shard_config(argv).int8_activations is False


def test_the_kv_cache_dtype_reaches_the_shards_config() -> None:
    from textgen.server.cli import build_parser, config_from_args

    def shard_config(argv: list[str]):
        return config_from_args(build_parser().parse_args(argv[argv.index("serve") :]))

    assert shard_config(make_commands().shard(0)).kv_cache_dtype == "auto"
    argv = make_commands(kv_cache_dtype="int8", num_shard=2).shard(1)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "int8"
    assert shard_config(argv).kv_cache_dtype == "int8"


def test_chunked_prefill_is_on_by_default_and_0_turns_it_off() -> None:
    assert make_commands().router().count("--prefill-chunk-tokens") == 1
    assert "--prefill-chunk-tokens" not in make_commands(prefill_chunk_tokens=0).router()
