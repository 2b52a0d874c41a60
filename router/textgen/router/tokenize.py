"""Tokens of a text with their character spans, for TGI's `/tokenize`."""

from __future__ import annotations

from typing import Any


def token_spans(
    tokenizer: Any, text: str, add_special_tokens: bool = True
) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """Ids, the text each covers and its [start, stop) character offsets in `text`.

    A fast (Rust) tokenizer gives the offsets; otherwise, as TGI, every span is
    (0, 0) and the text is the token decoded on its own.
    """
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
        offsets = [(int(a), int(b)) for a, b in encoding["offset_mapping"]]
        return list(encoding["input_ids"]), [text[a:b] for a, b in offsets], offsets
    ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return ids, texts, [(0, 0)] * len(ids)
