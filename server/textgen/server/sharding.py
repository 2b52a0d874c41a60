"""How a model's dimensions are divided over the ranks of a tensor-parallel group.

Design note. Every split is a contiguous range per rank, balanced so that
sizes differ by at most one unit (`balanced_range`). Attention splits by KV
group (one KV head and the query heads that read it), so each rank keeps
whole groups and its local attention is ordinary GQA:

    9 query heads, 3 KV heads (group of 3), N = 2:
      rank 0: KV heads 0-1, query heads 0-5
      rank 1: KV head  2,   query heads 6-8

With more ranks than KV heads, each KV head is replicated on N / Hkv ranks
and each replica serves an equal part of its group's query heads (vLLM and
TGI do the same). That needs N % Hkv == 0 and Hq % N == 0. The MLP's
intermediate features split unevenly as well (no collective sees their size);
the vocabulary must divide, because the LM head all-gathers equal parts. Any
other shard count is refused with the list of those that work.
"""

from __future__ import annotations

from dataclasses import dataclass


class ShardCountError(ValueError):
    """The model cannot be split over this many shards; the message names the valid counts."""


def balanced_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `size` units go to `parts` parts, the first ones +1."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HeadSplit:
    """This rank's contiguous query heads and the KV heads they read (global indices)."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int

    @classmethod
    def for_rank(cls, num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> HeadSplit:
        if not _heads_split(num_heads, num_kv_heads, world_size):
            raise ShardCountError(
                f"{num_heads} attention heads with {num_kv_heads} KV heads cannot be split "
                f"over {world_size} shards"
            )
        group = num_heads // num_kv_heads
        if world_size <= num_kv_heads:
            kv_start, kv_stop = balanced_range(num_kv_heads, world_size, rank)
            return cls(kv_start * group, (kv_stop - kv_start) * group, kv_start, kv_stop - kv_start)
        # NOTE: replication: world_size / num_kv_heads consecutive ranks share one KV head.
        num_local = num_heads // world_size
        q_start = rank * num_local
        return cls(q_start, num_local, q_start // group, 1)


def _heads_split(num_heads: int, num_kv_heads: int, world_size: int) -> bool:
    if world_size <= num_kv_heads:
        return True
    return world_size % num_kv_heads == 0 and num_heads % world_size == 0


@dataclass(frozen=True)
class ModelDims:
    """The sizes that tensor parallelism divides, as read from an HF config."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf(cls, config) -> ModelDims:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            config.num_attention_heads, num_kv_heads, config.intermediate_size, config.vocab_size
        )

    def can_split(self, world_size: int) -> bool:
        return (
            _heads_split(self.num_heads, self.num_kv_heads, world_size)
            and world_size <= self.intermediate_size
            and self.vocab_size % world_size == 0
        )

    def valid_shard_counts(self) -> list[int]:
        return [n for n in range(1, self.num_heads + 1) if self.can_split(n)]

    def check(self, world_size: int) -> None:
        """Raise ShardCountError naming the valid counts unless `world_size` works."""
        if self.can_split(world_size):
            return
        valid = ", ".join(map(str, self.valid_shard_counts()))
        raise ShardCountError(
            f"--num-shard {world_size} does not fit this model ({self.num_heads} attention "
            f"heads, {self.num_kv_heads} KV heads, vocabulary {self.vocab_size}); "
            f"valid shard counts: {valid}"
        )
