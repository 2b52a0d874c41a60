"""KV block allocator and prefix cache: the router owns block ids, the shards own the memory.

Design note. Blocks are reference counted. A request holds one reference on
each block of its allocation; the prefix cache (a radix tree, one node per full
block, keyed by the block's token ids under its parent) holds one more on each
block it names. A request whose prompt starts with cached blocks is allocated
those blocks (shared, read-only: the shard writes only positions past
`cache_len`) and new ones for the rest. A block returns to the free list when
its last reference goes; a cached block that no request holds is *evictable*:
it stays cached until an allocation needs room, then the least recently used
evictable leaf goes first (a node's descendants are never held when it is not,
since a request holding a block holds the whole chain before it, so leaves
suffice). Allocation counts evictable blocks as free: nothing waits for room
that eviction could make.

A block is cached only once its KV is computed: a request's full blocks after
each prefill step, and those its output filled when it ends (positions up to
its last token but one: the last token's KV is written by a step that never
came). The cache never names a block whose content could still change.
Block 0 is never handed out: it is reserved for health probes.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockAllocation:
    """The blocks of one request: enough for `num_tokens` tokens; the first
    `num_cached` blocks came from the prefix cache (shared, already computed)."""

    blocks: tuple[int, ...]
    num_tokens: int
    block_size: int
    num_cached: int = 0

    @property
    def cached_tokens(self) -> int:
        return self.num_cached * self.block_size

    def slots(self, num_tokens: int) -> list[int]:
        """KV slot of each of the first `num_tokens` positions."""
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(num_tokens)]


@dataclass(eq=False)
class _Node:
    """One full block of the radix tree: its token ids (the key under its parent)."""

    key: tuple[int, ...]
    block: int
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    last_used: int = 0


@dataclass(frozen=True)
class CacheStats:
    cached_blocks: int
    evictable_blocks: int
    evictions: int


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache must hold at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref_counts = [0] * num_blocks
        self._root = _Node((), 0, None)
        self._nodes: dict[int, _Node] = {}
        """Cached block -> its node."""
        self._num_evictable = 0
        self._lru: list[tuple[int, int, _Node]] = []
        """Heap of (last_used, tie, node): evictable leaves, with stale entries skipped."""
        self._clock = itertools.count(1)
        self._tie = itertools.count()
        self.evictions = 0

    # --- sizes ---

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free, or cached and held by no request."""
        return len(self._free) + self._num_evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests."""
        return self.num_blocks - 1 - self.num_free_blocks

    @property
    def max_tokens(self) -> int:
        """Tokens the allocatable blocks can hold (block 0 excluded)."""
        return (self.num_blocks - 1) * self.block_size

    def stats(self) -> CacheStats:
        return CacheStats(len(self._nodes), self._num_evictable, self.evictions)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- the prefix cache ---

    def lookup(self, token_ids: Sequence[int], max_tokens: int) -> tuple[int, ...]:
        """The cached blocks that hold the longest block-aligned prefix of `token_ids`
        of at most `max_tokens` tokens (none without prefix caching)."""
        if not self.prefix_caching:
            return ()
        bs, node, blocks = self.block_size, self._root, []
        now = next(self._clock)
        for start in range(0, max_tokens - bs + 1, bs):
            child = node.children.get(tuple(token_ids[start : start + bs]))
            if child is None:
                break
            child.last_used = now
            blocks.append(child.block)
            node = child
        return tuple(blocks)

    def cache(self, allocation: BlockAllocation, token_ids: Sequence[int], computed: int) -> None:
        """Name in the cache the full blocks of `allocation` whose KV is computed: those
        holding positions below `computed` of the sequence `token_ids`."""
        if not self.prefix_caching:
            return
        bs, node = self.block_size, self._root
        now = next(self._clock)
        for index in range(min(computed, len(token_ids)) // bs):
            key, block = tuple(token_ids[index * bs : (index + 1) * bs]), allocation.blocks[index]
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(key, block, node)
                self._nodes[block] = child
                self._ref_counts[block] += 1  # the cache's own reference
            elif child.block != block:
                # Another request computed the same blocks at the same time. Stop here: a
                # node goes only under blocks its request holds, so that a held node's
                # ancestors are held too and every unheld node can be evicted, leaf first.
                break
            child.last_used = now
            node = child

    # --- allocation ---

    def can_allocate(self, num_tokens: int, cached: tuple[int, ...] = ()) -> bool:
        # Cached blocks this allocation takes are not available to it as room.
        taken = sum(1 for block in cached if self._ref_counts[block] == 1)
        return self.blocks_needed(num_tokens) - len(cached) <= self.num_free_blocks - taken

    def allocate(self, num_tokens: int, cached: tuple[int, ...] = ()) -> BlockAllocation:
        """Blocks for `num_tokens` tokens: `cached` (from `lookup`) first, then new ones."""
        if not self.can_allocate(num_tokens, cached):
            raise MemoryError(
                f"{self.blocks_needed(num_tokens) - len(cached)} KV blocks needed, "
                f"{self.num_free_blocks} free"
            )
        for block in cached:
            self._hold(block)
        needed = self.blocks_needed(num_tokens) - len(cached)
        if needed > len(self._free):
            self._evict(needed - len(self._free))
        new = tuple(self._free.popleft() for _ in range(needed))
        for block in new:
            self._ref_counts[block] = 1
        return BlockAllocation(cached + new, num_tokens, self.block_size, len(cached))

    def free(self, allocation: BlockAllocation) -> None:
        for block in allocation.blocks:
            self._release(block)

    def _hold(self, block: int) -> None:
        if self._ref_counts[block] == 1 and block in self._nodes:
            self._num_evictable -= 1
        self._ref_counts[block] += 1

    def _release(self, block: int) -> None:
        # NOTE: a block returns to the free list only when its last user lets go.
        self._ref_counts[block] -= 1
        count = self._ref_counts[block]
        if count < 0:
            raise RuntimeError(f"KV block {block} freed twice")
        if count == 0:
            self._free.append(block)
        elif count == 1 and block in self._nodes:
            self._num_evictable += 1
            node = self._nodes[block]
            if not node.children:
                heapq.heappush(self._lru, (node.last_used, next(self._tie), node))

    def _evict(self, count: int) -> None:
        """Free `count` evictable blocks, least recently used leaves first."""
        while count:
            if not self._lru:
                self._rebuild_lru()
            last_used, _, node = heapq.heappop(self._lru)
            if not self._evictable_leaf(node) or node.last_used != last_used:
                if self._evictable_leaf(node):  # touched since: back in at its new time
                    heapq.heappush(self._lru, (node.last_used, next(self._tie), node))
                continue
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            del self._nodes[node.block]
            self._num_evictable -= 1
            self.evictions += 1
            self._release(node.block)
            count -= 1
            if parent is not self._root and self._evictable_leaf(parent):
                heapq.heappush(self._lru, (parent.last_used, next(self._tie), parent))

    def _evictable_leaf(self, node: _Node) -> bool:
        return (
            self._nodes.get(node.block) is node
            and not node.children
            and self._ref_counts[node.block] == 1
        )

    def _rebuild_lru(self) -> None:
        self._lru = [
            (node.last_used, next(self._tie), node)
            for node in self._nodes.values()
            if self._evictable_leaf(node)
        ]
        heapq.heapify(self._lru)
        if not self._lru:
            raise RuntimeError("no evictable KV block, though one was counted")
