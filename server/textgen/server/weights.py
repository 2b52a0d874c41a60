"""Read (slices of) tensors from a safetensors checkpoint.

Each layer asks for its own rank's slice, so a shard never materialises the
full tensor of a split weight: `safe_open(...).get_slice` reads only the rows
or columns asked for.

A model converted from GGUF also holds the GGUF's quantized blocks in
`GGUF_BLOCKS_FILE` (written by the launcher's conversion); `blocks` reads them
where the shard's dtype runs on them (`textgen.server.layers.gguf` says when).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from textgen.server.distributed import ParallelGroup
from textgen.server.platform import Platform

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# NOTE: the same path as textgen.launcher.model.GGUF_BLOCKS_FILE, which writes it.
GGUF_BLOCKS_FILE = "quantized/gguf-blocks.safetensors"

Range = tuple[int, int]  # [start, stop)

GGUF_BLOCK = 32  # weights per GGUF block, along the input features
# ggml type name -> (ggml type id, bytes per block)
GGML_TYPES = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}


@dataclass(frozen=True)
class GGUFBlocks:
    """A weight [out, in] as GGUF blocks: `data` is uint8 [out, in / 32 * block bytes]."""

    data: torch.Tensor
    kind: str  # a key of GGML_TYPES

    @property
    def in_features(self) -> int:
        return self.data.shape[1] // GGML_TYPES[self.kind][1] * GGUF_BLOCK

    def columns(self, start: int, stop: int) -> GGUFBlocks | None:
        """Input features [start, stop), or None when they do not fall on block bounds."""
        if start % GGUF_BLOCK or stop % GGUF_BLOCK:
            return None
        size = GGML_TYPES[self.kind][1]
        data = self.data[:, start // GGUF_BLOCK * size : stop // GGUF_BLOCK * size]
        return GGUFBlocks(data.contiguous(), self.kind)


class Weights:
    """The tensors of a checkpoint directory, cast to the platform's dtype and device.

    The layers built from it read their fast paths off `platform`.
    """

    def __init__(self, model_dir: Path, platform: Platform, group: ParallelGroup) -> None:
        self.platform = platform
        self.dtype = platform.dtype
        self.device = platform.device
        self.group = group
        self._files = _tensor_files(Path(model_dir))
        self._handles: dict[Path, object] = {}
        blocks = Path(model_dir) / GGUF_BLOCKS_FILE
        use_blocks = blocks.is_file() and platform.gguf_blocks
        self._blocks = safe_open(str(blocks), framework="pt", device="cpu") if use_blocks else None
        # The file's metadata maps each tensor to its GGUF type.
        self._block_kinds: dict[str, str] = self._blocks.metadata() if use_blocks else {}

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (replicated weights: norms)."""
        return self._cast(self._open(name).get_tensor(name))

    def get_sharded(self, name: str, dim: int) -> torch.Tensor:
        """This rank's equal share of `name` along `dim` (0: rows, 1: columns)."""
        return self.get_range(name, dim, *self.shard_range(name, dim))

    def get_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of `name`, read alone from disk."""
        part = self._open(name).get_slice(name)
        tensor = part[start:stop] if dim == 0 else part[:, start:stop]
        return self._cast(tensor)

    def blocks(
        self, name: str, rows: Range | None = None, columns: Range | None = None
    ) -> GGUFBlocks | None:
        """`name`'s GGUF blocks, rows and input columns [start, stop) of them.

        None when the model has no blocks, this shard does not run on them, the tensor
        is not kept quantized, or the columns do not fall on block bounds.
        """
        kind = self._block_kinds.get(name)
        if kind not in GGML_TYPES:
            return None
        data = self._blocks.get_slice(name)
        data = data[rows[0] : rows[1]] if rows is not None else data[:]
        found = GGUFBlocks(data.contiguous(), kind)
        return found if columns is None else found.columns(*columns)

    def shard_range(self, name: str, dim: int) -> Range:
        """This rank's equal share [start, stop) of `name`'s size along `dim`."""
        size = self._open(name).get_slice(name).get_shape()[dim]
        world_size, rank = self.group.world_size, self.group.rank
        if size % world_size != 0:
            raise ValueError(f"{name}: dim {dim} of size {size} does not split {world_size} ways")
        block = size // world_size
        return rank * block, (rank + 1) * block

    def _open(self, name: str):
        if name not in self._files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint")
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it (single file or sharded with index)."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = [model_dir / SINGLE_FILE] if (model_dir / SINGLE_FILE).exists() else []
    files = files or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    names: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names
