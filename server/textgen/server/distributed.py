"""This shard's place in its tensor-parallel group.

The group is an object passed down to the layers that communicate, never a
module-level global, so a test can build a model with a fake group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ParallelGroup:
    """Rank, world size and the collectives the tensor-parallel layers need."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: object | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self._group = group

    @classmethod
    def initialize(
        cls,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        backend: str = "gloo",
    ) -> ParallelGroup:
        """Join the process group; a single shard needs none.

        `backend` follows the shard's device, chosen once by the caller: gloo
        for CPU tensors, nccl for CUDA ones.
        """
        if world_size == 1:
            return cls()
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
        )
        return cls(rank, world_size, dist.group.WORLD)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self._group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self._group)
        return torch.cat(parts, dim=dim)

    def shutdown(self) -> None:
        """Leave the process group and release it while the interpreter is whole.

        The group object is dropped here, not at interpreter exit: destroying
        gloo's threads and store during finalization can abort the process.
        """
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self._group = None
