"""The front half of the router: admission, validation and the event stream of a request."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from textgen.router.errors import OverloadedError, RouterError
from textgen.router.generate_request import GenerateRequest, parse_request
from textgen.router.queue import Queue
from textgen.router.request import Entry, StreamEvent, TokenizerInfo, ValidRequest
from textgen.router.validation import Validation, random_seed

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
    def validation(self) -> Validation:
        return self._validation

    @property
    def tokenizer(self) -> Any:
        return self._info.tokenizer

    async def submit(self, body: Any) -> Entry:
        """Validate and enqueue a request; the caller must `finish` the entry it gets."""
        return (await self.submit_all(body))[0]

    async def submit_all(self, body: GenerateRequest | Any, stream: bool = False) -> list[Entry]:
        """Validate and enqueue a request as `best_of` sequences (one unless best_of > 1).

        Each sequence takes an admission slot, as each of TGI's best_of generations
        takes a permit; the caller must `finish` every entry it gets.
        """
        received = time.monotonic()
        request = body if isinstance(body, GenerateRequest) else parse_request(body)
        num_sequences = self._validation.check_best_of(request, stream)
        if self.num_in_flight + num_sequences > self._max_concurrent:
            raise OverloadedError()
        self.num_in_flight += num_sequences
        try:
            valid = await self._validation.validate(request)
        except BaseException:
            self.num_in_flight -= num_sequences
            raise
        entries = [self._enqueue(_with_own_seed(valid, i), received) for i in range(num_sequences)]
        return entries

    def _enqueue(self, request: ValidRequest, received: float) -> Entry:
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


def _with_own_seed(request: ValidRequest, index: int) -> ValidRequest:
    """best_of sequences differ by their seeds (validation forbids a given one)."""
    if index == 0:
        return request
    return dataclasses.replace(
        request, sampling=dataclasses.replace(request.sampling, seed=random_seed())
    )


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
