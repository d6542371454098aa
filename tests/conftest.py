"""Shared fixtures: every test gets its own edgetl cache and torch hub folder, so nothing leaks between
tests and nothing is ever downloaded (a test that needs weights places them itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session: built-in data sets are written once."""
    return tmp_path_factory.mktemp("edgetl-cache")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, shared_cache: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGETL_CACHE", str(shared_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    # the Hugging Face Hub's cache, empty, and no download from it: a test that needs a file puts it there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `edgetl` entry point in a subprocess (exit codes and stderr as a user sees them)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgetl.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd,
        timeout=900,
    )


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its sha256: equal digests mean an untouched folder."""
    import hashlib

    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """A torch checkpoint small enough to export in seconds: the narrowest MobileNetV2 (the simplest graph of
    our backbones, so lowering is quickest) at 32 px on builtin:shapes, the stage-1 probe only, from random init.
    Shared by every test that exports: none of them writes into it."""
    pytest.importorskip("torch")
    from edgetl.config import FinetuneConfig
    from edgetl.finetune import run_finetune

    os.environ["EDGETL_CACHE"] = str(shared_cache)
    config = FinetuneConfig.of(data="builtin:shapes", backbone="mobilenet_v2", width=0.35, weights="none",
                            image_size=32, epochs_finetune=0, seed=0)
    return run_finetune(config, tmp_path_factory.mktemp("tiny-run"))


def mutate_json(document: dict, path: tuple, replacement: object, delete: bool) -> dict:
    """A deep copy of `document` with the value at `path` (keys and list indices) replaced, or deleted."""
    import json

    document = json.loads(json.dumps(document))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return document
