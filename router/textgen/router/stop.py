"""Stop sequences, matched on decoded text across token boundaries.

Only the last `longest stop - 1` characters of earlier text can take part in a
new match, so the matcher keeps that tail and the cost per token does not grow
with the length of the output.
"""

from __future__ import annotations


class StopSequenceMatcher:
    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""

    def feed(self, text: str) -> str | None:
        """Add newly decoded text; return the stop sequence it completes, if any."""
        match = self.match(text)
        return None if match is None else match[0]

    def match(self, text: str) -> tuple[str, int] | None:
        """Add newly decoded text; return the stop it completes first and how many of
        `text`'s characters lie past the end of that stop."""
        if not self._stops or not text:
            return None
        # NOTE: a match lying wholly in the old tail would have ended the request already.
        window = self._tail + text
        self._tail = window[-self._keep :] if self._keep else ""
        ends = [(window.find(stop) + len(stop), stop) for stop in self._stops if stop in window]
        if not ends:
            return None
        end, stop = min(ends)
        return stop, len(window) - end
