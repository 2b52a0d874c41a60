"""Incremental detokenization, UTF-8 safe.

Decoding one token at a time is wrong for byte-level BPE (a character can span
tokens) and for SentencePiece (a token's leading space depends on its left
neighbour). So each step decodes a short window that starts a few tokens back
(`prefix_offset`) and emits only what the new token added past `read_offset`;
while the window ends in an incomplete character (U+FFFD), nothing is emitted
and the text is released by a later token. The work per token is constant.
"""

from __future__ import annotations

from typing import Protocol

# Tokens of left context decoded with each step, enough to settle spacing.
_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        # Seed the window with the end of the prompt so the first token's spacing is right.
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False
        )
        new_text = self._tokenizer.decode(window, skip_special_tokens=False)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._trim()
        return new_text[len(prefix_text) :]

    def _trim(self) -> None:
        # Keep the buffer short: everything before prefix_offset is settled text.
        if self._prefix_offset > 4 * _CONTEXT_TOKENS:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
