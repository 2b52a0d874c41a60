"""`textgen-server serve MODEL_DIR ...`: the shard process' command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from textgen.server.config import AUTO_DTYPE, DTYPES, KV_CACHE_DTYPES, ServerConfig
from textgen.server.logs import setup_logging
from textgen.server.server import serve
from textgen.server.sharding import ShardCountError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgen-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("serve", help="serve one model shard over gRPC")
    default = ServerConfig.default
    cmd.add_argument("model_dir", type=Path, help="safetensors model directory")
    cmd.add_argument("--uds-path", default=default("uds_path"), help="socket prefix: PATH-RANK")
    cmd.add_argument("--rank", type=int, default=default("rank"))
    cmd.add_argument("--world-size", type=int, default=default("world_size"))
    cmd.add_argument(
        "--dtype",
        choices=[AUTO_DTYPE, *sorted(DTYPES)],
        default=default("dtype"),
        help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32",
    )
    cmd.add_argument(
        "--kv-cache-memory-gib",
        type=float,
        default=default("kv_cache_memory_gib"),
        help="KV cache budget of this shard",
    )
    cmd.add_argument("--block-size", type=int, default=default("block_size"))
    cmd.add_argument("--master-addr", default=default("master_addr"))
    cmd.add_argument("--master-port", type=int, default=default("master_port"))
    cmd.add_argument("--otlp-endpoint", default=default("otlp_endpoint"), help="OTLP collector")
    cmd.add_argument("--otlp-service-name", default=default("otlp_service_name"))
    cmd.add_argument("--json-output", action="store_true", help="log JSON lines")
    cmd.add_argument(
        "--num-threads",
        type=int,
        default=default("num_threads"),
        help="CPU threads of this shard (the launcher divides the cores among shards)",
    )
    cmd.add_argument(
        "--int8-activations",
        action=argparse.BooleanOptionalAction,
        default=default("int8_activations"),
        help="GGUF weight blocks times activations rounded to int8 per 32 features; default: "
        "on with --dtype auto on a CPU without native bf16",
    )
    cmd.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=default("kv_cache_dtype"),
        help="auto: the model's dtype; int8: each key and value row as int8 with a float32 scale",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_dir=args.model_dir,
        uds_path=args.uds_path,
        rank=args.rank,
        world_size=args.world_size,
        dtype=args.dtype,
        kv_cache_memory_gib=args.kv_cache_memory_gib,
        block_size=args.block_size,
        master_addr=args.master_addr,
        master_port=args.master_port,
        otlp_endpoint=args.otlp_endpoint,
        otlp_service_name=args.otlp_service_name,
        json_output=args.json_output,
        num_threads=args.num_threads,
        int8_activations=args.int8_activations,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        build_parser().error(str(e))
    setup_logging(config.rank, config.json_output)
    try:
        asyncio.run(serve(config))
    except ShardCountError as e:
        # A user's choice, not a crash: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
