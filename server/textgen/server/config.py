"""The shard's start-up configuration: one frozen dataclass, checked once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
AUTO_DTYPE = "auto"  # the platform's default: bf16 where computed in hardware, else float32
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `textgen-server serve` is started with; the CLI defaults come from here."""

    model_dir: Path
    uds_path: str = "/tmp/textgen-server"
    rank: int = 0
    world_size: int = 1
    dtype: str = AUTO_DTYPE
    kv_cache_memory_gib: float = 1.0
    block_size: int = 16
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    otlp_endpoint: str | None = None
    """OTLP collector for traces; None: tracing off."""
    otlp_service_name: str = "textgen"
    """Shards trace as `{otlp_service_name}.server`."""
    json_output: bool = False
    num_threads: int | None = None  # CPU threads of this shard; None: torch's default (all)
    # GGUF blocks x int8 activations (layers/gguf.py); None: the platform's choice
    int8_activations: bool | None = None
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "int8": a scale per row (kv_cache.py)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.dtype != AUTO_DTYPE and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {[AUTO_DTYPE, *DTYPES]}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be positive")
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be at least 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}"
            )

    @property
    def socket_path(self) -> str:
        """This shard's unix socket file."""
        return shard_socket_path(self.uds_path, self.rank)

    @property
    def kv_cache_memory_bytes(self) -> int:
        return int(self.kv_cache_memory_gib * 2**30)

    def shard_urls(self) -> list[str]:
        """The gRPC address of every shard of the group, ordered by rank."""
        return [f"unix://{shard_socket_path(self.uds_path, r)}" for r in range(self.world_size)]

    @classmethod
    def default(cls, name: str) -> object:
        """The default of one field, so argparse does not restate it."""
        return next(f.default for f in fields(cls) if f.name == name)


def shard_socket_path(uds_path: str, rank: int) -> str:
    return f"{uds_path}-{rank}"
