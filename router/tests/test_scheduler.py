import asyncio
import dataclasses
import random

import pytest
from router_fakes import FakeShard, tokenizer_info

from textgen.router.allocator import BlockAllocator
from textgen.router.errors import GenerationError
from textgen.router.queue import Queue
from textgen.router.request import Entry, SamplingParams, StoppingParams, ValidRequest
from textgen.router.scheduler import Scheduler, SchedulerConfig


def make_entry(request_id: int, prompt: str, max_new_tokens: int = 16, stop=()) -> Entry:
    request = ValidRequest(
        inputs=prompt,
        input_ids=tuple(ord(c) for c in prompt),
        sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=stop),
    )
    return Entry(request_id, request, tokenizer_info())


class Harness:
    def __init__(
        self,
        replies: dict[str, str],
        num_blocks: int = 64,
        gated: bool = False,
        grammar=None,
        prefix_caching: bool = False,
    ):
        self.shard = FakeShard(replies, gate=asyncio.Semaphore(0) if gated else None)
        self.allocator = BlockAllocator(num_blocks, block_size=4, prefix_caching=prefix_caching)
        self.queue = Queue(self.allocator)
        config = SchedulerConfig(
            max_batch_prefill_tokens=64,
            max_batch_total_tokens=None,
            max_batch_size=None,
            waiting_served_ratio=0.3,
            max_waiting_tokens=20,
        )
        self.scheduler = Scheduler(self.shard, self.queue, self.allocator, config, grammar=grammar)
        self.task = asyncio.create_task(self.scheduler.run())

    async def result(self, entry: Entry) -> str:
        return (await self.final_event(entry)).ending.generated_text

    async def final_event(self, entry: Entry):
        while True:
            event = await asyncio.wait_for(entry.events.get(), 5)
            if not hasattr(event, "ending"):
                raise event
            if event.ending is not None:
                return event

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.shard.gate.release()

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    def close(self) -> None:
        self.task.cancel()


async def test_single_request_runs_to_eos_and_frees_its_blocks():
    h = Harness({"a": "hello"})
    entry = make_entry(1, "abc")
    h.queue.append(entry)
    assert await h.result(entry) == "hello"
    await h.settle()
    assert h.allocator.num_used_blocks == 0
    assert h.shard.calls[0] == ("prefill", (1,))
    assert h.shard.calls[-1] == ("filter", ())
    h.close()


async def test_request_arriving_mid_decode_joins_the_running_batch():
    h = Harness({"a": "aaaaaaaaaa", "b": "bb"}, gated=True)
    first = make_entry(1, "a")
    h.queue.append(first)
    h.steps(3)
    await h.settle()
    assert h.shard.calls == [("prefill", (1,))] + [("decode", (1,))] * 3
    second = make_entry(2, "b")
    h.queue.append(second)
    h.steps(2)
    await h.settle()
    # The newcomer is prefilled between two decode steps, in one forward with the first
    # request's decode step (a mixed step), and then decoded with it.
    joined = h.shard.calls.index(("mixed", (1, 2)))
    assert h.shard.calls[joined - 1] == ("decode", (1,))
    assert h.shard.calls[joined + 1] == ("decode", (1, 2))
    assert not first.finished
    h.steps(3)
    await h.settle()
    assert await h.result(second) == "bb"
    # Once finished, the second request is filtered out and the first decodes alone.
    left = h.shard.calls.index(("filter", (1,)))
    assert h.shard.calls[left + 1] == ("decode", (1,))
    assert not first.finished
    h.steps(20)
    assert await h.result(first) == "aaaaaaaaaa"
    h.close()


async def test_waiting_served_ratio_holds_newcomers_until_enough_wait():
    h = Harness({c: c * 30 for c in "abcdefghij"}, gated=True)
    h.scheduler._config = SchedulerConfig(
        64, None, None, waiting_served_ratio=1.0, max_waiting_tokens=4
    )
    for i, c in enumerate("abcd"):
        h.queue.append(make_entry(i, c))
    h.steps(1)
    await h.settle()
    assert h.shard.calls[0] == ("prefill", (0, 1, 2, 3))
    # One newcomer against a batch of four: held back (ratio 1.0) until it waited 4 steps.
    h.queue.append(make_entry(9, "j"))
    h.steps(2)
    await h.settle()
    assert all(call[0] == "decode" for call in h.shard.calls[1:])
    h.steps(4)
    await h.settle()
    assert ("mixed", (0, 1, 2, 3, 9)) in h.shard.calls
    h.close()


async def test_stop_sequence_and_length_end_requests():
    h = Harness({"a": "one two three", "b": "xxxxxxxxxxxx"})
    stopped = make_entry(1, "a", stop=("two",))
    capped = make_entry(2, "b", max_new_tokens=5)
    h.queue.append(stopped)
    h.queue.append(capped)
    assert await h.result(stopped) == "one two"
    assert await h.result(capped) == "xxxxx"
    await h.settle()
    assert h.allocator.num_used_blocks == 0
    h.close()


async def test_cancelled_request_is_filtered_at_the_next_step_and_freed():
    h = Harness({"a": "a" * 40, "b": "b" * 40}, gated=True)
    keep, drop = make_entry(1, "a", 50), make_entry(2, "b", 50)
    h.queue.append(keep)
    h.queue.append(drop)
    h.steps(2)
    await h.settle()
    used = h.allocator.num_used_blocks
    drop.cancel()
    h.steps(2)  # the step already in flight, then the first one after the cancel
    await h.settle()
    assert ("filter", (1,)) in h.shard.calls
    assert h.shard.calls[-1] == ("decode", (1,))
    assert h.allocator.num_used_blocks < used
    h.close()


async def test_cancelled_while_queued_never_reaches_the_shard():
    h = Harness({"a": "a"})
    entry = make_entry(1, "a")
    entry.cancel()
    h.queue.append(entry)
    await h.settle()
    assert h.shard.calls == []
    assert len(h.queue) == 0
    h.close()


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("fail_next_decode", "shard exploded"),  # a gRPC error from the shard
        ("crash_next_decode", "RuntimeError: a bug in the step"),  # any other exception
    ],
)
async def test_a_failed_step_fails_its_batch_with_424_and_keeps_serving(failure, message):
    h = Harness({"a": "aaaa", "b": "bb"})
    setattr(h.shard, failure, True)
    failed = make_entry(1, "a")
    h.queue.append(failed)
    with pytest.raises(GenerationError, match=message):
        await h.result(failed)
    assert h.allocator.num_used_blocks == 0
    later = make_entry(2, "b")
    h.queue.append(later)
    assert await h.result(later) == "bb"
    h.close()


async def test_a_failed_mixed_step_fails_running_and_new_requests_alike():
    h = Harness({"a": "a" * 10, "b": "bb", "c": "cc"}, gated=True)
    h.shard.fail_next_mixed = True
    running, newcomer = make_entry(1, "a"), make_entry(2, "b")
    h.queue.append(running)
    h.steps(1)
    await h.settle()
    h.queue.append(newcomer)
    h.steps(1)
    for entry in (running, newcomer):
        with pytest.raises(GenerationError, match="exploded mid-mix"):
            await h.result(entry)
    assert h.allocator.num_used_blocks == 0
    assert h.shard.batches == {}  # both the running and the new batch were cleared
    later = make_entry(3, "c")
    h.queue.append(later)
    h.steps(5)
    assert await h.result(later) == "cc"
    h.close()


async def test_requests_wait_for_kv_blocks_instead_of_failing():
    # 5 usable blocks of 4 tokens: room for one request of 1 + 15 tokens at a time.
    h = Harness({"a": "a" * 10, "b": "b" * 10}, num_blocks=6)
    first, second = make_entry(1, "a", 15), make_entry(2, "b", 15)
    h.queue.append(first)
    h.queue.append(second)
    assert await h.result(first) == "a" * 10
    assert await h.result(second) == "b" * 10
    prefills = [call for call in h.shard.calls if call[0] == "prefill"]
    assert prefills == [("prefill", (1,)), ("prefill", (2,))]
    h.close()


def chunking(h: Harness, prefill_tokens: int = 64, chunk_tokens: int = 4) -> None:
    h.scheduler._config = SchedulerConfig(
        prefill_tokens, None, None, waiting_served_ratio=0.0, max_waiting_tokens=20,
        prefill_chunk_tokens=chunk_tokens,
    )  # fmt: skip


async def step_until_chunk(h: Harness, chunk: tuple[int, int, int]) -> None:
    """Release gated steps one by one until the fake shard has computed `chunk`."""
    for _ in range(5):
        if chunk in h.shard.chunks:
            return
        h.steps(1)
        await h.settle()
    assert chunk in h.shard.chunks


async def test_a_prompt_is_prefilled_in_chunks_while_others_decode():
    h = Harness({"a": "a" * 12, "z": "zz"}, gated=True)
    chunking(h, chunk_tokens=4)
    first, long = make_entry(1, "a"), make_entry(2, "z" * 10)
    h.queue.append(first)
    h.steps(1)
    await h.settle()
    h.queue.append(long)
    h.steps(5)
    await h.settle()
    # Chunks of 4, 4 and 2 tokens, each beside request 1's decode step; the last yields
    # request 2's first token and it decodes with request 1 from then on.
    assert h.shard.chunks == [(1, 0, 1), (2, 0, 4), (2, 4, 4), (2, 8, 2)]
    calls = h.shard.calls
    joined = calls.index(("mixed", (1, 2)))
    assert calls[joined : joined + 4] == [("mixed", (1, 2))] * 3 + [("decode", (1, 2))]
    # Request 1 never misses a step: every forward after its prefill decodes it.
    assert all(1 in call[1] for call in calls[1:] if call[0] in ("mixed", "decode"))
    h.steps(20)
    assert await h.result(long) == "zz"
    assert await h.result(first) == "a" * 12
    await h.settle()
    assert h.allocator.num_used_blocks == 0
    h.close()


async def test_with_nothing_decoding_the_last_prompt_that_does_not_fit_is_chunked():
    h = Harness({"a": "aaa", "b": "bbb"})
    chunking(h, prefill_tokens=64, chunk_tokens=16)
    entries = [make_entry(1, "a" * 40), make_entry(2, "b" * 40)]
    for entry in entries:
        h.queue.append(entry)
    assert [await h.result(e) for e in entries] == ["aaa", "bbb"]
    # 40 + 24 fill the first step's 64 tokens; the other 16 ride with request 1's decode.
    assert h.shard.chunks == [(1, 0, 40), (2, 0, 24), (2, 24, 16)]
    assert h.shard.calls[:2] == [("prefill", (1, 2)), ("mixed", (1, 2))]
    h.close()


async def test_prompts_whose_logprobs_are_wanted_are_not_chunked():
    h = Harness({"a": "aaa", "b": "bbb"})
    chunking(h, prefill_tokens=64, chunk_tokens=16)
    details = make_entry(2, "b" * 40)
    details.request = dataclasses.replace(details.request, decoder_input_details=True)
    entries = [make_entry(1, "a" * 40), details]
    for entry in entries:
        h.queue.append(entry)
    assert [await h.result(e) for e in entries] == ["aaa", "bbb"]
    assert (2, 0, 40) in h.shard.chunks  # whole, in a step of its own
    h.close()


async def test_a_prompt_that_cannot_be_chunked_goes_whole_beside_decodes():
    """Not starved behind a running batch that never drains: one mixed step of its own."""
    h = Harness({"a": "a" * 30, "z": "zz"}, gated=True)
    chunking(h, chunk_tokens=4)
    first = make_entry(1, "a")
    h.queue.append(first)
    h.steps(1)
    await h.settle()
    details = make_entry(2, "z" * 10)
    details.request = dataclasses.replace(details.request, decoder_input_details=True)
    h.queue.append(details)
    h.steps(2)
    await h.settle()
    assert (2, 0, 10) in h.shard.chunks
    assert ("mixed", (1, 2)) in h.shard.calls and not first.finished
    h.steps(40)
    assert await h.result(details) == "zz"
    h.close()


async def first_chunk_beside_a_decode() -> tuple[Harness, Entry, Entry]:
    """Request 1 decoding, request 2's first 4-token chunk computed; every step gated."""
    h = Harness({"a": "a" * 30, "z": "zz"}, gated=True)
    chunking(h, chunk_tokens=4)
    h.shard.gate_mixed = True
    first, long = make_entry(1, "a"), make_entry(2, "z" * 10)
    h.queue.append(first)
    h.steps(1)
    await h.settle()
    h.queue.append(long)
    await step_until_chunk(h, (2, 0, 4))
    return h, first, long


async def test_a_request_cancelled_between_chunks_frees_its_blocks():
    h, first, long = await first_chunk_beside_a_decode()
    long.cancel()
    h.steps(3)
    await h.settle()
    # At most the step already formed when it was cancelled runs; no chunk after it.
    assert [c for c in h.shard.chunks if c[0] == 2] in ([(2, 0, 4)], [(2, 0, 4), (2, 4, 4)])
    assert h.shard.calls[-1] == ("decode", (1,))
    assert h.allocator.num_used_blocks == len(first.allocation.blocks)
    h.close()


async def test_a_failed_chunk_step_fails_the_chunked_request_too():
    h, first, long = await first_chunk_beside_a_decode()
    h.shard.fail_next_mixed = True
    h.steps(1)
    for entry in (first, long):
        with pytest.raises(GenerationError):
            await h.final_event(entry)
    await h.settle()
    assert h.allocator.num_used_blocks == 0
    # Still serving, chunks and all.
    again = make_entry(3, "z" * 10)
    h.queue.append(again)
    h.steps(10)
    assert await h.result(again) == "zz"
    h.close()


async def test_a_steps_tokens_reach_the_streams_after_the_next_step_is_sent():
    """The streams' wake-ups queue behind the next request to the shards: the shards start
    the next step before the handlers format and write the last step's tokens."""
    h = Harness({"a": "abcd"})
    entry = make_entry(1, "a")
    events_at_send = []
    decode = h.shard.decode

    def decode_and_look(batches, token_masks=()):
        events_at_send.append(entry.events.qsize())  # the request is created here
        return decode(batches, token_masks)

    h.shard.decode = decode_and_look
    h.queue.append(entry)
    assert await h.result(entry) == "abcd"
    # The prefill gave "a", the decodes "b", "c", "d" and EOS: each decode was sent while
    # the token before it was still held back (0, 1, 2, 3 events queued, never one more).
    assert events_at_send == [0, 1, 2, 3]
    h.close()


async def test_a_budget_spent_exactly_leaves_the_next_prompt_for_the_next_step():
    """A prompt that would get a chunk of 0 tokens is not admitted (the shard reads a
    chunk_len of 0 as 'the whole prompt')."""
    h = Harness({"a": "aaa", "b": "bbb"})
    chunking(h, prefill_tokens=16, chunk_tokens=16)
    entries = [make_entry(1, "a" * 16), make_entry(2, "b" * 10)]
    for entry in entries:
        h.queue.append(entry)
    assert [await h.result(e) for e in entries] == ["aaa", "bbb"]
    assert h.shard.chunks[:2] == [(1, 0, 16), (2, 0, 10)]
    h.close()


# --- the prefix cache ---


async def test_a_shared_prefix_is_computed_once_and_read_by_later_requests():
    h = Harness({"s": "ok"}, prefix_caching=True)
    system = "s" * 13  # 3 full blocks and one token
    first = make_entry(1, system + "hello", 4)
    h.queue.append(first)
    assert await h.result(first) == "ok"
    second = make_entry(2, system + "world", 4)
    h.queue.append(second)
    assert await h.result(second) == "ok"
    # The second request reads the first's 3 full blocks (12 tokens): the fake shard
    # checked that each slot holds the second prompt's own tokens.
    assert h.shard.chunks == [(1, 0, 18), (2, 12, 6)]
    await h.settle()
    assert h.allocator.num_used_blocks == 0 and h.allocator.stats().cached_blocks > 0
    h.close()


async def test_a_finished_request_leaves_its_output_for_the_next_chat_turn():
    h = Harness({"u": "abcdefgh"}, prefix_caching=True)
    turn = make_entry(1, "u" * 8, 8)
    h.queue.append(turn)
    answer = await h.result(turn)
    # 8 prompt + 8 generated: positions 0..14 have KV (the last token's never came).
    follow_up = make_entry(2, "u" * 8 + answer + "more", 4)
    h.queue.append(follow_up)
    await h.result(follow_up)
    assert h.shard.chunks[-1] == (2, 12, 8)  # 3 full blocks of the history were computed
    h.close()


async def test_copies_of_one_prompt_admitted_together_compute_it_once():
    h = Harness({"p": "xy"}, prefix_caching=True)
    copies = [make_entry(i, "p" * 21, 2) for i in range(1, 5)]
    for entry in copies:
        h.queue.append(entry)
    assert [await h.result(e) for e in copies] == ["xy"] * 4
    # The first computes all 21 tokens; the others wait one step and compute only the last 1.
    assert h.shard.chunks == [(1, 0, 21), (2, 20, 1), (3, 20, 1), (4, 20, 1)]
    h.close()


async def test_prompt_logprobs_skip_the_cache():
    h = Harness({"d": "ok"}, prefix_caching=True)
    first = make_entry(1, "d" * 12, 2)
    h.queue.append(first)
    await h.result(first)
    details = make_entry(2, "d" * 12, 2)
    details.request = dataclasses.replace(details.request, decoder_input_details=True)
    h.queue.append(details)
    await h.result(details)
    assert h.shard.chunks[-1] == (2, 0, 12)  # every prompt token's logprob needs its logits
    h.close()


@pytest.mark.parametrize("seed", range(3))
async def test_many_requests_over_shared_prefixes_with_chunks_and_eviction(seed):
    """Prompts from 4 shared prefixes (block-aligned and not), chunked prefill, and a KV
    cache small enough that cached blocks are evicted: every request gets its script and
    every cached slot a prefill reads holds that request's own tokens (the fake shard
    checks each one). Nothing is held at the end."""
    rng = random.Random(seed)
    replies = {c: c * rng.randrange(1, 8) for c in "abcd"}
    h = Harness(replies, num_blocks=40, prefix_caching=True)
    chunking(h, prefill_tokens=24, chunk_tokens=8)
    prefixes = [c * n for c, n in zip("abcd", (4, 7, 12, 17), strict=True)]
    entries = []
    for request_id in range(60):
        prompt = rng.choice(prefixes) + "".join(
            rng.choice("xyz") for _ in range(rng.randrange(1, 9))
        )
        entry = make_entry(request_id, prompt, 8)
        entries.append(entry)
        h.queue.append(entry)
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    results = [await h.result(entry) for entry in entries]
    assert results == [replies[e.request.inputs[0]] for e in entries]
    starts = [start for _, start, _ in h.shard.chunks]
    assert sum(1 for start in starts if start) > 20  # many prompts started past a cached prefix
    assert h.allocator.stats().evictions > 0
    await h.settle()
    assert h.allocator.num_used_blocks == 0
    h.close()


async def test_a_short_request_goes_ahead_of_a_long_prompts_remaining_chunks():
    """While a long prompt is chunked, a newcomer that fits in half the step's budget goes
    in the next step; the long prompt keeps the other half and goes on."""
    h = Harness({"a": "a" * 30, "z": "zz", "s": "ss"}, gated=True)
    h.shard.gate_mixed = True  # every step waits for the test
    chunking(h, chunk_tokens=8)
    first, long, short = make_entry(1, "a"), make_entry(2, "z" * 40), make_entry(3, "s" * 3)
    h.queue.append(first)
    h.steps(1)
    await h.settle()
    h.queue.append(long)
    await step_until_chunk(h, (2, 0, 8))
    h.queue.append(short)
    await step_until_chunk(h, (3, 0, 3))
    # The short prompt's step computed the long prompt's next 5 tokens beside its 3.
    (short_chunk, (request_id, start, length)) = h.shard.chunks[-2:]
    assert short_chunk == (3, 0, 3) and (request_id, length) == (2, 5)
    assert start + length < 40  # the long prompt is not done: the short one went ahead
    h.steps(40)
    assert await h.result(short) == "ss"
    assert await h.result(long) == "zz"
    h.close()
