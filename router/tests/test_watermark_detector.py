"""Watermark detection: the hash, the z-score and the detect endpoint's body checks."""

from __future__ import annotations

import math
import random

import pytest
from router_fakes import tokenizer_info

from textgen.router.allocator import BlockAllocator
from textgen.router.errors import ValidationError
from textgen.router.request import Entry
from textgen.router.scheduler import PrefillChunk, _to_proto
from textgen.router.validation import Validation, ValidationLimits
from textgen.router.watermark import (
    DEFAULT_WATERMARK_KEY,
    Detector,
    WatermarkConfig,
    detect,
    fmix32,
    is_green,
    z_score,
)

KEY = 0x0123456789ABCDEF
# The same known answers as server/tests/test_watermark_processor.py: bit t says
# whether token t is green after `prev` at gamma 0.5. The two must agree.
KNOWN_GREEN_BITS = {
    0: "01101101110011110011011110111100",
    42: "11110110101100000111110001111101",
    49151: "01101111001000010101001010000110",
}


def test_fmix32_is_murmur3s_finaliser():
    assert fmix32(1) == 0x514E28B7


@pytest.mark.parametrize("prev", sorted(KNOWN_GREEN_BITS))
def test_green_lists_match_the_known_answers(prev):
    bits = "".join("1" if is_green(KEY, prev, t, 2**31) else "0" for t in range(32))
    assert bits == KNOWN_GREEN_BITS[prev]


def test_the_default_key_is_the_documented_constant():
    config = WatermarkConfig()
    assert config.key == DEFAULT_WATERMARK_KEY == "textgen-watermark-v1"
    assert config.key64 == 0x513A581D3F12B272  # SHA-256's first 8 bytes, little-endian
    assert WatermarkConfig(key="other").key64 != config.key64


def test_gamma_is_rounded_to_float32_as_the_shards_see_it():
    assert WatermarkConfig(gamma=0.5).threshold == 2**31
    assert WatermarkConfig(gamma=0.3).threshold == int(0.30000001192092896 * 2**32)


@pytest.mark.parametrize("settings", [{"gamma": 0.0}, {"gamma": 1.0}, {"delta": -1.0}, {"key": ""}])
def test_invalid_settings_are_rejected(settings):
    with pytest.raises(ValueError):
        WatermarkConfig(**settings)


def test_z_score_and_p_value_of_known_counts():
    assert z_score(50, 100, 0.5) == 0.0
    assert z_score(75, 100, 0.5) == pytest.approx(5.0)
    assert z_score(40, 100, 0.25) == pytest.approx(15 / math.sqrt(18.75))


def green_text(config: WatermarkConfig, length: int, rng: random.Random) -> list[int]:
    """A token sequence whose every token is green after its predecessor."""
    tokens = [rng.randrange(49152)]
    while len(tokens) < length:
        candidate = rng.randrange(49152)
        if is_green(config.key64, tokens[-1], candidate, config.threshold):
            tokens.append(candidate)
    return tokens


def test_an_all_green_text_is_detected_with_its_z_and_p():
    config = WatermarkConfig()
    detection = detect(green_text(config, 101, random.Random(0)), config)
    assert (detection.num_tokens_scored, detection.num_green) == (100, 100)
    assert detection.z_score == pytest.approx(10.0)
    assert detection.p_value == pytest.approx(0.5 * math.erfc(10 / math.sqrt(2)))
    assert detection.watermarked
    assert not detect(green_text(config, 101, random.Random(0)), WatermarkConfig("k")).watermarked


def test_repeated_pairs_are_scored_once():
    config = WatermarkConfig()
    tokens = green_text(config, 3, random.Random(1))  # a b c: 2 pairs, both green
    detection = detect(tokens * 50, config)  # (c, a) is the only new pair
    assert detection.num_tokens_scored == 3
    assert detection.num_green == 2 + is_green(config.key64, tokens[2], tokens[0], 2**31)


def test_random_tokens_score_near_zero():
    rng = random.Random(2)
    config = WatermarkConfig()
    texts = [[rng.randrange(49152) for _ in range(200)] for _ in range(200)]
    scores = [detect(tokens, config).z_score for tokens in texts]
    assert abs(sum(scores) / len(scores)) < 0.3  # the mean of 200 N(0, 1) draws
    assert sum(z > 4 for z in scores) == 0


def test_a_single_token_cannot_be_scored():
    with pytest.raises(ValueError, match="two tokens"):
        detect([5], WatermarkConfig())


async def run_detector(body) -> dict:
    detector = Detector(WatermarkConfig(), lambda text: [ord(c) for c in text], 1000)
    return (await detector.detect(body)).to_json()


async def test_detector_takes_text_or_token_ids():
    by_text = await run_detector({"text": "hello world"})
    by_ids = await run_detector({"token_ids": [ord(c) for c in "hello world"]})
    assert by_text == by_ids
    assert set(by_text) == {"num_tokens_scored", "num_green", "z_score", "p_value", "watermarked"}


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"text": "a b", "token_ids": [1, 2]},
        {"text": ""},
        {"text": 3},
        {"token_ids": "1 2"},
        {"token_ids": [1, -2]},
        {"token_ids": [1, 1000]},
        {"token_ids": [1, True]},
        {"token_ids": [1]},
        {"text": "a"},
    ],
)
async def test_detector_rejects_bad_bodies_with_422(body):
    with pytest.raises(ValidationError) as error:
        await run_detector(body)
    assert error.value.status == 422
    assert error.value.message.startswith("Input validation error: ")


async def validate(parameters: dict):
    limits = ValidationLimits(max_input_tokens=32, max_total_tokens=64, max_stop_sequences=4)
    validation = Validation(lambda text: [ord(c) for c in text], limits)
    return await validation.validate({"inputs": "hi", "parameters": parameters})


async def test_parameters_watermark_reaches_the_shard_with_the_routers_key():
    config = WatermarkConfig(key="s3cret", gamma=0.25, delta=3.0)
    allocator = BlockAllocator(64, block_size=4)
    requests = []
    for watermark in (True, False):
        entry = Entry(len(requests), await validate({"watermark": watermark}), tokenizer_info())
        entry.allocation = allocator.allocate(entry.request.max_total_tokens)
        requests.append(
            _to_proto(PrefillChunk(entry, 0, entry.request.input_len), config.to_proto())
        )
    marked, plain = requests
    assert marked.HasField("watermark") and not plain.HasField("watermark")
    assert (marked.watermark.key, marked.watermark.gamma, marked.watermark.delta) == (
        config.key64, 0.25, 3.0,
    )  # fmt: skip
    assert not (await validate({})).watermark


async def test_parameters_watermark_must_be_a_boolean():
    with pytest.raises(ValidationError, match="watermark"):
        await validate({"watermark": 1})
