"""Router logs: plain lines, or one JSON object per line with --json-output.

A JSON line carries timestamp, level, target (the logger), message, the fields the call
passed (`extra={"fields": {...}}`, e.g. request_id and timings) and, inside a traced
request, the trace and span ids, so logs and traces join. Every admitted request is
logged once when its handler lets go of it (TGI's "Success" line, with its timings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from opentelemetry import trace

from textgen.router.errors import OverloadedError, RouterError
from textgen.router.request import Entry

logger = logging.getLogger("textgen.router.infer")


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", {}))
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        fields["trace_id"] = trace.format_trace_id(context.trace_id)
        fields["span_id"] = trace.format_span_id(context.span_id)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {key}={value}" for key, value in _fields(record).items())
        line = f"{_timestamp(record)} {record.levelname:>5} {record.name}: {record.getMessage()}"
        line += fields
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else PlainFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


OVERLOAD_LOG_INTERVAL_S = 10.0


class _OverloadLog:
    """429s logged once per interval with their count: a flood is one line per interval.

    The first refusal after a quiet interval is logged at once; those that follow
    within OVERLOAD_LOG_INTERVAL_S are counted and logged together when it ends.
    """

    def __init__(self) -> None:
        self._pending = 0
        self._flush: asyncio.TimerHandle | None = None

    def refused(self) -> None:
        if self._flush is not None:
            self._pending += 1
            return
        logger.warning("Overloaded: refusing requests with 429 (max_concurrent_requests reached)")
        self._flush = asyncio.get_running_loop().call_later(OVERLOAD_LOG_INTERVAL_S, self._report)

    def _report(self) -> None:
        count, self._pending = self._pending, 0
        if not count:
            self._flush = None
            return
        logger.warning(
            "Overloaded: refused %d more request(s) with 429 in the last %.0f s",
            count,
            OVERLOAD_LOG_INTERVAL_S,
        )
        self._flush = asyncio.get_running_loop().call_later(OVERLOAD_LOG_INTERVAL_S, self._report)


_overload_log = _OverloadLog()


def log_rejection(error: RouterError) -> None:
    """A request turned away before it was queued.

    A client's mistake is logged at INFO (the client got the message); overload
    is summarised per interval, so that a flood does not become a log flood.
    """
    if isinstance(error, OverloadedError):
        _overload_log.refused()
    else:
        logger.info("Refused: %s", error, extra={"fields": {"error_type": error.error_type}})


def log_completion(entry: Entry) -> None:
    """The request's one line, with its timings in seconds (TGI's "Success" span fields)."""
    t = entry.timings
    fields: dict[str, Any] = {
        "request_id": entry.id,
        "input_length": entry.request.input_len,
        "generated_tokens": entry.num_generated,
    }
    if entry.cancelled:
        # NOTE: counted in tgi_request_failure{err="dropped"}; a disconnect storm stays quiet.
        logger.debug("Dropped before it finished", extra={"fields": fields})
    elif not t.finished:
        logger.error("Failed during generation", extra={"fields": fields})
    else:
        logger.info("Success", extra={"fields": {**fields, **_timings(entry)}})


def _timings(entry: Entry) -> dict[str, float | int | None]:
    t = entry.timings
    inference = t.finished - t.batched
    sampling = entry.request.sampling
    return {
        "total_time": round(t.finished - t.received, 6),
        "validation_time": round(t.queued - t.received, 6),
        "queue_time": round(t.batched - t.queued, 6),
        "inference_time": round(inference, 6),
        "time_per_token": round(inference / max(entry.num_generated, 1), 6),
        "time_to_first_token": round(t.first_token - t.received, 6),
        "seed": sampling.seed if sampling.do_sample else None,
    }
