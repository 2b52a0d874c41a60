"""The front half of the router: admission, validation and the event stream of a request."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from textgen.router.errors import OverloadedError, RouterError, ValidationError
from textgen.router.generate_request import GenerateRequest, parse_request
from textgen.router.logs import log_completion, log_rejection
from textgen.router.queue import Queue
from textgen.router.request import Entry, StreamEvent, TokenizerInfo, ValidRequest
from textgen.router.telemetry import RouterMetrics
from textgen.router.tracing import RouterTracing
from textgen.router.validation import Validation, random_seed


class Infer:
    def __init__(
        self,
        validation: Validation,
        queue: Queue,
        info: TokenizerInfo,
        max_concurrent_requests: int,
        metrics: RouterMetrics | None = None,
        tracing: RouterTracing | None = None,
    ) -> None:
        self._validation = validation
        self._queue = queue
        self._info = info
        self._max_concurrent = max_concurrent_requests
        self._request_ids = itertools.count()
        self.num_in_flight = 0
        self._admitted: set[Entry] = set()
        self._metrics = metrics or RouterMetrics.standalone()
        self._tracing = tracing or RouterTracing.disabled()

    @property
    def validation(self) -> Validation:
        return self._validation

    @property
    def tokenizer(self) -> Any:
        return self._info.tokenizer

    @property
    def tokenizer_info(self) -> TokenizerInfo:
        return self._info

    async def submit(self, body: Any, logit_bias: tuple[tuple[int, float], ...] = ()) -> Entry:
        """Validate and enqueue a request; the caller must `finish` the entry it gets.

        `logit_bias` (checked by the caller) is what a TGI body cannot say.
        """
        return (await self.submit_all(body, logit_bias=logit_bias))[0]

    async def submit_all(
        self,
        body: GenerateRequest | Any,
        stream: bool = False,
        logit_bias: tuple[tuple[int, float], ...] = (),
    ) -> list[Entry]:
        """Validate and enqueue a request as `best_of` sequences (one unless best_of > 1).

        Each sequence takes an admission slot, as each of TGI's best_of generations
        takes a permit; the caller must `finish` every entry it gets.
        """
        self._metrics.request_received()
        received = time.monotonic()
        try:
            request = body if isinstance(body, GenerateRequest) else parse_request(body)
            num_sequences = self._validation.check_best_of(request, stream)
        except ValidationError as error:
            self._reject(error, "validation")
        if self.num_in_flight + num_sequences > self._max_concurrent:
            self._reject(OverloadedError(), "overloaded")
        self.num_in_flight += num_sequences
        try:
            with self._tracing.span("validation"):
                valid = await self._validation.validate(request)
            if logit_bias:
                valid = dataclasses.replace(valid, logit_bias=logit_bias)
        except ValidationError as error:
            self.num_in_flight -= num_sequences
            self._reject(error, "validation")
        except BaseException:
            self.num_in_flight -= num_sequences
            raise
        self._metrics.request_validated(valid)
        return [self._enqueue(_with_own_seed(valid, i), received) for i in range(num_sequences)]

    def _enqueue(self, request: ValidRequest, received: float) -> Entry:
        entry = Entry(next(self._request_ids), request, self._info)
        entry.timings.received = received
        self._tracing.adopt(entry)
        self._queue.append(entry)
        self._admitted.add(entry)
        return entry

    def finish(self, entry: Entry) -> None:
        """Release the request's admission slot; cancel it if it is still running."""
        self.num_in_flight -= 1
        self._admitted.discard(entry)
        if not entry.finished:
            entry.cancel()
        self._metrics.request_finished(entry)
        self._tracing.request_finished(entry)
        log_completion(entry)

    def abort_all(self, error: RouterError) -> int:
        """End every admitted request still running with `error` (the server is stopping);
        returns how many. Their handlers answer with it and `finish` them as usual."""
        running = [entry for entry in self._admitted if not entry.done]
        for entry in running:
            entry.cancel(error)
        return len(running)

    def _reject(self, error: RouterError, reason: str) -> NoReturn:
        self._metrics.request_rejected(reason)
        log_rejection(error)
        raise error

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
