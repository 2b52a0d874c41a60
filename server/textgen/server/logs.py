"""Shard logs on stderr (the launcher passes them through): plain lines naming the rank,
or one JSON object per line with --json-output."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JsonFormatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self._rank = rank

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
            "rank": self._rank,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(rank: int, json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(JsonFormatter(rank))
    else:
        plain = f"%(asctime)s %(levelname)s shard {rank} %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(plain))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
