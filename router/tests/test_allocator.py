import random

import pytest

from textgen.router.allocator import BlockAllocation, BlockAllocator


def test_block_zero_is_reserved_and_slots_follow_the_block_table():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    assert allocator.num_free_blocks == 3
    allocation = allocator.allocate(6)
    assert 0 not in allocation.blocks
    assert len(allocation.blocks) == 2
    b0, b1 = allocation.blocks
    assert allocation.slots(6) == [b0 * 4, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]


def test_can_allocate_matches_allocate_and_free_returns_blocks():
    allocator = BlockAllocator(num_blocks=4, block_size=4)
    assert allocator.can_allocate(12)
    assert not allocator.can_allocate(13)
    with pytest.raises(MemoryError):
        allocator.allocate(13)
    allocation = allocator.allocate(12)
    assert allocator.num_free_blocks == 0
    allocator.free(allocation)
    assert allocator.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        allocator.free(allocation)


def test_needs_two_blocks():
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=1, block_size=16)


# --- the prefix cache ---

BS = 4


def cached_allocator(num_blocks: int = 16) -> BlockAllocator:
    return BlockAllocator(num_blocks=num_blocks, block_size=BS, prefix_caching=True)


def admit(allocator: BlockAllocator, prompt: list[int], total: int):
    """As the queue admits a request: the cached prefix (at least one token left to compute)."""
    cached = allocator.lookup(prompt, len(prompt) - 1)
    return allocator.allocate(total, cached)


def test_a_finished_prompt_is_matched_by_full_blocks_only_and_shared():
    allocator = cached_allocator()
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks and a partial one
    first = admit(allocator, prompt, 12)
    assert first.num_cached == 0
    allocator.cache(first, prompt, computed=10)
    allocator.free(first)
    assert allocator.num_used_blocks == 0 and allocator.stats().cached_blocks == 2
    second = admit(allocator, [*prompt[:9], 99], 12)
    assert second.blocks[:2] == first.blocks[:2] and second.num_cached == 2
    assert second.cached_tokens == 8
    third = admit(allocator, [*prompt[:5], 77, 78, 79, 80], 12)  # diverges in block 1
    assert third.blocks[:1] == first.blocks[:1] and third.num_cached == 1
    # Shared blocks are held twice; a fourth request would not get them as room.
    assert allocator.num_used_blocks == len(set(second.blocks) | set(third.blocks))


def test_at_least_one_prompt_token_is_computed():
    allocator = cached_allocator()
    prompt = list(range(1, 9))  # exactly 2 blocks
    first = admit(allocator, prompt, 10)
    allocator.cache(first, prompt, computed=8)
    allocator.free(first)
    again = admit(allocator, prompt, 10)
    assert again.num_cached == 1  # the last block holds the token whose logits are needed


def test_only_computed_positions_are_cached():
    allocator = cached_allocator()
    tokens = list(range(1, 13))
    allocation = allocator.allocate(12)
    allocator.cache(
        allocation, tokens, computed=7
    )  # block 1 holds positions 4..7: not all computed
    assert allocator.stats().cached_blocks == 1
    allocator.cache(allocation, tokens, computed=12)
    assert allocator.stats().cached_blocks == 3


def test_eviction_takes_the_least_recently_used_leaf_and_never_a_held_block():
    allocator = cached_allocator(num_blocks=9)  # 8 usable blocks
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]
    cached = {}
    for prompt in (a, b):
        allocation = admit(allocator, [*prompt, 0], 9)
        allocator.cache(allocation, prompt, computed=8)
        allocator.free(allocation)
        cached[tuple(prompt)] = allocation.blocks[:2]
    held = admit(allocator, [*a, 0], 9)  # a's blocks are held again (and touched)
    assert held.num_cached == 2
    assert allocator.num_free_blocks == 8 - 3  # b's 2 cached blocks count as room
    taken = allocator.allocate(4 * 4)  # needs 4 blocks: 3 free + 1 evicted
    assert allocator.stats().evictions == 1
    # b's leaf (its second block) went first; its first block is still cached.
    assert allocator.lookup([*b, 0], 8) == cached[tuple(b)][:1]
    assert cached[tuple(b)][1] in taken.blocks
    assert set(held.blocks).isdisjoint(taken.blocks)
    with pytest.raises(MemoryError):
        allocator.allocate(2 * 4)  # only b's first block is left to evict
    allocator.allocate(4)
    assert allocator.lookup([*b, 0], 8) == ()
    assert allocator.lookup([*a, 0], 8) == cached[tuple(a)]  # held: never evicted


def test_a_duplicate_computed_at_the_same_time_is_not_cached_under_another_request():
    allocator = cached_allocator()
    prompt = list(range(1, 13))
    first, second = allocator.allocate(13), allocator.allocate(13)  # both missed: same prompt
    allocator.cache(first, prompt, computed=12)
    allocator.cache(second, prompt, computed=12)  # its blocks stay private
    assert allocator.stats().cached_blocks == 3
    allocator.free(first)
    allocator.free(second)
    assert allocator.num_used_blocks == 0 and allocator.num_free_blocks == 15


def test_without_prefix_caching_nothing_is_matched_or_kept():
    allocator = BlockAllocator(num_blocks=16, block_size=BS)
    allocation = allocator.allocate(12)
    allocator.cache(allocation, list(range(12)), computed=12)
    allocator.free(allocation)
    assert allocator.lookup(list(range(12)), 11) == ()
    assert allocator.stats().cached_blocks == 0 and allocator.num_free_blocks == 15


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_against_a_model_of_the_expected_state(seed):
    """Thousands of admissions, partial computations and frees, over prompts built from
    shared prefixes, checked after every operation against a plain model: reference
    counts, free blocks, evictable count, and that every block a lookup returns holds
    exactly the tokens of the prefix asked for (the cache is never wrong)."""
    rng = random.Random(seed)
    allocator = cached_allocator(num_blocks=40)
    prefixes = [[rng.randrange(1, 6) for _ in range(rng.randrange(0, 20))] for _ in range(5)]
    content: dict[int, tuple[int, ...]] = {}  # block -> the tokens of the prefix it ends
    live: list[tuple[BlockAllocation, list[int]]] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            allocation, tokens = live.pop(rng.randrange(len(live)))
            computed = rng.randrange(0, len(tokens) + 1)
            _compute(content, allocation, tokens, computed)
            allocator.cache(allocation, tokens, computed)
            allocator.free(allocation)
        else:
            prompt = rng.choice(prefixes) + [
                rng.randrange(1, 6) for _ in range(rng.randrange(1, 12))
            ]
            total = len(prompt) + rng.randrange(0, 8)
            cached = allocator.lookup(prompt, len(prompt) - 1)
            for index, block in enumerate(cached):
                assert content[block] == tuple(prompt[: (index + 1) * BS])
            if not allocator.can_allocate(total, cached):
                with pytest.raises(MemoryError):
                    allocator.allocate(total, cached)
                continue
            allocation = allocator.allocate(total, cached)
            for block in allocation.blocks[len(cached) :]:
                content.pop(block, None)  # a new owner: whatever it held is gone
            if rng.random() < 0.5:  # a prefill step: the prompt's blocks are computed
                _compute(content, allocation, prompt, len(prompt))
                allocator.cache(allocation, prompt, len(prompt))
            live.append((allocation, prompt))
        _check(allocator, [allocation for allocation, _ in live])
    assert allocator.evictions > 0


def _compute(content, allocation, tokens, computed) -> None:
    for index in range(allocation.num_cached, min(computed, len(tokens)) // BS):
        content[allocation.blocks[index]] = tuple(tokens[: (index + 1) * BS])


def _check(allocator: BlockAllocator, live: list[BlockAllocation]) -> None:
    expected = [0] * allocator.num_blocks
    for allocation in live:
        for block in allocation.blocks:
            expected[block] += 1
    for block in allocator._nodes:
        expected[block] += 1
    assert allocator._ref_counts == expected
    free = list(allocator._free)
    assert len(free) == len(set(free)) and all(expected[block] == 0 for block in free)
    assert sorted(free) == [b for b in range(1, allocator.num_blocks) if expected[b] == 0]
    evictable = sum(1 for block in allocator._nodes if expected[block] == 1)
    assert allocator.stats().evictable_blocks == evictable
    for node in allocator._nodes.values():
        parent = node.parent
        if parent is not None and parent.block and expected[node.block] > 1:
            assert expected[parent.block] > 1, "a held node's parent must be held"
