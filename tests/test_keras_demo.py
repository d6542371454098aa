"""`edgetl demo --framework keras`: the offline route says plainly that it does not start from ImageNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.keras


def test_unknown_demo_framework_is_one_line() -> None:
    result = run_cli("demo", "--framework", "jax")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "jax" in lines[0] and "keras" in lines[0]


@pytest.mark.slow
def test_keras_demo_fast_offline(tmp_path: Path) -> None:
    pytest.importorskip("tf_keras")
    result = run_cli("demo", "--framework", "keras", "--fast", "--out", str(tmp_path / "demo"),
                     env={"KERAS_HOME": str(tmp_path / "empty-keras-home")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NOT starting from ImageNet" in result.stderr
    manifest = json.loads((tmp_path / "demo" / "checkpoint" / "manifest.json").read_text())
    assert manifest["framework"] == "keras" and manifest["init_weights"]["kind"] == "file"
    export = json.loads((tmp_path / "demo" / "export" / "manifest.json").read_text())
    assert [row["status"] for row in export["verification"]["rows"]] == ["ok", "ok"]
    assert manifest["metrics"]["test"]["top1"] > 0.5  # from scratch, 3 epochs: well above chance (0.1)
