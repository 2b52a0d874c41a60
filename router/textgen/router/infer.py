"""The front half of the router: admission, validation and the event stream of a request."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from textgen.router.errors import OverloadedError, RouterError
from textgen.router.queue import Queue
from textgen.router.request import Entry, StreamEvent, TokenizerInfo
from textgen.router.validation import Validation

logger = logging.getLogger("textgen.router.infer")


class Infer:
    def __init__(
        self,
        validation: Validation,
        queue: Queue,
        info: TokenizerInfo,
        max_concurrent_requests: int,
    ) -> None:
        self._validation = validation
        self._queue = queue
        self._info = info
        self._max_concurrent = max_concurrent_requests
        self._request_ids = itertools.count()
        self.num_in_flight = 0

    @property
    def tokenizer_info(self) -> TokenizerInfo:
        return self._info

    async def submit(self, body: Any, logit_bias: tuple[tuple[int, float], ...] = ()) -> Entry:
        """Validate and enqueue a request; the caller must `finish` the entry it gets.

        `logit_bias` (checked by the caller) is what a TGI body cannot say.
        """
        if self.num_in_flight >= self._max_concurrent:
            raise OverloadedError()
        self.num_in_flight += 1
        try:
            received = time.monotonic()
            request = await self._validation.validate(body)
            if logit_bias:
                request = dataclasses.replace(request, logit_bias=logit_bias)
        except BaseException:
            self.num_in_flight -= 1
            raise
        entry = Entry(next(self._request_ids), request, self._info)
        entry.timings.received = received
        self._queue.append(entry)
        return entry

    def finish(self, entry: Entry) -> None:
        """Release the request's admission slot; cancel it if it is still running."""
        self.num_in_flight -= 1
        if not entry.finished:
            entry.cancel()
        _log_completion(entry)

    async def events(self, entry: Entry) -> AsyncIterator[StreamEvent]:
        """The request's token events, ending with the one that carries its ending."""
        while True:
            event = await entry.events.get()
            if isinstance(event, RouterError):
                raise event
            yield event
            if event.ending is not None:
                return


def _log_completion(entry: Entry) -> None:
    t = entry.timings
    if entry.cancelled:
        logger.info("request %d cancelled after %d tokens", entry.id, entry.num_generated)
        return
    if not t.finished:
        return
    logger.info(
        "request %d done: input_length=%d generated_tokens=%d "
        "queue_time=%.1fms time_to_first_token=%.1fms total_time=%.1fms",
        entry.id,
        entry.request.input_len,
        entry.num_generated,
        1000 * (t.batched - t.queued),
        1000 * (t.first_token - t.received),
        1000 * (t.finished - t.received),
    )
