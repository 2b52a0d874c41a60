"""The shard's state of a batch between steps.

A batch is an ordered list of request states. Prefill creates it, Decode
concatenates batches and advances every request by one token, FilterBatch
keeps a subset. The order is the order of the generations returned.

    token_ids:  [ prompt ............ | generated ... | last ]
    num_cached: KV entries in the cache = every token but the last sampled one
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from textgen.proto import generate_pb2
from textgen.server.sampling import SamplingParams, SamplingRequest
from textgen.server.watermark import WatermarkParams


@dataclass
class RequestState:
    id: int
    token_ids: list[int]  # prompt + generated so far
    prompt_len: int
    block_table: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator = field(repr=False)
    top_n_tokens: int = 0
    num_cached: int = 0  # tokens whose K/V are in the cache
    watermark: WatermarkParams | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def max_tokens(self) -> int:
        """KV tokens reserved for the request by the router."""
        return self.prompt_len + self.max_new_tokens

    def slot(self, position: int, block_size: int) -> int:
        return self.block_table[position // block_size] * block_size + position % block_size

    def sampling_request(self, token_mask: bytes | None = None) -> SamplingRequest:
        return SamplingRequest(
            self.params,
            self.generator,
            self.token_ids,
            self.prompt_len,
            self.top_n_tokens,
            watermark=self.watermark,
            token_mask=token_mask,
        )

    def append(self, token_id: int) -> None:
        """Record the token sampled after a forward that cached every earlier token."""
        self.num_cached = self.length
        self.token_ids.append(token_id)


@dataclass
class Batch:
    id: int
    requests: list[RequestState]

    def to_proto(self) -> generate_pb2.CachedBatch:
        return generate_pb2.CachedBatch(
            id=self.id,
            request_ids=[r.id for r in self.requests],
            size=len(self.requests),
            max_tokens=sum(r.max_tokens for r in self.requests),
            current_tokens=sum(r.num_cached for r in self.requests),
        )

    def filter(self, request_ids: list[int]) -> Batch:
        """Keep the given requests, in the batch's order; unknown ids are an error."""
        wanted = set(request_ids)
        missing = wanted - {r.id for r in self.requests}
        if missing:
            raise KeyError(f"batch {self.id} has no requests {sorted(missing)}")
        return Batch(self.id, [r for r in self.requests if r.id in wanted])

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """One batch with every request, in order; it takes the first batch's id."""
        return cls(batches[0].id, [r for b in batches for r in b.requests])
