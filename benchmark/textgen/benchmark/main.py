"""`textgen-benchmark`: load generators for a running textgen server."""

import argparse
import asyncio
import sys
from collections.abc import Sequence

from textgen.benchmark.apis import APIS
from textgen.benchmark.config import ServingConfig
from textgen.benchmark.plot import plot_levels
from textgen.benchmark.report import render_json, render_table
from textgen.benchmark.serving import run_serving
from textgen.benchmark.shard import ShardBenchConfig, run_shard_bench
from textgen.benchmark.shard_report import render_shard_json, render_shard_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgen-benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser(
        "serving",
        help="concurrent streaming requests against a running server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_serving_arguments(serving)
    shard = commands.add_parser(
        "shard",
        help="prefill and decode at fixed batch sizes, gRPC straight to a shard",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_shard_arguments(shard)
    return parser


def _add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    d = ShardBenchConfig
    add = parser.add_argument
    add("--uds-path", default=d.uds_path, help="the shard's unix socket (launcher: PREFIX-0)")
    add(
        "--batch-size",
        type=int,
        nargs="+",
        default=list(d.batch_sizes),
        metavar="N",
        help="batch sizes, run in turn",
    )
    add("--prompt-length", type=int, default=d.prompt_length, metavar="N", help="prompt tokens")
    add("--decode-length", type=int, default=d.decode_length, metavar="N", help="tokens per run")
    add("--runs", type=int, default=d.runs, metavar="N", help="measured runs per batch size")
    add("--warmups", type=int, default=d.warmups, metavar="N", help="unmeasured runs before")
    add("--seed", type=int, default=d.seed, help="seed of the random prompt token ids")
    add("--json", action="store_true", help="print one JSON object instead of the table")


def _main_shard(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = ShardBenchConfig(
            uds_path=args.uds_path,
            batch_sizes=tuple(args.batch_size),
            prompt_length=args.prompt_length,
            decode_length=args.decode_length,
            runs=args.runs,
            warmups=args.warmups,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    info, summaries = run_shard_bench(config)
    if args.json:
        print(render_shard_json(config, info, summaries))
    else:
        print(render_shard_table(info, summaries))
    return 0


def _add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServingConfig
    add = parser.add_argument
    add("--url", default=d.url, help="server URL")
    add(
        "--api",
        choices=sorted(APIS),
        default=d.api,
        help="tgi: POST /generate_stream; openai: POST /v1/completions",
    )
    add("--model", default=d.model, help="model field of OpenAI requests")
    add(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(d.concurrency),
        metavar="N",
        help="concurrency levels, run in turn",
    )
    add(
        "--num-requests",
        type=int,
        default=d.num_requests,
        metavar="N",
        help="measured requests per level; None: 2 x concurrency, at least 4",
    )
    add(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        metavar="N",
        help="tokens generated per request (end of sequence ignored)",
    )
    add(
        "--prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        metavar="N",
        help="approximate prompt length, one word per token",
    )
    add("--seed", type=int, default=d.seed, help="seed of the prompts")
    add(
        "--warmup",
        type=int,
        default=d.warmup,
        metavar="N",
        help="unmeasured requests sent before each level",
    )
    add(
        "--timeout",
        type=float,
        default=d.timeout,
        metavar="SECONDS",
        help="how long an HTTP connect, read or write may wait",
    )
    add(
        "--request-rate",
        type=float,
        nargs="+",
        default=list(d.request_rates),
        metavar="R",
        help="open-loop levels: Poisson arrivals at R requests/s (replaces --concurrency)",
    )
    add(
        "--shared-prefix-tokens",
        type=int,
        default=d.shared_prefix_tokens,
        metavar="N",
        help="every prompt starts with the same N words (prefix caching)",
    )
    add(
        "--chat-turns",
        type=int,
        default=d.chat_turns,
        metavar="T",
        help="each of the concurrency's users sends T turns, every one with its whole history",
    )
    add(
        "--extra-body",
        default=d.extra_body,
        metavar="JSON",
        help="a JSON object merged into every request body, e.g. '{\"cache_prompt\": false}'",
    )
    add("--plot", metavar="PNG", help="write throughput and latency against load to PNG")
    add("--watermark", action="store_true", help="watermark every request (tgi api)")
    add("--json", action="store_true", help="print one JSON object instead of the table")


def main(argv: Sequence[str] | None = None) -> int:
    """Returns 1 when no measured request succeeded, else 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "shard":
        return _main_shard(parser, args)
    try:
        config = ServingConfig(
            url=args.url,
            api=args.api,
            model=args.model,
            concurrency=tuple(args.concurrency),
            num_requests=args.num_requests,
            max_new_tokens=args.max_new_tokens,
            prompt_tokens=args.prompt_tokens,
            seed=args.seed,
            warmup=args.warmup,
            timeout=args.timeout,
            watermark=args.watermark,
            request_rates=tuple(args.request_rate),
            plot=args.plot,
            shared_prefix_tokens=args.shared_prefix_tokens,
            chat_turns=args.chat_turns,
            extra_body=args.extra_body,
        )
    except ValueError as exc:
        parser.error(str(exc))
    summaries = asyncio.run(run_serving(config))
    print(render_json(config, summaries) if args.json else render_table(summaries))
    if config.plot:
        plot_levels(summaries, config.plot)
    return 0 if any(s.num_ok for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
