"""Fixtures: the real default model, and the real launcher serving it for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from launcher_process import Launcher, start_launcher, stop_launcher


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from textgen.launcher.model import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def launcher(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Launcher]:
    running = start_launcher(tmp_path_factory.mktemp("launcher"))
    yield running
    stop_launcher(running)
