import pytest

from textgen.router.allocator import BlockAllocator


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
