"""Imports run one way: cli → stages → backends → backends/base, and each framework stays in its own place.

Every `import` and `from … import` of edgetl/ is read with ast, top-level and inside functions alike (a lazy
import still runs upward when it runs), and the graph is checked: no cycle; no backend or library module
imports a stage; the two framework backends never import each other; torch and TensorFlow are imported only
where the layout says.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgetl"
STAGES = {"edgetl.cli", "edgetl.finetune", "edgetl.finetune_worker", "edgetl.export", "edgetl.verify",
          "edgetl.bench", "edgetl.sweep", "edgetl.report", "edgetl.bundle", "edgetl.demo"}
BASE = "edgetl.backends.base"
# Third-party packages that only some of edgetl may import (the layout rule of DESIGN.md): the torch stack
# in the torch backend (the ExecuTorch runtime, which needs torch, in formats/pte.py; torch.onnx, the ONNX
# format's converter for torch checkpoints, in formats/onnx.py), TensorFlow in the keras backend.
CONFINED = {
    "torch": ("edgetl.backends.torch", "edgetl.formats.pte", "edgetl.formats.onnx"),
    "torchao": ("edgetl.backends.torch",),
    "torch_pruning": ("edgetl.backends.torch",),
    "litert_torch": ("edgetl.backends.torch",),
    "executorch": ("edgetl.backends.torch", "edgetl.formats.pte"),
    "tensorflow": ("edgetl.backends.keras",),
    "tf_keras": ("edgetl.backends.keras",),
    "tensorflow_model_optimization": ("edgetl.backends.keras",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The edgetl module an import name refers to (a submodule if it is one, else its package), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """The edgetl modules and the third-party top-level packages that `module` imports, anywhere in it.

    `from edgetl.x import name` is an edge to edgetl.x.name when that is a module, else to edgetl.x."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    own, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "edgetl":
                target = _resolve(name)
                if target and target != module:
                    own.add(target)
            elif top != "__future__":
                external.add(top)
    return own, external


GRAPH = {module: imports_of(module)[0] for module in MODULES}


def _layer(module: str) -> str:
    if module in STAGES:
        return "stage"
    if module == BASE:
        return "base"
    if module == "edgetl.backends" or module.startswith("edgetl.backends."):  # the package's `load` too
        return "backend"
    return "library"


def _framework(module: str) -> str | None:
    """torch or keras for a module of a framework backend's package."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 or (len(parts) == 3 and parts[2] in ("torch", "keras")) else None


def test_the_walk_sees_the_package() -> None:
    assert {"edgetl.export", "edgetl.backends.base", "edgetl.backends.torch.backend", "edgetl.formats.tflite",
            "edgetl.contracts"} <= set(MODULES)
    assert "edgetl.backends.base" in GRAPH["edgetl.export"] and "edgetl.contracts" in GRAPH["edgetl.manifest"]


def test_no_module_imports_upward() -> None:
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            layer, target_layer = _layer(module), _layer(target)
            if target_layer == "stage" and layer != "stage":
                upward.append(f"{module} ({layer}) imports the stage {target}")
            elif target_layer == "backend" and layer in ("base", "library"):
                upward.append(f"{module} ({layer}) imports the backend {target}")
            elif layer == "backend" and target_layer == "backend":
                if _framework(module) and _framework(target) and _framework(module) != _framework(target):
                    upward.append(f"{module} imports the other framework's {target}")
            elif layer == "base" and target_layer not in ("library",):
                upward.append(f"{module} (the contract) imports {target}")
    assert upward == []


def test_no_import_cycle() -> None:
    graph = GRAPH
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(CONFINED))
def test_frameworks_are_imported_only_where_the_layout_says(package: str) -> None:
    allowed = CONFINED[package]
    offenders = sorted(m for m in MODULES if package in imports_of(m)[1]
                       and not any(m == a or m.startswith(a + ".") for a in allowed))
    assert offenders == []
