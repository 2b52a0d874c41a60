"""Read (slices of) tensors from a safetensors checkpoint.

Each layer asks for its own rank's slice, so a shard never materialises the
full tensor of a split weight: `safe_open(...).get_slice` reads only the rows
or columns asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from textgen.server.distributed import ParallelGroup

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Weights:
    """The tensors of a checkpoint directory, cast to one dtype on one device."""

    def __init__(
        self, model_dir: Path, dtype: torch.dtype, device: torch.device, group: ParallelGroup
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.group = group
        self._files = _tensor_files(Path(model_dir))
        self._handles: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (replicated weights: norms)."""
        return self._cast(self._open(name).get_tensor(name))

    def get_sharded(self, name: str, dim: int) -> torch.Tensor:
        """This rank's equal share of `name` along `dim` (0: rows, 1: columns)."""
        size = self._open(name).get_slice(name).get_shape()[dim]
        world_size, rank = self.group.world_size, self.group.rank
        if size % world_size != 0:
            raise ValueError(f"{name}: dim {dim} of size {size} does not split {world_size} ways")
        block = size // world_size
        return self.get_range(name, dim, rank * block, (rank + 1) * block)

    def get_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of `name`, read alone from disk."""
        part = self._open(name).get_slice(name)
        tensor = part[start:stop] if dim == 0 else part[:, start:stop]
        return self._cast(tensor)

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
