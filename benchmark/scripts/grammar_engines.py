"""xgrammar vs llguidance on the default model's tokenizer: compile time and per-token mask cost.

    python benchmark/scripts/grammar_engines.py [--model-dir DIR]

Two schemas: 20 optional properties (TGI issue #3173's slow case) and an
8-level nested one. Compile: fresh compiler, no cache, median of 3. Mask: walk
the tokens of a valid instance, filling the next-token bitmask before each
token and accepting it after; the mean fill time per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NUM_OPTIONAL = 20
NESTED_DEPTH = 8


def wide_schema() -> dict[str, Any]:
    kinds = [
        {"type": "string", "maxLength": 40},
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        {"enum": ["red", "green", "blue"]},
    ]
    properties = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(NUM_OPTIONAL)}
    return {"type": "object", "properties": properties, "additionalProperties": False}


def nested_schema(depth: int = NESTED_DEPTH) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"leaf": {"type": "string", "maxLength": 20}},
        "required": ["leaf"],
    }
    for _ in range(depth):
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "child": schema,
                "alternatives": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
            "required": ["name", "child"],
        }
    return schema


def wide_instance() -> dict[str, Any]:
    return {"field_00": "hello", "field_01": 42, "field_05": "green", "field_19": 7}


def nested_instance(depth: int = NESTED_DEPTH) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": "end"}
    for level in range(depth):
        value = {"name": f"level{level}", "tags": ["a"], "score": 0.5, "child": value}
    return value


class Engine:
    name = ""

    def compile(self, schema: str) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None: ...
    def accept(self, matcher: Any, token: int) -> bool: ...


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=eos
        )

    def compile(self, schema: str) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, vocab_size, eos)

    def compile(self, schema: str) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)


def median_ms(work: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def mask_us(engine: Engine, compiled: Any, tokens: list[int], vocab_size: int) -> float:
    matcher = engine.matcher(compiled)
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    elapsed = 0.0
    for token in tokens:
        start = time.perf_counter()
        engine.fill(matcher, bitmask)
        elapsed += time.perf_counter() - start
        allowed = bool((bitmask[0, token // 32] >> (token % 32)) & 1)
        assert allowed and engine.accept(matcher, token), f"{engine.name} refused {token}"
    return elapsed / len(tokens) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from textgen.launcher.model import resolve_model

    model_dir = args.model_dir or str(resolve_model(None))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = json.loads(Path(model_dir, "config.json").read_text())["vocab_size"]
    eos = [tokenizer.eos_token_id]
    cases = {
        "20 optional properties": (wide_schema(), wide_instance()),
        f"nested depth {NESTED_DEPTH}": (nested_schema(), nested_instance()),
    }
    print(f"vocab {vocab_size}; torch threads {torch.get_num_threads()}")
    for engine_class in (XGrammar, LLGuidance):
        start = time.perf_counter()
        engine = engine_class(tokenizer, vocab_size, eos)
        setup_ms = (time.perf_counter() - start) * 1e3
        print(f"{engine.name}: tokenizer setup {setup_ms:.0f} ms")
        for label, (schema, instance) in cases.items():
            text = json.dumps(schema)
            compile_ms = median_ms(lambda: engine.compile(text))  # noqa: B023
            tokens = tokenizer.encode(json.dumps(instance, separators=(",", ":")))
            per_token = mask_us(engine, engine.compile(text), tokens, vocab_size)
            print(
                f"  {label:24s} compile {compile_ms:8.1f} ms   mask {per_token:7.1f} us/token "
                f"({len(tokens)} tokens)"
            )


if __name__ == "__main__":
    main()
