"""Small fakes for router unit tests: a character tokenizer and an in-memory shard."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import llguidance

from textgen.proto import generate_pb2 as pb
from textgen.router.client import StepResult
from textgen.router.grammar import GrammarCompiler, GrammarConfig
from textgen.router.request import TokenizerInfo

EOS = 0


class CharTokenizer:
    """One token per character; id 0 is EOS."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if i == EOS else chr(i) for i in ids)


def tokenizer_info() -> TokenizerInfo:
    return TokenizerInfo(CharTokenizer(), frozenset({EOS}), frozenset({EOS}))


class ChatCharTokenizer(CharTokenizer):
    """A character tokenizer whose "chat template" joins the message contents."""

    def __init__(self, chat_template: str | None = "{{ contents }}") -> None:
        self.chat_template = chat_template

    def __len__(self) -> int:
        return 128  # ASCII

    def apply_chat_template(self, conversation, tools=None, **kwargs):
        assert kwargs == {"add_generation_prompt": True, "tokenize": False}
        return "".join(message["content"] for message in conversation)


def chat_tokenizer_info() -> TokenizerInfo:
    return TokenizerInfo(ChatCharTokenizer(), frozenset({EOS}), frozenset({EOS}))


VOCAB_SIZE = 128


def grammar_compiler(config: GrammarConfig | None = None) -> GrammarCompiler:
    """The real grammar engine over CharTokenizer's vocabulary (ASCII, id 0 is EOS)."""
    wrapper = llguidance.TokenizerWrapper(_ByteTokenizer())
    tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=VOCAB_SIZE)
    return GrammarCompiler(tokenizer, config or GrammarConfig())


class _ByteTokenizer:
    """What llguidance reads of a tokenizer: CharTokenizer's ids as bytes."""

    eos_token_id = EOS
    bos_token_id = None
    tokens = [b"<eos>"] + [bytes([i]) for i in range(1, VOCAB_SIZE)]
    special_token_ids = [EOS]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


@dataclass
class FakeShard:
    """Replays a script per request: the characters of `replies[first prompt char]`, then EOS.

    It keeps TGI's batch semantics (prefill creates a batch, a prefill with a cached
    batch takes it in, decode concatenates, filter keeps ids) and records every
    call, so tests can check who ran with whom.
    `gate`, when set, makes each decode wait until the test releases it. A request
    with a token mask gets its scripted token if the mask allows it, else the
    lowest allowed one (as a real shard's -inf mask would force); `masks` records
    each step's masks by request id.
    """

    replies: dict[str, str]
    calls: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    batches: dict[int, list[int]] = field(default_factory=dict)
    progress: dict[int, int] = field(default_factory=dict)
    scripts: dict[int, str] = field(default_factory=dict)
    gate: asyncio.Semaphore | None = None
    gate_mixed: bool = False  # mixed steps wait on the gate too
    fail_next_decode: bool = False
    fail_next_mixed: bool = False
    crash_next_decode: bool = False  # raise a plain exception, as a bug would
    masks: list[dict[int, bytes]] = field(default_factory=list)
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    """(request id, cache_len, tokens computed) of every prompt a prefill computed."""
    prefilled: dict[int, int] = field(default_factory=dict)
    block_size: int = 4
    kv: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """What each KV slot holds, as a real cache would: the tokens up to its position. A
    prefill that starts past position 0 (a later chunk, or a prefix-cache hit) checks that
    every slot it reads holds its own prompt's tokens: a wrong shared block fails here."""
    sequences: dict[int, tuple[tuple[int, ...], list[int]]] = field(default_factory=dict)
    """Request id -> its blocks and tokens (prompt, then those generated)."""

    async def prefill(
        self,
        batch: pb.Batch,
        token_masks: Sequence[pb.TokenMask] = (),
        cached_batch: pb.CachedBatch | None = None,
    ) -> StepResult:
        """A plain prefill records ("prefill", new ids); a mixed step ("mixed", all ids).

        A request given a leading chunk of its prompt (chunk_len) computes it, then yields
        nothing and stays out of the batch, as a real shard does; its next chunk must
        start where this one ended.
        """
        if self.gate_mixed and cached_batch is not None:
            await self.gate.acquire()
        complete = []
        for request in batch.requests:
            if request.id in self.prefilled:  # else a first chunk, maybe after a cached prefix
                assert request.cache_len == self.prefilled[request.id], "chunks out of order"
            assert request.cache_len < len(request.input_ids), "a prompt token must be computed"
            tokens = list(request.input_ids)
            for position in range(request.cache_len):
                held = self.kv.get(self._slot(request.blocks, position))
                assert held == tuple(tokens[: position + 1]), f"request {request.id} read a slot"
            end = len(request.input_ids)
            if request.chunk_len:
                end = min(end, request.cache_len + request.chunk_len)
            for position in range(request.cache_len, end):
                self.kv[self._slot(request.blocks, position)] = tuple(tokens[: position + 1])
            self.sequences[request.id] = (tuple(request.blocks), tokens)
            self.chunks.append((request.id, request.cache_len, end - request.cache_len))
            self.prefilled[request.id] = end
            if end == len(request.input_ids):
                complete.append(request)
        ids = [r.id for r in batch.requests]
        if cached_batch is None:
            self.calls.append(("prefill", tuple(ids)))
        else:
            self._feed(self.batches[cached_batch.id])
            ids = self.batches[cached_batch.id] + ids
            self.calls.append(("mixed", tuple(ids)))
            if self.fail_next_mixed:
                self.fail_next_mixed = False
                raise rpc_error("shard exploded mid-mix")
            del self.batches[cached_batch.id]
        for request in complete:
            self.scripts[request.id] = self.replies[chr(request.input_ids[0])]
            self.progress[request.id] = 0
        partial = {r.id for r in batch.requests} - {r.id for r in complete}
        ids = [i for i in ids if i not in partial]
        if not ids:
            return StepResult([], None, 0, 0)
        self.batches[batch.id] = ids
        return self._step(batch.id, ids, token_masks)

    async def decode(
        self, batches: list[pb.CachedBatch], token_masks: Sequence[pb.TokenMask] = ()
    ) -> StepResult:
        if self.gate is not None:
            await self.gate.acquire()
        ids = [i for b in batches for i in self.batches.pop(b.id)]
        self.calls.append(("decode", tuple(ids)))
        self._feed(ids)
        if self.fail_next_decode:
            self.fail_next_decode = False
            raise rpc_error("shard exploded")
        if self.crash_next_decode:
            self.crash_next_decode = False
            raise RuntimeError("a bug in the step")
        self.batches[batches[0].id] = ids
        return self._step(batches[0].id, ids, token_masks)

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch | None:
        self.calls.append(("filter", tuple(request_ids)))
        if not request_ids:
            del self.batches[batch_id]
            return None
        self.batches[batch_id] = [i for i in self.batches[batch_id] if i in request_ids]
        return self._cached(batch_id)

    async def health(self) -> None:
        """Always healthy (the router asks only when no step succeeded lately)."""

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(("clear", () if batch_id is None else (batch_id,)))
        self.batches.pop(batch_id, None)

    def _step(
        self, batch_id: int, ids: list[int], token_masks: Sequence[pb.TokenMask]
    ) -> StepResult:
        masks = {mask.request_id: mask.bitmask for mask in token_masks}
        self.masks.append(masks)
        generations = []
        for request_id in ids:
            script, n = self.scripts[request_id], self.progress[request_id]
            token = ord(script[n]) if n < len(script) else EOS
            if request_id in masks:
                token = _allowed(token, masks[request_id])
            self.progress[request_id] = n + 1
            self.sequences[request_id][1].append(token)
            generations.append(
                pb.Generation(request_id=request_id, tokens=pb.Tokens(ids=[token], logprobs=[-0.5]))
            )
        return StepResult(generations, self._cached(batch_id), 0, 0)

    def _feed(self, ids: list[int]) -> None:
        """A decode step writes the KV of each request's last token, at its position."""
        for request_id in ids:
            blocks, tokens = self.sequences[request_id]
            self.kv[self._slot(blocks, len(tokens) - 1)] = tuple(tokens)

    def _slot(self, blocks: Sequence[int], position: int) -> int:
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def _cached(self, batch_id: int) -> pb.CachedBatch:
        ids = self.batches[batch_id]
        return pb.CachedBatch(id=batch_id, request_ids=ids, size=len(ids))


def allowed_tokens(bitmask: bytes) -> list[int]:
    """The token ids a packed little-endian int32 bitmask allows."""
    return [t for t in range(len(bitmask) * 8) if bitmask[t // 8] >> (t % 8) & 1]


def _allowed(token: int, bitmask: bytes) -> int:
    allowed = allowed_tokens(bitmask)
    return token if token in allowed else allowed[0]


def rpc_error(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )
