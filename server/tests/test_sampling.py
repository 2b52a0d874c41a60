"""The logits pipeline and the seeded draw, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from textgen.proto import generate_pb2
from textgen.server.sampling import (
    SamplingParams,
    SamplingRequest,
    apply_frequency_presence_penalties,
    apply_logit_bias,
    apply_repetition_penalty,
    apply_token_masks,
    sample,
    warp,
)


def request(params: SamplingParams, token_ids=(0,), prompt_len=1, top_n=0) -> SamplingRequest:
    return SamplingRequest(params, params.make_generator(), list(token_ids), prompt_len, top_n)


def test_proto_zeros_mean_neutral():
    params = SamplingParams.from_proto(generate_pb2.SamplingParameters())
    assert params == SamplingParams()


def test_invalid_params_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams.from_proto(generate_pb2.SamplingParameters(top_p=1.5))


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    req = request(SamplingParams(repetition_penalty=2.0), token_ids=[0, 1, 1], prompt_len=2)
    out = apply_repetition_penalty(logits, [req])
    assert out.tolist() == [[1.0, -4.0, 1.0, 3.0]]


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 4)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    # Prompt [3]; generated [2, 2, 1].
    req = request(params, token_ids=[3, 2, 2, 1], prompt_len=1)
    out = apply_frequency_presence_penalties(logits, [req])
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_logit_bias_is_added_per_request_before_the_choice():
    logits = torch.zeros(2, 4)
    proto = generate_pb2.SamplingParameters(logit_bias={3: 100.0, 1: -5.0, 9: 1.0})
    biased = request(SamplingParams.from_proto(proto))
    out = apply_logit_bias(logits, [request(SamplingParams()), biased])
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, -5.0, 0.0, 100.0]]  # id 9: past V
    assert sample(torch.tensor([[5.0, 1.0, 0.0, 0.0]]), [biased]).next_ids == [3]


def test_neutral_penalties_leave_logits_untouched():
    logits = torch.randn(2, 8)
    reqs = [request(SamplingParams(), token_ids=[1, 2, 3]) for _ in range(2)]
    assert torch.equal(apply_repetition_penalty(logits, reqs), logits)
    assert torch.equal(apply_frequency_presence_penalties(logits, reqs), logits)
    assert torch.equal(apply_logit_bias(logits, reqs), logits)


def test_greedy_picks_argmax_and_logprob_uses_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    out = sample(logits, [request(SamplingParams(temperature=2.0), top_n=2)])
    assert out.next_ids == [1]
    expected = torch.log_softmax(logits / 2.0, dim=-1)
    assert out.logprobs[0] == pytest.approx(expected[0, 1].item())
    assert out.top_ids == [[1, 2]]
    assert out.top_logprobs[0] == pytest.approx(expected[0, [1, 2]].tolist())


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = sample(logits, [request(SamplingParams()) for _ in range(4)])
    sampled = sample(
        logits, [request(SamplingParams(do_sample=True, top_k=1, seed=s)) for s in range(4)]
    )
    assert sampled.next_ids == greedy.next_ids


def test_seeded_sampling_is_independent_of_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    params = SamplingParams(do_sample=True, seed=1234, temperature=0.8, top_p=0.95)
    alone_req = request(params)
    alone = [sample(logits[1:2], [alone_req]).next_ids[0] for _ in range(20)]
    neighbours = [
        request(SamplingParams(do_sample=True, seed=7, top_k=5)),
        request(params),
        request(SamplingParams(do_sample=True, seed=99, typical_p=0.5)),
    ]
    batched = [sample(logits, neighbours).next_ids[1] for _ in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1  # it really sampled


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = warp(logits, [SamplingParams(do_sample=True, top_p=0.7)])
    assert torch.isinf(out).tolist() == [[False, False, True, True]]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = warp(logits, [SamplingParams(do_sample=True, min_p=0.4)])
    assert torch.isinf(out).tolist() == [[False, False, True, True]]


def test_top_k_applies_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    params = [SamplingParams(do_sample=True, top_k=2), SamplingParams(do_sample=True)]
    out = warp(logits, params)
    assert torch.isinf(out).tolist() == [[False, False, True, True], [False] * 4]


def test_typical_p_keeps_at_least_one_token():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    out = warp(logits, [SamplingParams(do_sample=True, typical_p=0.01)])
    assert not math.isinf(out.max().item())


def test_min_new_tokens_masks_eos_until_enough_tokens_are_generated():
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])  # EOS (id 0) is the argmax
    params = SamplingParams(min_new_tokens=2, eos_token_ids=(0,))
    early = request(params, token_ids=[2, 1], prompt_len=1)  # 1 token generated so far
    done = request(params, token_ids=[2, 1, 1], prompt_len=1)  # 2 generated: EOS allowed
    output = sample(logits, [early, done])
    assert output.next_ids == [1, 0]
    assert math.isclose(output.logprobs[0], math.log(1 / (1 + math.exp(-1))), rel_tol=1e-5)


def test_min_new_tokens_round_trips_through_the_proto():
    proto = generate_pb2.SamplingParameters(min_new_tokens=3, eos_token_ids=[7, 9])
    params = SamplingParams.from_proto(proto)
    assert (params.min_new_tokens, params.eos_token_ids) == (3, (7, 9))


def packed(allowed: list[int], vocab_size: int) -> bytes:
    """A little-endian int32 bitmask allowing `allowed` (the router's TokenMask.bitmask)."""
    words = [0] * ((vocab_size + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor(words, dtype=torch.int64).to(torch.int32).numpy().tobytes()


def test_token_mask_leaves_only_allowed_tokens_on_masked_rows():
    vocab_size = 70  # three words: bits past the vocabulary, and bit 31 (the sign bit)
    logits = torch.zeros(2, vocab_size)
    masked = SamplingRequest(
        SamplingParams(), torch.Generator(), [0], 1, 0, token_mask=packed([1, 31, 69], 70)
    )
    free = request(SamplingParams())
    out = apply_token_masks(logits, [free, masked])
    assert bool((out[0] == 0).all())
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [1, 31, 69]


def test_logits_past_the_mask_are_never_allowed():
    logits = torch.zeros(1, 40)  # the embedding is padded past the mask's one word
    masked = SamplingRequest(
        SamplingParams(), torch.Generator(), [0], 1, 0, token_mask=packed([3], 32)
    )
    assert torch.isfinite(apply_token_masks(logits, [masked])).nonzero()[:, 1].tolist() == [3]


def test_sampling_never_leaves_the_mask_and_comes_after_penalties():
    vocab_size = 50
    allowed = [7, 8, 40]
    for seed in range(30):
        params = SamplingParams(do_sample=True, seed=seed, temperature=1.5, repetition_penalty=1.3)
        req = SamplingRequest(
            params, params.make_generator(), [7, 7], 1, 0, token_mask=packed(allowed, 50)
        )
        output = sample(torch.randn(1, vocab_size), [req])
        assert output.next_ids[0] in allowed
    # Greedy picks the best allowed token, with logprobs over the allowed ones only.
    logits = torch.tensor([[0.0, 9.0, 1.0, 2.0]])
    req = SamplingRequest(
        SamplingParams(), torch.Generator(), [0], 1, 0, token_mask=packed([2, 3], 4)
    )
    output = sample(logits, [req])
    assert output.next_ids == [3]
    assert math.isclose(
        output.logprobs[0], math.log(math.e**2 / (math.e + math.e**2)), rel_tol=1e-5
    )


def test_native_row_stats_match_torch(isa):
    from textgen.server.sampling import _row_stats

    torch.manual_seed(0)
    logits = torch.randn(5, 1000) * 8
    logits[1, :500] = -float("inf")  # a grammar mask
    logits[2, [3, 700]] = 50.0  # a tie: the first maximum wins, as in torch
    logits[3] = -float("inf")  # nothing allowed
    argmax, lse = _row_stats(logits, native=True)
    assert argmax.tolist() == logits.argmax(dim=-1).tolist()
    expected = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(lse[[0, 1, 2, 4]], expected[[0, 1, 2, 4]], rtol=1e-6, atol=1e-5)
    assert lse[3] == -float("inf")
