"""resolve_model: every kind of --model-id ends as a local safetensors directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from textgen.launcher import model as model_mod
from textgen.launcher.model import (
    ModelNotFoundError,
    default_cache_dir,
    default_gguf_path,
    resolve_model,
)

pytestmark = pytest.mark.slow  # the session fixture converts the real default model


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def put_in_hub_cache(hub: Path, repo_id: str, source: Path, sha: str) -> Path:
    """The layout huggingface_hub keeps on disk: models--org--name/{refs,snapshots}."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def test_default_model_loads_offline(default_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "generation_config.json").is_file()
    config = AutoConfig.from_pretrained(default_model_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert "quantization_config" not in config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"
    assert tokenizer.chat_template


def test_default_model_keeps_its_gguf_blocks(default_model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(default_model_dir / model_mod.GGUF_BLOCKS_FILE), framework="pt") as f:
        kinds = f.metadata()
        assert set(f.keys()) == set(kinds)
    # 30 layers x 7 projections in Q4_1, and the (tied) embedding in Q8_0
    assert sorted(set(kinds.values())) == ["Q4_1", "Q8_0"]
    assert list(kinds.values()).count("Q4_1") == 30 * 7
    assert kinds["model.embed_tokens.weight"] == "Q8_0"


def test_gguf_blocks_that_do_not_match_a_weight_are_dropped(tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] += 1.0  # no longer what the blocks hold
    target = tmp_path / model_mod.GGUF_BLOCKS_FILE
    model_mod._write_gguf_blocks(gguf, model, target)
    with safe_open(str(target), framework="pt") as f:
        kept = set(f.keys())
    assert "model.layers.3.mlp.up_proj.weight" not in kept
    assert "model.layers.3.mlp.gate_proj.weight" in kept
    assert len(kept) == 30 * 7


def test_a_failure_to_keep_gguf_blocks_does_not_fail_the_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args) -> None:
        raise RuntimeError("an architecture the block mapping does not know")

    monkeypatch.setattr(model_mod, "_write_gguf_blocks", explode)
    out = tmp_path / "converted"
    out.mkdir()
    model_mod._write_gguf_as_safetensors(default_gguf_path(), out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / model_mod.GGUF_BLOCKS_FILE).exists()


def test_default_model_is_converted_once(default_model_dir: Path, model_cache: Path) -> None:
    mtime = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert resolve_model(None, cache_dir=model_cache) == default_model_dir
    assert time.monotonic() - start < 2.0
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in default_model_dir.parent.iterdir() if ".tmp-" in p.name]


def test_a_reinstalled_gguf_reuses_the_conversion(
    default_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """A byte-identical copy with another mtime (a fresh venv's install) is not converted again."""
    copy = tmp_path / default_gguf_path().name
    copy.write_bytes(default_gguf_path().read_bytes())
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    assert resolve_model(str(copy), cache_dir=model_cache) == default_model_dir


def test_gguf_conversions_are_keyed_by_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same bytes share one conversion; other bytes under the same name, size and mtime get
    their own; the contents are hashed once per path, size and mtime."""
    conversions: list[Path] = []

    def fake_write(gguf_path: Path, out: Path) -> None:
        conversions.append(gguf_path)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(gguf_path.read_bytes())

    monkeypatch.setattr(model_mod, "_write_gguf_as_safetensors", fake_write)
    hashed: list[Path] = []
    content_key = model_mod._content_key
    monkeypatch.setattr(model_mod, "_content_key", lambda p: hashed.append(p) or content_key(p))
    cache = tmp_path / "cache"
    paths = {}
    for name, data, mtime in [("a", b"one", 1), ("b", b"one", 2), ("c", b"two", 1)]:
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "m.gguf"
        paths[name].write_bytes(data)
        os.utime(paths[name], ns=(mtime * 10**9, mtime * 10**9))
    a, b, c = (model_mod.convert_gguf(paths[n], cache) for n in "abc")
    assert a == b != c
    assert conversions == [paths["a"], paths["c"]]
    assert model_mod.convert_gguf(paths["b"], cache) == a
    assert hashed == [paths["a"], paths["b"], paths["c"]]  # the last call read the pointer
    pointers = list((cache / "gguf-index").iterdir())
    assert len(pointers) == 3
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in pointers)  # a shared cache


def test_gguf_path_shares_the_conversion(default_model_dir: Path, model_cache: Path) -> None:
    # Same file, same cache key: the explicit path reuses the default's conversion.
    assert resolve_model(str(default_gguf_path()), cache_dir=model_cache) == default_model_dir


def test_dir_with_single_gguf(default_model_dir: Path, model_cache: Path, tmp_path: Path) -> None:
    gguf = default_gguf_path()
    (tmp_path / gguf.name).symlink_to(gguf)
    assert resolve_model(str(tmp_path), cache_dir=model_cache) == default_model_dir


def test_local_dir_is_used_as_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir), cache_dir=tmp_path) == tiny_model_dir
    assert not any(tmp_path.iterdir())  # nothing converted


def test_bin_dir_is_converted_to_safetensors(
    default_model_dir: Path, tmp_path: Path, tiny_model_writer: Callable[..., Path]
) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_model_writer(tmp_path / "bin-model", default_model_dir, safetensors=False)
    resolved = resolve_model(str(source), cache_dir=tmp_path / "cache")
    assert resolved.is_relative_to(tmp_path / "cache")
    assert (resolved / "model.safetensors").is_file()
    assert not list(resolved.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(resolved)
    expected = torch.load(source / "pytorch_model.bin", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])
    assert resolve_model(str(source), cache_dir=tmp_path / "cache") == resolved


def test_hub_id_from_offline_cache(tiny_model_dir: Path, offline_hub: Path) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = put_in_hub_cache(offline_hub, "org/tiny", tiny_model_dir, sha)
    assert resolve_model("org/tiny").resolve() == snapshot.resolve()
    assert resolve_model("org/tiny", revision=sha).resolve() == snapshot.resolve()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model("org/tiny"), local_files_only=True)


def test_hub_id_missing_from_offline_cache(offline_hub: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="'org/absent' not found in the local"):
        resolve_model("org/absent")


def test_hub_revision_missing(tiny_model_dir: Path, offline_hub: Path) -> None:
    put_in_hub_cache(offline_hub, "org/tiny", tiny_model_dir, "a" * 40)
    with pytest.raises(ModelNotFoundError, match="revision 'v9'"):
        resolve_model("org/tiny", revision="v9")


@pytest.mark.parametrize("model_id", ["/no/such/dir", "./missing", "missing.gguf"])
def test_missing_path(model_id: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        resolve_model(model_id, cache_dir=tmp_path)


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path), cache_dir=tmp_path / "cache")


def test_interrupted_conversion_is_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")

    def crash_midway(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_mod, "_write_gguf_as_safetensors", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []

    def write_ok(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"whole")

    monkeypatch.setattr(model_mod, "_write_gguf_as_safetensors", write_ok)
    resolved = resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert (resolved / "model.safetensors").read_bytes() == b"whole"


def test_cache_dir_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TEXTGEN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "textgen"


def run_launcher(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "textgen.launcher", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--model-id", "/no/such/model"], {}),
        (["--model-id", "org/absent"], {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent"}),
    ],
)
def test_cli_missing_model_prints_one_line(args: list[str], env: dict[str, str]) -> None:
    result = run_launcher(*args, **env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model "), result.stderr
