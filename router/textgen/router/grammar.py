"""Grammar guidance: compile a grammar once, keep a matcher per request, send its token mask.

Design note. The engine is llguidance (benchmark/scripts/grammar_engines.py
measured it against xgrammar on this tokenizer: ~1 ms to compile a 20-optional-
property or an 8-level nested schema against xgrammar's 80-180 ms, and a
per-token mask of 30-70 us against 17-41 us). Its masks are computed lazily
per step, so there is no expensive ahead-of-time compile to stall anything.

Compilation happens during validation, before the request is enqueued, on a
dedicated thread pool with a time budget: a request whose grammar is still
compiling is not in the queue yet, so it holds back neither the batching loop
nor the requests behind it. Compiled grammars are kept in an LRU cache keyed
by (kind, value); a request gets a copy of the cached matcher. After every
step the request's matcher accepts the sampled token; before the next step it
writes the allowed-token bitmask the shard applies to the logits. EOS is in
the mask exactly when the grammar accepts.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance
import llguidance.torch

from textgen.proto import generate_pb2 as pb
from textgen.router.errors import ValidationError

GrammarKind = Literal["json", "regex"]
_LISTING = re.compile(r"^\s*\d+ \|")


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar as the client gave it, canonicalised: the cache key."""

    kind: GrammarKind
    value: str
    """The regex, or the JSON schema serialised compactly."""

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        # NOTE: keys keep their order: the output's properties follow the schema's.
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", pattern)


@dataclass(frozen=True)
class GrammarConfig:
    compile_timeout_s: float = 5.0
    """A grammar not compiled within this time is refused (it stays cached once done)."""
    max_grammar_bytes: int = 256 * 1024
    """Largest schema (serialised) or regex accepted."""
    max_grammar_symbols: int = 100_000
    """llguidance's grammar size limit (symbols in the productions)."""
    cache_size: int = 256
    num_threads: int = 2


class GrammarError(ValidationError):
    def __init__(self, message: str) -> None:
        super().__init__(f"Input validation error: grammar is not valid: {message}")


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled grammar: a matcher at the start, copied for every sequence that uses it."""

    spec: GrammarSpec
    template: llguidance.LLMatcher = field(repr=False, compare=False)

    def new_guide(self) -> Guide:
        return Guide(self.template.deep_copy())


class Guide:
    """One request's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar did not allow it."""
        return self.matcher.consume_token(token_id)

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    @property
    def finished(self) -> bool:
        """The grammar has ended: it accepts nothing more (its mask allows only EOS)."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammars off the event loop, within budget, and caches them."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, config: GrammarConfig) -> None:
        self._tokenizer = tokenizer
        self._config = config
        self._limits = llguidance.LLParserLimits(max_grammar_size=config.max_grammar_symbols)
        self._executor = ThreadPoolExecutor(config.num_threads, "textgen-grammar")
        self._mask_executor = llguidance.LLExecutor(config.num_threads)
        self._cache: OrderedDict[GrammarSpec, asyncio.Future[llguidance.LLMatcher]] = OrderedDict()

    @classmethod
    def from_hf(
        cls, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], config: GrammarConfig
    ) -> GrammarCompiler:
        """Wrap a fast Hugging Face tokenizer (about a second: do it once, at start-up)."""
        import llguidance.hf

        tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, vocab_size, sorted(eos_token_ids))
        return cls(tokenizer, config)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    async def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """`spec` compiled (or from the cache); GrammarError (422) if invalid or over budget."""
        future = self._cached(spec)
        try:
            template = await asyncio.wait_for(
                asyncio.shield(future), self._config.compile_timeout_s
            )
        except TimeoutError:
            raise GrammarError(
                f"compiling the {spec.kind} grammar took longer than the budget of "
                f"{self._config.compile_timeout_s:g}s"
            ) from None
        return CompiledGrammar(spec, template)

    def _cached(self, spec: GrammarSpec) -> asyncio.Future[llguidance.LLMatcher]:
        future = self._cache.get(spec)
        if future is not None:
            self._cache.move_to_end(spec)
            return future
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._compile, spec)
        self._cache[spec] = future
        if len(self._cache) > self._config.cache_size:
            self._cache.popitem(last=False)
        return future

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """Runs on the grammar threads; llguidance drops the GIL while it builds the grammar."""
        if len(spec.value.encode()) > self._config.max_grammar_bytes:
            raise GrammarError(
                f"the {spec.kind} grammar is {len(spec.value.encode())} bytes, over the "
                f"budget of {self._config.max_grammar_bytes}"
            )
        if spec.kind == "json":
            schema = json.loads(spec.value)
            try:
                check_ref_cycles(schema)
            except RecursionError:
                raise GrammarError("invalid json: `$ref` chains nest too deeply") from None
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
        else:
            at = stacked_quantifier(spec.value)
            if at is not None:
                raise GrammarError(
                    f"invalid regex: the quantifier {spec.value[at]!r} at position {at} follows "
                    "another quantifier (a multiple repeat); group the inner one: (?:x*)*"
                )
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.value)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error(), spec))
        return matcher

    def token_masks(self, guides: Sequence[tuple[int, Guide]]) -> list[pb.TokenMask]:
        """Each request's allowed next tokens, computed in parallel off the GIL."""
        if not guides:
            return []
        bitmask = llguidance.torch.allocate_token_bitmask(len(guides), self.vocab_size)
        matchers = [(guide.matcher, row) for row, (_, guide) in enumerate(guides)]
        llguidance.torch.fill_next_token_bitmask_par(self._mask_executor, matchers, bitmask)
        return [
            pb.TokenMask(request_id=request_id, bitmask=bitmask[row].numpy().tobytes())
            for row, (request_id, _) in enumerate(guides)
        ]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _first_line(error: str, spec: GrammarSpec) -> str:
    """llguidance's error on one line, without the carets and grammar listing of regex errors."""
    kept = [
        line.strip()
        for line in error.splitlines()
        if line.strip() and not line.strip().startswith("^") and not _LISTING.match(line)
    ]
    return f"invalid {spec.kind}: {' '.join(kept)}"


_COUNTED = re.compile(r"\{(?:\d+(?:,\d*)?|,\d+)\}")


def stacked_quantifier(pattern: str) -> int | None:
    """Where a quantifier follows another one (`a**`, `a+*`, `a{2}+`), else None.

    Python's re, PCRE and JavaScript refuse such a "multiple repeat" as an error;
    llguidance would read it as a nested repetition. textgen refuses it, so a
    pattern means the same here as in the client's own regex engine. A single `?` after a
    quantifier (lazy: `a*?`) is allowed. Escapes and character classes are skipped.
    """
    i, previous = 0, ""  # previous: "" (an atom), "quantifier" or "lazy"
    while i < len(pattern):
        char = pattern[i]
        counted = _COUNTED.match(pattern, i) if char == "{" else None
        if char == "\\":
            i, previous = i + 2, ""
        elif char == "[":
            i, previous = _class_end(pattern, i), ""
        elif char in "*+?" or counted:
            if previous == "quantifier" and char == "?":
                previous = "lazy"
            elif previous:
                return i
            else:
                previous = "quantifier"
            i = counted.end() if counted else i + 1
        else:
            i, previous = i + 1, ""
    return None


def _class_end(pattern: str, start: int) -> int:
    """The index after the `]` closing the character class that opens at `start`."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):  # a `]` first in a class is literal
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def check_ref_cycles(schema: Any) -> None:
    """Refuse `$ref` chains that loop without consuming input (a -> b -> a).

    Recursion through `properties` or `items` is a legitimate recursive schema
    (a tree) and is allowed; a cycle through `$ref`, `allOf`, `anyOf` and
    `oneOf` alone never produces a character.
    """
    if not isinstance(schema, dict):
        return
    state: dict[str, int] = {}  # pointer -> 1 visiting, 2 done

    def visit(node: Any, pointer: str, path: list[str]) -> None:
        if not isinstance(node, dict):
            return
        if state.get(pointer) == 2:
            return
        if state.get(pointer) == 1:
            cycle = [*path[path.index(pointer) :], pointer]
            raise GrammarError(f"invalid json: `$ref` cycle {' -> '.join(cycle)}")
        state[pointer] = 1
        for child, child_pointer in _unguarded_children(schema, node, pointer):
            visit(child, child_pointer, [*path, pointer])
        state[pointer] = 2

    visit(schema, "#", [])
    for name, definition in _definitions(schema):
        visit(definition, name, [])


def _unguarded_children(root: dict, node: dict, pointer: str) -> list[tuple[Any, str]]:
    children = []
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        children.append((_resolve(root, ref), ref))
    for keyword in ("allOf", "anyOf", "oneOf"):
        members = node.get(keyword)
        if isinstance(members, list):
            children += [(m, f"{pointer}/{keyword}/{i}") for i, m in enumerate(members)]
    return children


def _definitions(schema: dict) -> list[tuple[str, Any]]:
    found = []
    for keyword in ("$defs", "definitions"):
        defs = schema.get(keyword)
        if isinstance(defs, dict):
            found += [(f"#/{keyword}/{name}", value) for name, value in defs.items()]
    return found


def _resolve(root: dict, ref: str) -> Any:
    node: Any = root
    for part in ref.lstrip("#").strip("/").split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None  # llguidance names the missing pointer
        node = node[part]
    return node
