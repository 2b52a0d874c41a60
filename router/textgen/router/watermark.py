"""Watermark keys and detection (Kirchenbauer et al., 2023).

Design note. The router holds the secret key and sends it, with gamma and
delta, to the shards on every watermarked request; the shards add delta to
the logits of the green tokens (textgen.server.watermark). Detection recounts
green tokens: every token after the first is scored against the green list of
its predecessor, each distinct (previous, token) pair once (a repeated pair
would count the same evidence again, as the paper notes), and

    z = (num_green - gamma * T) / sqrt(T * gamma * (1 - gamma))

over T scored pairs is a standard normal score under the null hypothesis that
the text was written without the key. The green test is the shard's hash,
recomputed here on plain ints:

    key                 = first 8 bytes of SHA-256(--watermark-key), little-endian
    seed(key, prev)     = fmix32(fmix32(fmix32(key_lo) ^ key_hi) ^ prev)
    green(key, prev, t) = fmix32(seed ^ mul32(t, 0x9E3779B9)) < floor(gamma * 2^32)

(fmix32: MurmurHash3's 32-bit finaliser; mul32: the product's low 32 bits;
gamma rounded to float32, as the protocol carries it.)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from textgen.proto import generate_pb2 as pb
from textgen.router.errors import ValidationError

DEFAULT_WATERMARK_KEY = "textgen-watermark-v1"
"""Public, so that anyone can check text marked by a server left at the default key."""

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9


@dataclass(frozen=True)
class WatermarkConfig:
    key: str = DEFAULT_WATERMARK_KEY
    gamma: float = 0.5
    delta: float = 2.0
    z_threshold: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError("watermark_gamma must be > 0 and < 1")
        if self.delta < 0:
            raise ValueError("watermark_delta must be >= 0")
        if not self.key:
            raise ValueError("watermark_key cannot be empty")

    @property
    def key64(self) -> int:
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "little")

    @property
    def threshold(self) -> int:
        """Hashes below this are green: gamma as the float32 that the shards see."""
        gamma32 = struct.unpack("<f", struct.pack("<f", self.gamma))[0]
        return int(gamma32 * 2**32)

    def to_proto(self) -> pb.WatermarkParameters:
        return pb.WatermarkParameters(key=self.key64, gamma=self.gamma, delta=self.delta)


@dataclass(frozen=True)
class Detection:
    num_tokens_scored: int
    num_green: int
    z_score: float
    p_value: float
    watermarked: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def detect(token_ids: Sequence[int], config: WatermarkConfig) -> Detection:
    """Score each distinct (previous, token) pair of `token_ids` against the green lists."""
    pairs = set(itertools.pairwise(token_ids))
    if not pairs:
        raise ValueError("at least two tokens are needed to score a watermark")
    key64, threshold = config.key64, config.threshold
    num_green = sum(is_green(key64, prev, token, threshold) for prev, token in pairs)
    z = z_score(num_green, len(pairs), config.gamma)
    p_value = 0.5 * math.erfc(z / math.sqrt(2))  # upper tail of the standard normal
    return Detection(len(pairs), num_green, z, p_value, z > config.z_threshold)


def z_score(num_green: int, num_scored: int, gamma: float) -> float:
    expected = gamma * num_scored
    return (num_green - expected) / math.sqrt(num_scored * gamma * (1 - gamma))


def is_green(key64: int, prev: int, token: int, threshold: int) -> bool:
    seed = fmix32(fmix32(fmix32(key64 & MASK32) ^ (key64 >> 32)) ^ prev)
    return fmix32(seed ^ ((token * GOLDEN32) & MASK32)) < threshold


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finaliser."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


class Detector:
    """`POST /watermark/detect`: a body with `text` or `token_ids` to a Detection."""

    def __init__(
        self, config: WatermarkConfig, encode: Callable[[str], list[int]], vocab_size: int
    ) -> None:
        self.config = config
        self._encode = encode
        self._vocab_size = vocab_size

    async def detect(self, body: Any) -> Detection:
        token_ids = await self._token_ids(body)
        try:
            return detect(token_ids, self.config)
        except ValueError as error:
            raise ValidationError(f"Input validation error: {error}") from None

    async def _token_ids(self, body: Any) -> list[int]:
        if not isinstance(body, dict) or ("text" in body) == ("token_ids" in body):
            raise _invalid("the body must be an object with either `text` or `token_ids`")
        if "text" in body:
            text = body["text"]
            if not isinstance(text, str) or not text:
                raise _invalid("`text` must be a non-empty string")
            # Tokenizers release the GIL: encode off the event loop.
            return await asyncio.to_thread(self._encode, text)
        token_ids = body["token_ids"]
        if not isinstance(token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self._vocab_size
            for t in token_ids
        ):
            raise _invalid(f"`token_ids` must be a list of integers in [0, {self._vocab_size})")
        return token_ids


def _invalid(message: str) -> ValidationError:
    return ValidationError("Input validation error: " + message)
