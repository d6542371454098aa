"""The fine-tuning backends' contract is a type (`backends/training.py`), checked when a backend is loaded: both
frameworks' modules provide every member, and a module that lacks one fails at load, naming it."""

from __future__ import annotations

import sys
import types

import pytest

from edgetl import backends
from edgetl.backends.training import FinetuneBackend, FinetuneTrainer, TimedTrainer, members, missing


@pytest.mark.parametrize("framework", sorted(backends.FINETUNE_MODULES))
def test_each_framework_provides_the_whole_fine_tuning_contract(framework: str) -> None:
    pytest.importorskip("torch" if framework == "torch" else "tf_keras")
    module = backends.load(framework, "finetune")
    assert isinstance(module, FinetuneBackend) and missing(module) == []
    assert set(members(FinetuneTrainer, attributes=False)) <= set(dir(module.Trainer))
    if framework == "torch":  # --time-budget times real steps: torch only (validated in FinetuneConfig)
        assert "measure_speed" in dir(module.Trainer)
    assert isinstance(module.FEATURES_AT_ANY_SIZE, bool) and module.WEIGHTS_FILE


def test_the_contract_names_what_finetune_calls() -> None:
    assert {"Trainer", "session", "launch_if_needed", "build_initial_model", "evaluate", "save_weights",
            "describe", "preprocess_spec", "WEIGHTS_FILE", "LIBRARIES", "FEATURES_AT_ANY_SIZE"} == set(
        members(FinetuneBackend))
    assert {"extract_features", "set_head", "finetune", "evaluate_split", "snapshot", "restore", "log",
            "result", "batchnorm_buffers", "config", "world", "history", "failures"} == set(members(FinetuneTrainer))
    assert set(members(TimedTrainer)) == set(members(FinetuneTrainer)) | {"measure_speed"}


def test_a_module_that_lacks_a_member_fails_at_load_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from edgetl.backends.torch import finetune as complete

    broken = types.ModuleType("edgetl_broken_backend")
    for name in members(FinetuneBackend):
        if name not in ("save_weights", "FEATURES_AT_ANY_SIZE"):
            setattr(broken, name, getattr(complete, name))
    broken.Trainer = type("Trainer", (), {"log": None})
    monkeypatch.setitem(sys.modules, "edgetl_broken_backend", broken)
    monkeypatch.setitem(backends.FINETUNE_MODULES, "torch", "edgetl_broken_backend")
    with pytest.raises(TypeError) as caught:
        backends.load("torch", "finetune")
    message = str(caught.value)
    for name in ("FEATURES_AT_ANY_SIZE", "save_weights", "Trainer.extract_features", "Trainer.result"):
        assert name in message, message
    assert "Trainer.log" not in message
