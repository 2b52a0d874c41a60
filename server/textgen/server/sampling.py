"""Logits processing and next-token choice for a batch of requests.

Pipeline, in TGI's order, each stage skipped for requests at its neutral value:

    logit bias (OpenAI's, per token id)
    min_new_tokens: EOS ids get -inf until enough tokens are generated
    repetition penalty (all tokens so far, HF semantics)
    frequency / presence penalties (generated tokens, OpenAI semantics)
    grammar mask: tokens outside the router's allowed-token bitmask get -inf
    watermark bias                   (watermarked requests: textgen.server.watermark)
    temperature                      <- chosen-token logprobs are taken here
    top-k, top-p, typical-p, min-p   (only for do_sample requests)
    greedy argmax | multinomial draw with the request's own generator

Penalties and temperature are batched; the seeded draw loops over requests so
that a seed reproduces its output whatever the batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen.proto import generate_pb2
from textgen.server import kernels
from textgen.server.watermark import WatermarkParams, apply_watermark


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.repetition_penalty <= 0:
            raise ValueError("temperature and repetition_penalty must be positive")
        if not (0 < self.top_p <= 1 and 0 < self.typical_p <= 1 and 0 <= self.min_p <= 1):
            raise ValueError("top_p and typical_p must be in (0, 1], min_p in [0, 1]")

    @classmethod
    def from_proto(cls, params: generate_pb2.SamplingParameters) -> SamplingParams:
        """proto3 cannot tell 0 from unset: 0 means neutral (1.0) where 0 is not valid."""
        return cls(
            temperature=params.temperature or 1.0,
            top_k=params.top_k,
            top_p=params.top_p or 1.0,
            typical_p=params.typical_p or 1.0,
            min_p=params.min_p,
            do_sample=params.do_sample,
            seed=params.seed,
            repetition_penalty=params.repetition_penalty or 1.0,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            min_new_tokens=params.min_new_tokens,
            eos_token_ids=tuple(params.eos_token_ids),
            logit_bias=tuple(sorted(params.logit_bias.items())),
        )

    def make_generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)


@dataclass(frozen=True)
class SamplingRequest:
    """What the sampler needs of one request at one step."""

    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int]  # prompt + generated so far
    prompt_len: int
    top_n_tokens: int = 0
    watermark: WatermarkParams | None = None
    token_mask: bytes | None = None
    """Allowed next tokens as packed little-endian int32 words (grammar); None: all."""

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]


@dataclass(frozen=True)
class SamplingOutput:
    next_ids: list[int]
    logprobs: list[float]  # of each chosen token, after penalties and temperature
    top_ids: list[list[int]]  # top_n_tokens alternatives per request (may be empty)
    top_logprobs: list[list[float]]


def sample(
    logits: torch.Tensor, requests: list[SamplingRequest], native: bool = False
) -> SamplingOutput:
    """Choose one token per request from its next-token logits [B, V] (float32).

    `native`: the row statistics run as the native operator (the platform says).
    """
    params = [r.params for r in requests]
    logits = apply_logit_bias(logits, requests)
    logits = apply_min_new_tokens(logits, requests)
    logits = apply_repetition_penalty(logits, requests)
    logits = apply_frequency_presence_penalties(logits, requests)
    logits = apply_token_masks(logits, requests)
    # NOTE: the previous token of the first generated one is the prompt's last.
    watermarks = [r.watermark for r in requests]
    logits = apply_watermark(logits, watermarks, [r.token_ids[-1] for r in requests])
    if any(p.temperature != 1.0 for p in params):
        logits = logits / _column(params, "temperature", logits)  # [B, V]
    # NOTE: logprob = logit - logsumexp(row), so no [B, V] log_softmax is materialised.
    argmax, lse = _row_stats(logits, native)  # [B], [B]
    next_ids = _choose(logits, requests, argmax)  # [B]
    chosen = logits.gather(1, next_ids.unsqueeze(1)).squeeze(1) - lse  # [B]
    top_ids, top_logprobs = _top_tokens(logits, lse, [r.top_n_tokens for r in requests])
    return SamplingOutput(next_ids.tolist(), chosen.tolist(), top_ids, top_logprobs)


def _row_stats(logits: torch.Tensor, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax (first maximum) and log-sum-exp: [B] long, [B] float32."""
    if native and logits.dtype == torch.float32 and logits.is_contiguous():
        return kernels.row_stats(logits)
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)


def apply_logit_bias(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """OpenAI: add each request's bias to the logits of its token ids. [B, V]"""
    vocab_size = logits.shape[-1]
    # NOTE: the router checks ids against the tokenizer; ids past the logits are ignored.
    pairs = [
        (row, token_id, bias)
        for row, r in enumerate(requests)
        for token_id, bias in r.params.logit_bias
        if token_id < vocab_size
    ]
    if not pairs:
        return logits
    rows, cols, biases = zip(*pairs, strict=True)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    values = torch.tensor(biases, dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, values, accumulate=True)


def apply_min_new_tokens(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """HF MinNewTokensLengthLogitsProcessor: no EOS before `min_new_tokens` generated tokens."""
    rows = [
        (b, r.params.eos_token_ids)
        for b, r in enumerate(requests)
        if r.params.eos_token_ids and len(r.generated_ids) < r.params.min_new_tokens
    ]
    if not rows:
        return logits
    vocab_size = logits.shape[-1]
    logits = logits.clone()
    for b, eos_ids in rows:
        logits[b, [t for t in eos_ids if t < vocab_size]] = -float("inf")
    return logits


def apply_repetition_penalty(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """HF/TGI: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if all(r.params.repetition_penalty == 1.0 for r in requests):
        return logits  # NOTE: decided on the parameters: no tensor built at each step
    penalty = _column([r.params for r in requests], "repetition_penalty", logits)  # [B, 1]
    seen = _token_counts(logits, [r.token_ids for r in requests]) > 0  # [B, V]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalties(
    logits: torch.Tensor, requests: list[SamplingRequest]
) -> torch.Tensor:
    """OpenAI: logit -= frequency * count + presence * (count > 0), over generated tokens."""
    params = [r.params for r in requests]
    if all(p.frequency_penalty == 0 and p.presence_penalty == 0 for p in params):
        return logits
    frequency = _column(params, "frequency_penalty", logits)  # [B, 1]
    presence = _column(params, "presence_penalty", logits)
    counts = _token_counts(logits, [r.generated_ids for r in requests])  # [B, V]
    return logits - frequency * counts - presence * (counts > 0).float()


def apply_token_masks(logits: torch.Tensor, requests: list[SamplingRequest]) -> torch.Tensor:
    """Grammar guidance: -inf for every token the row's bitmask does not allow. [B, V]

    Bit t % 32 of word t / 32 allows token t; logits columns past the mask's
    words (padding of the embedding) are never allowed for a masked row.
    """
    rows = [b for b, r in enumerate(requests) if r.token_mask is not None]
    if not rows:
        return logits
    vocab_size = logits.shape[-1]
    num_words = (vocab_size + 31) // 32
    packed = torch.zeros(len(rows), num_words, dtype=torch.int32)  # [R, W]
    for i, b in enumerate(rows):
        words = torch.frombuffer(bytearray(requests[b].token_mask), dtype=torch.int32)
        n = min(num_words, words.numel())
        packed[i, :n] = words[:n]
    allowed = unpack_bits(packed.to(logits.device))[:, :vocab_size]  # [R, V]
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, -float("inf"))
    return logits.index_copy(0, index, masked)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """[R, W] int32 words to [R, W * 32] bools, bit j of word w being column 32 * w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)  # [32]
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1).bool()


def warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask with -inf the tokens that top-k, top-p, typical-p and min-p remove. [B, V]"""
    for is_active, stage in _WARPERS:
        rows = [is_active(p) for p in params]
        if any(rows):
            logits = _where_rows(rows, stage(logits, params), logits)
    return logits


def _choose(
    logits: torch.Tensor, requests: list[SamplingRequest], argmax: torch.Tensor
) -> torch.Tensor:
    """Greedy rows take `argmax`; do_sample rows draw from their warped distribution."""
    next_ids = argmax.clone()  # [B]
    sampled = [i for i, r in enumerate(requests) if r.params.do_sample]
    if not sampled:
        return next_ids
    probs = torch.softmax(warp(logits[sampled], [requests[i].params for i in sampled]), -1)
    for row, i in enumerate(sampled):
        # NOTE: one draw per request from its own generator: batch-independent.
        draw = torch.multinomial(probs[row], 1, generator=requests[i].generator)
        next_ids[i] = draw[0]
    return next_ids


def _top_k(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab_size = logits.shape[-1]
    k = torch.tensor([min(p.top_k, vocab_size) or vocab_size for p in params])  # [B]
    sorted_logits = logits.sort(dim=-1, descending=True).values  # [B, V]
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1).to(logits.device))  # [B, 1]
    return logits.masked_fill(logits < kth, -float("inf"))


def _top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """HF TopPLogitsWarper: drop the low tail whose mass is at most 1 - top_p."""
    top_p = _column(params, "top_p", logits)  # [B, 1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending [B, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - top_p
    remove[:, -1] = False  # always keep the most likely token
    return logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _typical_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """HF TypicalLogitsWarper: keep the tokens closest to the entropy, up to mass typical_p."""
    mass = _column(params, "typical_p", logits)  # [B, 1]
    log_probs = torch.log_softmax(logits, dim=-1)  # [B, V]
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)  # [B, 1]
    shifted = (-log_probs - entropy).abs()
    sorted_scores, order = shifted.sort(dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=logits.shape[-1] - 1)  # [B]
    remove = sorted_scores > sorted_scores.gather(1, last.unsqueeze(1))
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """HF MinPLogitsWarper: drop tokens below min_p times the top probability."""
    min_p = _column(params, "min_p", logits)  # [B, 1]
    probs = logits.softmax(dim=-1)  # [B, V]
    remove = probs < min_p * probs.max(dim=-1, keepdim=True).values
    # The top token's probability is never below the threshold: at least one survives.
    return logits.masked_fill(remove, -float("inf"))


_WARPERS = (
    (lambda p: p.top_k > 0, _top_k),
    (lambda p: p.top_p < 1, _top_p),
    (lambda p: p.typical_p < 1, _typical_p),
    (lambda p: p.min_p > 0, _min_p),
)


def _top_tokens(
    logits: torch.Tensor, lse: torch.Tensor, counts: list[int]
) -> tuple[list[list[int]], list[list[float]]]:
    """The n most likely tokens of each row and their logprobs (logits minus `lse`)."""
    max_n = max(counts, default=0)
    if max_n == 0:
        return [[] for _ in counts], [[] for _ in counts]
    values, ids = logits.topk(min(max_n, logits.shape[-1]), dim=-1)  # [B, n]
    values = values - lse.unsqueeze(1)
    ids_list, values_list = ids.tolist(), values.tolist()
    return (
        [row[:n] for row, n in zip(ids_list, counts, strict=True)],
        [row[:n] for row, n in zip(values_list, counts, strict=True)],
    )


def _token_counts(logits: torch.Tensor, token_ids: list[list[int]]) -> torch.Tensor:
    """How often each vocabulary id occurs in each row's token list. [B, V]"""
    counts = torch.zeros_like(logits)
    rows = torch.tensor([b for b, ids in enumerate(token_ids) for _ in ids], dtype=torch.long)
    cols = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long)
    ones = torch.ones(len(cols), dtype=logits.dtype)
    return counts.index_put_((rows, cols), ones, accumulate=True)


def _column(params: list[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    """One parameter of every request as a [B, 1] column broadcastable over the vocabulary."""
    values = [float(getattr(p, name)) for p in params]
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _where_rows(rows: list[bool], new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    mask = torch.tensor(rows, device=old.device).unsqueeze(1)  # [B, 1]
    return torch.where(mask, new, old)
