"""Green-list watermark (Kirchenbauer et al., 2023): the shard's logits processor.

Design note. At each step the vocabulary is split into a green list (a
fraction `gamma` of it) and a red list, seeded by the previous token and a
secret key; `delta` is added to the green logits, so that sampled text holds
more green tokens than chance. The router detects the mark by recounting green
tokens (textgen.router.watermark), so the split must be reproducible there
without torch: membership is a 32-bit integer hash of (key, previous, token),

    seed(key, prev)     = fmix32(fmix32(fmix32(key_lo) ^ key_hi) ^ prev)
    green(key, prev, t) = fmix32(seed ^ mul32(t, 0x9E3779B9)) < floor(gamma * 2^32)

with fmix32 MurmurHash3's 32-bit finaliser, mul32 the low 32 bits of a
product, key_lo / key_hi the low and high halves of the 64-bit key and gamma
as the float32 the protocol carries. Each token is green with probability
gamma, independently of the vocabulary's size or order (so padded or
rank-sliced vocabularies do not change the mark), and a step costs a handful
of integer operations per logit, batched over every watermarked row.

NOTE: int64 tensors hold 32-bit values only, and mul32 multiplies by constants
below 2^31 in magnitude, so no product overflows: the result is exact on every
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen.proto import generate_pb2

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # odd: t -> mul32(t, GOLDEN32) is a bijection


@dataclass(frozen=True)
class WatermarkParams:
    key: int  # 64-bit secret
    gamma: float  # fraction of the vocabulary that is green
    delta: float  # bias added to green logits

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        if self.delta < 0:
            raise ValueError(f"watermark delta must be >= 0, got {self.delta}")

    @classmethod
    def from_proto(cls, params: generate_pb2.WatermarkParameters) -> WatermarkParams:
        return cls(key=params.key, gamma=params.gamma, delta=params.delta)

    @property
    def threshold(self) -> int:
        """Hashes below this are green. gamma is the protocol's float32: exact in a double."""
        return int(self.gamma * 2**32)


def apply_watermark(
    logits: torch.Tensor, watermarks: list[WatermarkParams | None], prev_ids: list[int]
) -> torch.Tensor:
    """Add each watermarked row's delta to its green logits. [B, V] -> [B, V]"""
    rows = [i for i, w in enumerate(watermarks) if w is not None]
    if not rows:
        return logits
    marks = [watermarks[i] for i in rows]
    device = logits.device
    # The 64-bit key as its two 32-bit halves: int64 cannot hold keys >= 2^63.
    key_lo = torch.tensor([w.key & MASK32 for w in marks], device=device)  # [W]
    key_hi = torch.tensor([w.key >> 32 for w in marks], device=device)  # [W]
    prev = torch.tensor([prev_ids[i] for i in rows], dtype=torch.int64, device=device)  # [W]
    seeds = row_seeds(key_lo, key_hi, prev)  # [W]
    green = green_mask(seeds, [w.threshold for w in marks], logits.shape[-1])  # [W, V]
    delta = torch.tensor([w.delta for w in marks], dtype=logits.dtype, device=device)
    index = torch.tensor(rows, device=device)
    bias = green.to(logits.dtype) * delta.unsqueeze(1)  # [W, V]
    return logits.index_add(0, index, bias)


def green_mask(seeds: torch.Tensor, thresholds: list[int], vocab_size: int) -> torch.Tensor:
    """Green-list membership of every token for each row's seed. [W, V] bool"""
    device = seeds.device
    tokens = _mul32(torch.arange(vocab_size, dtype=torch.int64, device=device), GOLDEN32)  # [V]
    hashes = fmix32(seeds.unsqueeze(1) ^ tokens)  # [W, V]
    limit = torch.tensor(thresholds, dtype=torch.int64, device=device).unsqueeze(1)  # [W, 1]
    return hashes < limit


def row_seeds(key_lo: torch.Tensor, key_hi: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
    """seed(key, prev) of each row from the key's 32-bit halves and the previous token. [W]"""
    return fmix32(fmix32(fmix32(key_lo) ^ key_hi) ^ prev_ids)


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on 32-bit values held in int64 (any shape)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2^32 for 0 <= h < 2^32, without overflowing int64.

    A constant >= 2^31 is replaced by constant - 2^32, which is the same mod
    2^32, so |product| < 2^63; & on a negative int64 reads its two's complement.
    """
    signed = constant - 2**32 if constant >= 2**31 else constant
    h = h * signed
    h &= MASK32
    return h
