"""`--set key=value` on every verb, and fine-tuning recipes: every setting of a stage can be set, also those that
have no flag of their own, and every bad key or value is one line with exit status 2."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from edgetl.config import RECIPES, FinetuneConfig, Sectioned, parse_settings, recipe_names, resolve, settable
from edgetl.errors import UserError
from tests.conftest import run_cli

NO_FLAG = {"weight_decay": 0.02, "label_smoothing": 0.0, "warmup_fraction": 0.25, "val_fraction": 0.2,
           "test_fraction": 0.15}


def test_every_field_of_every_stage_is_settable_except_what_a_recipe_names() -> None:
    for kind, (_, _, config_type, _) in RECIPES.items():
        sectioned = issubclass(config_type, Sectioned)
        names = set(config_type.of().flat()) if sectioned else {f.name for f in fields(config_type)}
        hidden = {"recipe", "custom"} | ({"out"} if kind == "sweep" else set())  # a sweep names its bench folders
        assert set(settable(kind)) == names - hidden, kind


def test_the_five_finetune_settings_without_a_flag_reach_the_config() -> None:
    config = resolve("finetune", None, [f"{key}={value}" for key, value in NO_FLAG.items()], data="builtin:shapes")
    assert {key: config.flat()[key] for key in NO_FLAG} == NO_FLAG
    assert isinstance(config, FinetuneConfig) and config.recipe is None


@pytest.mark.parametrize(("kind", "pair", "expected"), [
    ("finetune", "image_size=none", ("image_size", None)),
    ("finetune", "image-size=160", ("image_size", 160)),  # a key may be written as its flag is
    ("finetune", "weights=none", ("weights", "none")),  # a text field keeps the text "none"
    ("finetune", "master=10.0.0.1:29500", ("master", "10.0.0.1:29500")),
    ("finetune", "train.lr_finetune=0.01", ("lr_finetune", 0.01)),  # section.key names the same setting
    ("finetune", "model.image-size=96", ("image_size", 96)),
    ("export", "formats=tflite", ("formats", ("tflite",))),
    ("export", 'float_layers=["features.0.0", "classifier"]', ("float_layers", ["features.0.0", "classifier"])),
    ("export", "max_drop=0.5", ("max_drop", 0.5)),
    ("export", "max_drop=1", ("max_drop", 1)),
    ("export", "bias_correction=false", ("bias_correction", False)),
    ("sweep", "threads=[1, 2]", ("threads", (1, 2))),
    ("bench", "arm_warmup=0", ("arm_warmup", 0)),
    ("bundle", "platforms=ios,android", ("platforms", "ios,android")),  # validate() splits it, as a flag's
])
def test_a_value_is_read_as_its_field_reads_it(kind: str, pair: str, expected: tuple[str, object]) -> None:
    assert parse_settings(kind, [pair]) == {expected[0]: expected[1]}


@pytest.mark.parametrize(("kind", "pair", "needles"), [
    ("finetune", "no_such_key=1", ["no_such_key", "valid keys", "weight_decay", "test_fraction"]),
    ("finetune", "weight_decay", ["'weight_decay'", "KEY=VALUE"]),
    ("finetune", "=3", ["'=3'", "KEY=VALUE"]),
    ("finetune", "weight_decay=lots", ["weight_decay", '"lots"', "a number"]),
    ("finetune", "seed=1.5", ["seed", "1.5", "a whole number"]),
    ("finetune", "model.lr_finetune=0.01", ["model.lr_finetune", "no such setting", "lr_finetune"]),  # wrong section
    ("export", "qat=maybe", ["qat", "true or false"]),
    ("export", "recipe=all", ["recipe", "no such setting"]),  # --recipe names it
    ("sweep", "custom=1", ["custom", "no such setting"]),
    ("bench", "iters=[1", ["iters", "a whole number"]),
])
def test_a_bad_pair_is_one_line_naming_it(kind: str, pair: str, needles: list[str]) -> None:
    with pytest.raises(UserError) as caught:
        parse_settings(kind, [pair])
    message = str(caught.value)
    assert "\n" not in message and all(needle in message for needle in needles), message


def test_ranges_are_checked_after_the_types_with_the_value_named() -> None:
    for pair, needle in (("val_fraction=0.7", "val_fraction 0.7"), ("label_smoothing=1", "label_smoothing 1"),
                         ("warmup_fraction=-0.1", "warmup_fraction -0.1"), ("weight_decay=2", "weight_decay 2")):
        with pytest.raises(UserError, match=needle):
            resolve("finetune", None, [pair], data="builtin:shapes")


def test_a_key_set_by_its_flag_and_by_set_is_refused_and_the_order_is_defaults_recipe_then_set(
        tmp_path: Path) -> None:
    with pytest.raises(UserError, match="set twice"):
        resolve("export", None, ["calib=64"], calib=32)
    recipe = tmp_path / "mine.toml"
    recipe.write_text('description = "mine"\ncalib = 32\nmax_drop = 0.25\n')
    config = resolve("export", str(recipe), ["calib=64"])
    assert (config.quantization.calib, config.policy.max_drop, config.recipe) == (64, 0.25, str(recipe))


def test_the_built_in_fine_tuning_recipe_and_a_user_recipe(tmp_path: Path) -> None:
    assert "from-scratch" in recipe_names("finetune")
    config = resolve("finetune", "from-scratch", data="builtin:shapes")
    assert (config.model.weights, config.train.lr_finetune, config.train.epochs_finetune, config.recipe) == (
        "none", 3e-3, 8, "from-scratch")
    assert resolve("finetune", "from-scratch", data="builtin:shapes", weights="imagenet").model.weights == "imagenet"
    mine = tmp_path / "smooth.toml"
    mine.write_text("label_smoothing = 0.0\nwarmup_fraction = 0.3\n")
    config = resolve("finetune", str(mine), data="builtin:shapes")
    assert (config.train.label_smoothing, config.train.warmup_fraction) == (0.0, 0.3)
    mine.write_text("label_smothing = 0.0\n")
    with pytest.raises(UserError, match="label_smothing.*label_smoothing"):
        resolve("finetune", str(mine), data="builtin:shapes")


@pytest.mark.parametrize(("args", "needles"), [
    (["finetune", "--data", "builtin:shapes", "--set", "dropout=0.2"], ["dropout", "valid keys", "label_smoothing"]),
    (["finetune", "--data", "builtin:shapes", "--set", "val_fraction=half"], ["val_fraction", '"half"']),
    (["finetune", "--data", "builtin:shapes", "--seed", "3", "--set", "seed=4"], ["seed", "set twice"]),
    (["export", "/nonexistent/checkpoint", "--set", "calib=many"], ["calib", '"many"', "a whole number"]),
    (["sweep", "/nonexistent/checkpoint", "--set", "iterz=3"], ["iterz", "valid keys", "arm_iters"]),
    (["bench", "/nonexistent/export", "--set", "iters=0"], ["--iters 0", "1 or more"]),
    (["bench", "/nonexistent/export", "--target", "host", "--set", "targets=host"], ["targets", "set twice"]),
    (["bundle", "/nonexistent/export", "--set", "golden=99"], ["--golden 99", "1 to 50"]),
])
def test_every_verb_takes_set_and_refuses_a_bad_one_in_one_line(args: list[str], needles: list[str]) -> None:
    done = run_cli(*args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_a_finetune_run_records_and_uses_the_settings_without_a_flag(tmp_path: Path) -> None:
    """Through the real command line: the split follows the val/test fractions set by --set (80 images a class:
    12 test and 16 validation images each, where the defaults take 8 and 8), and the manifest keeps every value."""
    from PIL import Image

    data = tmp_path / "photos"
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (data / label).mkdir(parents=True)
        for i in range(80):
            Image.new("RGB", (24, 24), tuple(min(255, c + i) for c in colour)).save(data / label / f"{i}.png")
    run = tmp_path / "run"
    done = run_cli("finetune", "--data", str(data), "--backbone", "mobilenet_v2", "--width", "0.35",
                   "--weights", "none", "--image-size", "32", "--epochs-finetune", "0", "--out", str(run),
                   *[arg for key, value in NO_FLAG.items() for arg in ("--set", f"{key}={value}")])
    assert done.returncode == 0, done.stderr
    manifest = json.loads((run / "checkpoint" / "manifest.json").read_text())
    stored = FinetuneConfig.settings_of(manifest["config"])
    assert manifest["config"]["config_version"] == 2 and {key: stored[key] for key in NO_FLAG} == NO_FLAG
    assert manifest["data"]["counts"] == {"train": {"blue": 52, "red": 52}, "val": {"blue": 16, "red": 16},
                                          "test": {"blue": 12, "red": 12}}


def test_a_config_is_checked_once_and_a_changed_copy_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CLI resolved, the stage takes as it is: resolve, run_export's validate() and for_backend check the
    values once between them. A copy with changed values is checked again."""

    from edgetl import config as config_module

    calls: list[str] = []
    real = config_module.check_types
    monkeypatch.setattr(config_module, "check_types", lambda c: (calls.append(type(c).__name__), real(c))[1])
    config = resolve("export", None, ["calib=64"], max_drop=0.5)
    assert config.checked and config.validate() is config
    torch_config = config.validate().for_backend("torch")
    assert torch_config.checked and torch_config.validate() is torch_config
    assert calls == ["ExportConfig"]
    changed = config.with_(calib=0)
    assert not changed.checked
    with pytest.raises(UserError, match="--calib 0"):
        changed.validate()
    for kind, flags in (("finetune", {"data": "builtin:shapes"}), ("sweep", {}), ("bundle", {})):
        resolved = resolve(kind, None, None, **flags)
        assert resolved.checked and resolved.validate() is resolved, kind
    assert calls.count("FinetuneConfig") == calls.count("SweepConfig") == calls.count("BundleOptions") == 1


def test_a_recipe_may_group_its_keys_in_sections_and_a_bad_section_key_is_one_line(tmp_path: Path) -> None:
    grouped = tmp_path / "grouped.toml"
    grouped.write_text('description = "d"\nseed = 4\n[model]\nbackbone = "mobilenet_v2"\nwidth = 0.35\n'
                       'weights = "none"\n[train]\nlr_finetune = 0.002\n[scale_out]\ndevice = "cpu"\n')
    config = resolve("finetune", str(grouped), data="builtin:shapes")
    assert (config.model.backbone, config.model.width, config.train.lr_finetune, config.train.seed,
            config.scale_out.device, config.dataset.data) == ("mobilenet_v2", 0.35, 0.002, 4, "cpu", "builtin:shapes")
    for text, needles in (('[model]\nlr_finetune = 0.1\n', ["[model]", "lr_finetune", "valid: backbone"]),
                          ('seed = 1\n[train]\nseed = 2\n', ["seed twice", "[train]"]),
                          ('[train]\nseed = "one"\n', ["seed", '"one"', "a whole number"])):
        grouped.write_text(text)
        with pytest.raises(UserError) as caught:
            resolve("finetune", str(grouped), data="builtin:shapes")
        message = str(caught.value)
        assert "\n" not in message and all(needle in message for needle in needles), message


def test_the_config_is_stored_in_sections_and_a_flat_config_of_older_manifests_still_loads() -> None:
    from edgetl.backends.base import TuneDefaults, trained_settings, tune_for

    config = FinetuneConfig.of(data="builtin:shapes", backbone="mobilenet_v2", weights="none", batch_size=16, seed=7,
                               label_smoothing=0.05, devices=1).validate()
    stored = json.loads(json.dumps(config.to_json()))
    assert stored["config_version"] == 2 and stored["model"]["backbone"] == "mobilenet_v2"
    assert stored["train"]["batch_size"] == 16 and stored["dataset"]["data"] == "builtin:shapes"
    assert FinetuneConfig.from_json(stored) == config
    older = {**config.flat(), "a_setting_since_removed": 1}  # config_version 1: one flat object
    assert FinetuneConfig.from_json(older) == config
    assert trained_settings(older) == trained_settings(stored) == config.flat()
    defaults = TuneDefaults(epochs={"qat": 1}, lr={"qat": 1e-4}, distill={}, weight_decay=0.0)
    export = resolve("export", None, None)
    for manifest_config in (older, stored):
        tune = tune_for(manifest_config, export, "qat", defaults)
        assert (tune.batch_size, tune.seed, tune.label_smoothing) == (16, 7, 0.05)


def test_a_sweep_holds_the_bench_options_it_measures_with() -> None:
    """The sweep's bench section is `edgetl bench`'s own options with the sweep's lighter defaults; each variant is
    measured with it as it is, into its own folder."""
    from edgetl.config import BenchOptions, SweepConfig

    config = resolve("sweep", None, ["arm_warmup=0", "bench.iters=12"], targets="host", threads="2,1")
    assert isinstance(config.bench, BenchOptions) and config.bench.checked
    assert (config.bench.targets, config.bench.threads, config.bench.iters, config.bench.arm_warmup,
            config.bench.samples) == (("host",), (2, 1), 12, 0, 100)
    assert resolve("bench", None, None).iters == BenchOptions().iters == 50  # bench's own defaults stay its own
    stored = json.loads(json.dumps(config.to_json()))
    assert stored["bench"]["threads"] == [2, 1] and stored["config_version"] == 2
    assert SweepConfig.from_json(stored).validate() == config
    older = config.flat()  # a sweep.json of earlier releases: one flat object
    assert SweepConfig.from_json({**older, "custom": {}}).validate() == config
    with pytest.raises(UserError, match="out"):
        parse_settings("sweep", ["out=/tmp/x"])


def test_the_export_settings_come_in_sections_and_a_flat_export_manifest_still_reads() -> None:
    from edgetl.config import ExportConfig

    config = resolve("export", None, ["policy.max_drop=0.25", "compression.prune=channels:0.3", "calib=32"])
    assert (config.policy.max_drop, config.compression.prune, config.quantization.calib) == (0.25, "channels:0.3", 32)
    stored = json.loads(json.dumps(config.to_json()))
    assert stored["config_version"] == 2 and stored["quantization"]["formats"] == ["tflite", "pte"]
    assert ExportConfig.from_json(stored).validate() == config
    older = {**config.flat(), "formats": ["tflite", "pte"], "quant": ["fp32", "int8"]}  # as export manifests held it
    assert ExportConfig.settings_of(older)["max_drop"] == 0.25 and ExportConfig.from_json(older).validate() == config
    with pytest.raises(UserError, match=r"\[policy\] sets unknown key\(s\) calib; valid: int8, qat"):
        from edgetl.config import _recipe_values

        _recipe_values({"policy": {"calib": 3}}, "export", "recipe 'x.toml'")
