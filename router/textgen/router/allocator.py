"""KV block allocator: the router owns block ids, the shards own the memory.

Blocks are reference counted so that a later prefix cache can share them
between requests. Block 0 is never handed out: it is reserved for health probes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockAllocation:
    """The blocks of one request: enough for `num_tokens` tokens."""

    blocks: tuple[int, ...]
    num_tokens: int
    block_size: int

    def slots(self, num_tokens: int) -> list[int]:
        """KV slot of each of the first `num_tokens` positions."""
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(num_tokens)]


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache must hold at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    @property
    def max_tokens(self) -> int:
        """Tokens the allocatable blocks can hold (block 0 excluded)."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, num_tokens: int) -> BlockAllocation:
        needed = self.blocks_needed(num_tokens)
        if needed > len(self._free):
            raise MemoryError(f"{needed} KV blocks needed, {len(self._free)} free")
        blocks = tuple(self._free.popleft() for _ in range(needed))
        for block in blocks:
            self._ref_counts[block] = 1
        return BlockAllocation(blocks, num_tokens, self.block_size)

    def free(self, allocation: BlockAllocation) -> None:
        for block in allocation.blocks:
            # NOTE: a block returns to the free list only when its last user lets go.
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
            elif self._ref_counts[block] < 0:
                raise RuntimeError(f"KV block {block} freed twice")
