"""The watermark logits processor: the green-list hash and the bias on a batch."""

from __future__ import annotations

import pytest
import torch

from textgen.proto import generate_pb2
from textgen.server.errors import InvalidRequestError
from textgen.server.sampling import SamplingParams, SamplingRequest, sample
from textgen.server.shard import _new_state
from textgen.server.watermark import (
    MASK32,
    WatermarkParams,
    _mul32,
    apply_watermark,
    fmix32,
    green_mask,
    row_seeds,
)

VOCAB = 49152  # the default model's
KEY = 0x0123456789ABCDEF
# Known answers, shared with router/tests/test_watermark_detector.py: the router
# must recompute the same green lists. Bit t: is token t green after `prev`, gamma 0.5.
KNOWN_GREEN_BITS = {
    0: "01101101110011110011011110111100",
    42: "11110110101100000111110001111101",
    49151: "01101111001000010101001010000110",
}


def green(key: int, prev: int, gamma: float, vocab_size: int = VOCAB) -> torch.Tensor:
    seeds = row_seeds(torch.tensor([key & MASK32]), torch.tensor([key >> 32]), torch.tensor([prev]))
    threshold = WatermarkParams(key, gamma, 1.0).threshold
    return green_mask(seeds, [threshold], vocab_size)[0]  # [V]


def test_fmix32_is_murmur3s_finaliser():
    assert fmix32(torch.tensor([1])).item() == 0x514E28B7  # MurmurHash3's reference value


def test_mul32_is_exact_for_every_32_bit_input():
    values = [0, 1, 0xFFFF, 0x10000, 2**31 - 1, 2**31, MASK32, 0xDEADBEEF]
    for constant in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 12345):
        got = _mul32(torch.tensor(values), constant).tolist()
        assert got == [(v * constant) & MASK32 for v in values]


@pytest.mark.parametrize("prev", sorted(KNOWN_GREEN_BITS))
def test_green_lists_match_the_known_answers(prev):
    bits = "".join("1" if g else "0" for g in green(KEY, prev, 0.5, 32).tolist())
    assert bits == KNOWN_GREEN_BITS[prev]


def test_keys_above_2_63_work():
    assert green(2**64 - 1, 7, 0.5).float().mean().item() == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 0.75])
def test_green_fraction_is_gamma_over_a_large_vocabulary(gamma):
    # std of the fraction over 49152 tokens is at most 0.0023: 0.015 is > 6 sigma.
    for prev in (0, 1, 500, 49151):
        assert green(KEY, prev, gamma).float().mean().item() == pytest.approx(gamma, abs=0.015)


def test_green_lists_of_different_previous_tokens_are_unrelated():
    lists = torch.stack([green(KEY, prev, 0.5) for prev in range(8)]).float()  # [8, V]
    overlap = (lists @ lists.T) / VOCAB  # [8, 8]: fraction green in both
    off_diagonal = overlap[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.sub(0.25).abs().max().item() < 0.015  # gamma^2 if independent
    assert not torch.equal(green(KEY, 5, 0.5), green(KEY + 1, 5, 0.5))


def test_bias_is_added_to_green_logits_of_watermarked_rows_only():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    marks = [WatermarkParams(KEY, 0.5, 2.0), None, WatermarkParams(KEY + 1, 0.25, 5.0)]
    out = apply_watermark(logits, marks, [10, 11, 12])
    assert torch.equal(out[1], logits[1])
    assert torch.allclose(out[0] - logits[0], 2.0 * green(KEY, 10, 0.5).float())
    assert torch.allclose(out[2] - logits[2], 5.0 * green(KEY + 1, 12, 0.25).float())


def test_a_row_is_marked_the_same_alone_and_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    mark = WatermarkParams(KEY, 0.5, 2.0)
    batched = apply_watermark(logits, [None, mark, None, mark], [1, 2, 3, 2])
    alone = apply_watermark(logits[1:2], [mark], [2])
    assert torch.equal(batched[1], alone[0])
    # Same key and previous token: the same bias.
    assert torch.allclose(batched[1] - logits[1], batched[3] - logits[3])


def test_no_watermark_leaves_the_logits_untouched():
    logits = torch.randn(2, 100)
    assert apply_watermark(logits, [None, None], [0, 1]) is logits


def sampling_request(prev: int, watermark: WatermarkParams | None, **params) -> SamplingRequest:
    p = SamplingParams(**params)
    return SamplingRequest(p, p.make_generator(), [3, prev], 1, watermark=watermark)


def test_greedy_with_a_large_delta_picks_green_tokens():
    torch.manual_seed(0)
    logits = torch.randn(16, VOCAB)
    mark = WatermarkParams(KEY, 0.5, 50.0)
    plain = sample(logits, [sampling_request(p, None) for p in range(16)]).next_ids
    marked = sample(logits, [sampling_request(p, mark) for p in range(16)]).next_ids
    assert all(green(KEY, p, 0.5)[t] for p, t in enumerate(marked))
    assert marked != plain  # about half the unmarked argmaxes are red


def test_sampling_with_the_mark_draws_mostly_green_tokens():
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB)  # flat: high entropy, the bias decides
    mark = WatermarkParams(KEY, 0.5, 2.0)
    requests = [sampling_request(p, mark, do_sample=True, seed=p) for p in range(64)]
    drawn = sample(logits, requests).next_ids
    num_green = sum(bool(green(KEY, p, 0.5)[t]) for p, t in enumerate(drawn))
    # P(green) = 0.5 e^2 / (0.5 e^2 + 0.5) = 0.88 on flat logits.
    assert num_green >= 48


def test_the_shard_state_carries_the_requests_watermark():
    params = generate_pb2.WatermarkParameters(key=2**64 - 1, gamma=0.25, delta=2.0)
    state = _new_state(generate_pb2.Request(id=1, input_ids=[1, 2], watermark=params))
    assert state.watermark == WatermarkParams(2**64 - 1, 0.25, 2.0)
    assert state.sampling_request().watermark == state.watermark
    assert _new_state(generate_pb2.Request(id=2, input_ids=[1])).watermark is None


def test_an_invalid_gamma_is_an_invalid_request():
    params = generate_pb2.WatermarkParameters(key=1, gamma=0.0, delta=2.0)
    with pytest.raises(InvalidRequestError, match="gamma"):
        _new_state(generate_pb2.Request(id=1, input_ids=[1], watermark=params))
