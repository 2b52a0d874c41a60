"""best_of: the sequence TGI returns among several sampled for one request."""

from __future__ import annotations

from collections.abc import Sequence

from textgen.router.request import StreamEvent


def mean_logprob(events: Sequence[StreamEvent]) -> float:
    """TGI's score of a sequence: the mean log-probability of its generated tokens."""
    logprobs = [event.token.logprob for event in events]
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


def pick_best(sequences: Sequence[list[StreamEvent]]) -> int:
    """Index of the highest-scoring sequence; the first one wins a tie, as in TGI."""
    scores = [mean_logprob(events) for events in sequences]
    return scores.index(max(scores))
