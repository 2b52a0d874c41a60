"""`textgen-launcher`: resolve the model, start the shards and the router, supervise."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

from textgen.launcher.commands import TextgenCommands
from textgen.launcher.config import (
    ConfigError,
    LauncherConfig,
    TokenLimits,
    add_arguments,
    read_context_length,
)
from textgen.launcher.log import setup_logging
from textgen.launcher.model import (
    DEFAULT_MODEL_ID,
    ModelConversionError,
    ModelError,
    resolve_model,
)
from textgen.launcher.parallel import free_port, threads_per_shard
from textgen.launcher.supervisor import Supervisor, SupervisorConfig
from textgen.router.config import API_KEY_ENV

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
ROUTER_EXIT_MARGIN_S = 30.0
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen-launcher",
        description="Serve a text-generation model: one gRPC shard per device and an HTTP router.",
    )
    add_arguments(parser)
    return parser


def prepare(config: LauncherConfig) -> TextgenCommands:
    """Resolve the model and settle every setting that depends on it."""
    model_dir = resolve_model(config.model_id, config.revision, config.cache_dir)
    logger.info("Model directory %s", model_dir)
    limits = TokenLimits.derive(config, read_context_length(model_dir))
    return TextgenCommands(
        config=config,
        model_dir=model_dir,
        model_name=config.model_id or DEFAULT_MODEL_ID,
        limits=limits,
        # NOTE: "auto" leaves the choice to each shard's platform (it knows its device).
        dtype=config.dtype or "auto",
        master_port=config.master_port or free_port(config.master_addr),
        num_threads=threads_per_shard(config.num_shard),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.json_output)
    try:
        config = LauncherConfig.from_args(args)
        with _sigterm_as_interrupt():
            commands = prepare(config)
    except ModelConversionError as err:
        return _fail(err, 1)
    except (ConfigError, ModelError) as err:
        return _fail(err, EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    if config.api_key is not None:
        # NOTE: the router reads its key from the environment it inherits, not from its argv,
        # which every user of the machine can read.
        os.environ[API_KEY_ENV] = config.api_key.strip()
    supervisor_config = SupervisorConfig(
        config.num_shard,
        config.shard_uds_path,
        # The router drains for up to the grace period, then ends what is left and exits.
        router_stop_timeout_s=config.graceful_termination_timeout + ROUTER_EXIT_MARGIN_S,
    )
    return Supervisor(supervisor_config, commands).run()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM during a conversion unwinds like Ctrl-C, so the temporary dir is removed."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(err: object, code: int) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
