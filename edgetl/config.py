"""Resolved configuration of every stage, as frozen dataclasses, and the one recipe loader.

The CLI builds them from flags and recipes (`export/recipes/*.toml`, `export/sweeps/*.toml`); `validate()`
turns every bad value into one clear UserError before any heavy import, `ExportConfig.for_backend` refuses
what the checkpoint's backend cannot do (read from `backends/base.CAPABILITIES`), and the resolved dict is
stored in the manifest so a run can be repeated exactly.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import re
import tomllib
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from edgetl.arm64.targets import TARGETS
from edgetl.backbones import HUB_PREFIX, check_image_size, get_backbone, parse_hub_weights
from edgetl.capabilities import CAPABILITIES, FRAMEWORKS, capabilities
from edgetl.errors import UserError, one_of
from edgetl.formats import FORMATS as FORMAT_RECORDS
from edgetl.targets import parse_targets

DEVICES = ("auto", "cpu", "cuda", "mps")
CLASS_WEIGHTS = ("auto", "balanced", "none")
MAX_SEED = 2**32 - 1  # numpy's and torch's generators take any seed from 0 to this one
MAX_THREADS = 1024  # runtimes take a C int; more threads than this is a typo, not a machine


# ------------------------------------------------------------------------------- types of every field
# Every config dataclass is checked against its own type hints here, before any range check: a recipe is
# TOML a person wrote, so `calib = "many"` must be one line naming the key, not a TypeError deep inside a
# comparison. The rules: bool is not a whole number; a whole number is a number; a list field also takes
# one item, or a comma-separated text (what a command-line flag gives).

_WANTED = {bool: ("true or false", "trues or falses"), int: ("a whole number", "whole numbers"),
           float: ("a number", "numbers"), str: ("a text", "texts"), Path: ("a path", "paths")}


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _matches(value: object, hint: Any) -> bool:
    """Whether `value` is of the type `hint` (as the rules above read it)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is tuple:
        if isinstance(value, str) and args[0] is not str:
            return True  # "1,2": each item is parsed (and refused in one line) by the field's own check
        items = value if isinstance(value, list | tuple) else [value]
        return all(_matches(item, args[0]) for item in items)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_whole(value)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, str | os.PathLike)
    return isinstance(value, origin or hint)


def _wanted(hint: Any, plural: bool = False) -> str:
    """What a value of type `hint` is, in the words of an error line."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_wanted(arg, plural) for arg in args if arg is not type(None))
    if origin is tuple:
        return f"a list of {_wanted(args[0], plural=True)}"
    if origin is dict:
        return f"a table of {_wanted(args[1], plural=True)}"
    if hint in _WANTED:
        return _WANTED[hint][plural]
    name = getattr(hint, "__name__", str(hint))
    return f"{name} objects" if plural else f"a {name}"


def _kind(value: object) -> str:
    """What a value is, in the same words."""
    if isinstance(value, bool):
        return "true or false"
    if _is_whole(value):
        return "a whole number"
    if isinstance(value, numbers.Real):
        return "a decimal number"
    if isinstance(value, str):
        return "a text"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a date or time"
    return "nothing" if value is None else f"a {type(value).__name__}"


def shown(value: object, limit: int = 60) -> str:
    """A value as it is written in a recipe (TOML, which for these values reads like JSON), on one short line."""
    try:
        text = json.dumps(list(value) if isinstance(value, tuple) else value, default=str, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key(name: str) -> str:
    """A TOML key as a recipe would write it: bare when it can be, else quoted (it may hold any character)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,60}", name) else shown(name)


@cache
def _hints(config_type: type) -> dict[str, Any]:
    return get_type_hints(config_type)


def type_problems(config_type: type, values: dict[str, Any], prefix: str = "") -> list[str]:
    """One phrase per value of `values` that is not of its field's declared type (unknown keys are skipped:
    the recipe loader refuses them with the valid names)."""
    hints = _flat_hints(config_type)
    defaults = _flat_defaults(config_type)
    problems = []
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or key not in defaults or _matches(value, hint):
            continue
        held = _kind(value)
        items = get_args(hint) if get_origin(hint) is tuple else ()
        if items and isinstance(value, list | tuple):
            bad = next((item for item in value if not _matches(item, items[0])), None)
            held = f"a list holding {shown(bad)}, {_kind(bad)}"
        example = defaults[key]
        if isinstance(example, tuple):
            example = example[:2]
        hint_text = f", e.g. {key} = {shown(example)}" if example not in (None, MISSING, ()) else ""
        problems.append(f"{prefix}{key} = {shown(value)} is {held}; valid: {_wanted(hint)}{hint_text}")
    return problems


def check_types(config: Any) -> None:
    """Every field of a config dataclass against its type hint, before any check compares or parses it."""
    values = (config.flat() if isinstance(config, Sectioned)
              else {f.name: getattr(config, f.name) for f in fields(config)})
    problems = type_problems(type(config), values)
    if problems:
        raise UserError(f"{config.STAGE} settings: {'; '.join(problems)}")


def check_seed(seed: int) -> None:
    """A negative or huge seed would pass here and fail inside numpy or torch, after minutes of work."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed} is not usable; valid: 0 to {MAX_SEED}")


class Checked:
    """A config that `validate()` returns is marked as checked: validating it again returns it as it is, so the CLI
    checks once and the stages, which also take configs built in code, check only what nobody checked. A copy
    made with `dataclasses.replace` is unmarked: its new values are checked again."""

    @property
    def checked(self) -> bool:
        return bool(self.__dict__.get("_checked", False))

    def _mark(self) -> Any:
        object.__setattr__(self, "_checked", True)  # not a field: equality, to_json and replace() ignore it
        return self


class Sectioned(Checked):
    """A config made of sections (frozen dataclasses), whose settings keep flat names unique across them.

    The flat names are what a user writes: flags, `--set key=value` and recipe keys (a recipe may also group them
    under `[section]` tables, and `--set section.key=value` works too). The code reads `config.section.key`, so each
    stage sees only the part it needs. `to_json` writes the sections, with CONFIG_VERSION; `from_json` also reads
    the flat dicts that manifests held before sections existed."""

    @classmethod
    def of(cls, **flat: Any) -> Any:
        """The config with these settings (flat names); what is not given takes its default."""
        layout, grouped = _layout(cls), {}
        unknown = sorted(set(flat) - set(layout))
        if unknown:
            raise TypeError(f"{cls.__name__} has no setting {', '.join(unknown)}")
        for key, value in flat.items():
            grouped.setdefault(layout[key], {})[key] = value
        values = grouped.pop(None, {})
        for name, default in _section_defaults(cls).items():
            values[name] = replace(default, **grouped.get(name, {}))
        return cls(**values)

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name."""
        values: dict[str, Any] = {}
        for f in fields(self):
            held = getattr(self, f.name)
            values.update({g.name: getattr(held, g.name) for g in fields(held)} if f.name in _sections(type(self))
                          else {f.name: held})
        return values

    def with_(self, **flat: Any) -> Any:
        """A copy with these settings changed (flat names), unchecked like any `dataclasses.replace` copy."""
        return type(self).of(**{**self.flat(), **flat})

    def to_json(self) -> dict:
        payload: dict[str, Any] = {"config_version": CONFIG_VERSION}
        for f in fields(self):
            held = getattr(self, f.name)
            payload[f.name] = ({g.name: _jsonable(getattr(held, g.name)) for g in fields(held)}
                               if f.name in _sections(type(self)) else _jsonable(held))
        return payload

    @classmethod
    def settings_of(cls, payload: dict[str, Any]) -> dict[str, Any]:
        """The flat settings a stored config holds: sectioned (config_version 2) or flat (older manifests).
        Settings this edgetl no longer has are dropped; the stored file keeps them."""
        flat: dict[str, Any] = {}
        sections = _sections(cls)
        for key, value in payload.items():
            if key in sections and isinstance(value, dict):
                flat.update(value)
            elif key != "config_version":
                flat[key] = value
        layout = _layout(cls)
        return {key: value for key, value in flat.items() if key in layout}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Any:
        """The config a manifest or a worker's hand-over file stored, of either config version."""
        settings = cls.settings_of(payload)
        for key, hint in _flat_hints(cls).items():  # JSON holds lists where the config holds tuples
            if get_origin(hint) is tuple and isinstance(settings.get(key), list):
                settings[key] = tuple(settings[key])
        return cls.of(**settings)


CONFIG_VERSION = 2  # 1: one flat object of settings (manifests before sections); 2: grouped in sections


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value


@cache
def _sections(config_type: type) -> dict[str, type]:
    """A sectioned config's section fields → their dataclasses (empty for a flat config)."""
    hints = _hints(config_type)
    return {f.name: hints[f.name] for f in fields(config_type)
            if isinstance(hints[f.name], type) and is_dataclass(hints[f.name])}


def _section_defaults(config_type: type) -> dict[str, Any]:
    """Each section of a sectioned config as the config has it by default (a sweep's bench section measures
    with fewer iterations than `edgetl bench` does)."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in fields(config_type) if f.name in _sections(config_type)}


@cache
def _layout(config_type: type) -> dict[str, str | None]:
    """Every flat setting name → the section that holds it (None: the config itself)."""
    sections, layout = _sections(config_type), {}
    for f in fields(config_type):
        if f.name in sections:
            layout.update({g.name: f.name for g in fields(sections[f.name])})
        else:
            layout[f.name] = None
    return layout


@cache
def _flat_hints(config_type: type) -> dict[str, Any]:
    """Each flat setting's declared type."""
    sections = _sections(config_type)
    return {key: _hints(sections[where] if where else config_type)[key]
            for key, where in _layout(config_type).items()}


def _flat_defaults(config_type: type) -> dict[str, Any]:
    """Each flat setting's default (MISSING for one that must be given)."""
    sections = _section_defaults(config_type)
    defaults = {}
    for key, where in _layout(config_type).items():
        defaults[key] = (getattr(sections[where], key) if where
                         else next(f.default for f in fields(config_type) if f.name == key))
    return defaults


@dataclass(frozen=True)
class ModelOptions:
    """The network: which backbone, how wide, at what input size, from which weights, in which framework."""

    backbone: str = "efficientnet_lite0"
    width: float = 1.0
    image_size: int | None = None
    weights: str = "imagenet"
    framework: str = "torch"


@dataclass(frozen=True)
class DataOptions:
    """The images: the folder, how it is split and weighted, and how many processes decode it."""

    data: str = ""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    class_weights: str = "auto"
    workers: int = 0


@dataclass(frozen=True)
class TrainOptions:
    """The hyper-parameters of the two stages and their schedule."""

    epochs_finetune: int | None = None
    unfreeze: int | None = None
    batch_size: int | None = None
    lr_finetune: float = 3e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1
    patience: int = 6
    seed: int = 0
    time_budget: float | None = None  # minutes the whole run may take; the stage-2 schedule is fitted to it
    max_steps: int | None = None  # stage-2 optimizer steps at most (a time budget sets it; None: every epoch's)


@dataclass(frozen=True)
class ScaleOutOptions:
    """Where training runs: the device, processes per machine and machines."""

    device: str = "auto"
    devices: int = 1  # processes (torch) or replicas (keras) per machine, one per GPU
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None  # ADDR:PORT of node rank 0, for several machines
    master_timeout: float = 120.0  # seconds to wait for the master before giving up with one line

    @property
    def world_size(self) -> int:
        """Training processes (torch) or workers × replicas asked for on the command line."""
        return self.devices * self.nnodes


@dataclass(frozen=True)
class FinetuneConfig(Sectioned):
    """Everything that decides a fine-tuning run (with `seed`, it is reproducible on CPU).

    None means "decide from the folder" (`edgetl.recipe.plan`): the input size, the batch size, the
    stage-2 epochs and the blocks it unfreezes (-1: all); `class_weights` "auto" weights classes when they
    are unbalanced. The plan's resolved copy is what trains and what the manifest stores.
    """

    STAGE: ClassVar[str] = "finetune"  # what its settings are called in an error line

    model: ModelOptions = field(default_factory=ModelOptions)
    dataset: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    scale_out: ScaleOutOptions = field(default_factory=ScaleOutOptions)
    recipe: str | None = None  # the fine-tuning recipe (export/finetune/NAME.toml or a path) its values came from

    def validate(self) -> FinetuneConfig:
        """Check every value; return a copy with defaults resolved (image size)."""
        if self.checked:
            return self
        check_types(self)
        size = self._validate_model()
        self._validate_data()
        self._validate_train()
        self._validate_scale_out()
        return replace(self, model=replace(self.model, image_size=size))._mark()

    @property
    def world_size(self) -> int:
        """Training processes (torch) or workers × replicas asked for on the command line."""
        return self.scale_out.world_size

    def _validate_model(self) -> int | None:
        """Backbone, width, framework and weights; returns the input size, checked."""
        model = self.model
        spec = get_backbone(model.backbone)
        spec.check_width(model.width)
        if model.framework not in FRAMEWORKS:
            raise UserError(one_of(model.framework, FRAMEWORKS, "--framework"))
        spec.check_framework(model.framework)
        size = check_image_size(model.image_size) if model.image_size is not None else None
        hub = parse_hub_weights(model.weights)
        if hub is not None and model.framework != "torch":
            raise UserError(f"--weights {model.weights!r} with --framework {model.framework}: Hugging Face Hub "
                            f"weights are torch state dicts; valid: --framework torch, or --weights "
                            f"imagenet/none/PATH")
        if hub is None and model.weights not in ("imagenet", "none") and not Path(model.weights).is_file():
            raise UserError(f"--weights {model.weights!r} is neither 'imagenet', 'none', "
                            f"'{HUB_PREFIX}OWNER/NAME[@REVISION]' nor an existing file")
        if model.weights == "imagenet" and model.framework == "keras":
            spec.keras_weight_source(model.width, size or spec.default_image_size)
        elif model.weights == "imagenet":
            spec.torch_weight_source(model.width)
        return size

    def _validate_data(self) -> None:
        dataset = self.dataset
        if not dataset.data.strip():
            raise UserError("--data is empty; valid: an image folder, or builtin:fashion-mnist-mini / builtin:shapes")
        if dataset.workers < 0:
            raise UserError(f"--workers {dataset.workers} is negative; valid: 0 or more")
        if dataset.class_weights not in CLASS_WEIGHTS:
            raise UserError(one_of(dataset.class_weights, CLASS_WEIGHTS, "--class-weights"))
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(dataset, name) < 0.5:
                raise UserError(f"{name} {getattr(dataset, name):g} is not usable; valid: a share of the images "
                                f"above 0 and below 0.5, e.g. 0.1")

    def _validate_train(self) -> None:
        train = self.train
        for name in ("epochs_finetune", "patience"):
            value = getattr(train, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')} {value} is negative; valid: 0 or more")
        if train.unfreeze is not None and train.unfreeze < -1:
            raise UserError(f"--unfreeze {train.unfreeze} is not usable; valid: -1 (every block), 0 (no stage 2) "
                            f"or a number of top blocks")
        if train.batch_size is not None and train.batch_size < 1:
            raise UserError(f"--batch-size {train.batch_size} is not usable; valid: 1 or more")
        if train.time_budget is not None and not (math.isfinite(train.time_budget) and train.time_budget > 0):
            raise UserError(f"--time-budget {train.time_budget:g} is not usable; valid: minutes above 0, e.g. 5 "
                            f"or 2.5")
        if train.time_budget is not None and self.model.framework != "torch":
            raise UserError(f"--time-budget with --framework {self.model.framework}: the budget times torch "
                            f"training steps; valid: --framework torch, or no --time-budget")
        if train.max_steps is not None and train.max_steps < 0:
            raise UserError(f"max_steps {train.max_steps} is negative; valid: 0 or more")
        check_seed(train.seed)
        if not 0 < train.lr_finetune < 1:
            raise UserError(f"--lr-finetune {train.lr_finetune} is not usable; valid: 0 < lr < 1")
        for name, top in (("weight_decay", 1.0), ("label_smoothing", 1.0), ("warmup_fraction", 1.0)):
            if not 0 <= getattr(train, name) < top:
                raise UserError(f"{name} {getattr(train, name):g} is not usable; valid: 0 or more and below "
                                f"{top:g}")

    def _validate_scale_out(self) -> None:
        """--devices/--nnodes/--node-rank/--master: checks that need no framework (GPU counts come later)."""
        from edgetl.distributed import parse_master

        out, batch = self.scale_out, self.train.batch_size
        if out.device not in DEVICES:
            raise UserError(one_of(out.device, DEVICES, "--device"))
        if out.devices < 1:
            raise UserError(f"--devices {out.devices} is not usable; valid: 1 or more (one process per GPU)")
        if out.nnodes < 1:
            raise UserError(f"--nnodes {out.nnodes} is not usable; valid: 1 or more machines")
        if not 0 <= out.node_rank < out.nnodes:
            raise UserError(f"--node-rank {out.node_rank} does not fit --nnodes {out.nnodes}; "
                            f"valid: 0 to {out.nnodes - 1}")
        if out.nnodes > 1 and not out.master:
            raise UserError(f"--nnodes {out.nnodes} needs --master ADDR:PORT (the address of node rank 0)")
        if out.master:
            parse_master(out.master)
        if out.master_timeout <= 0:
            raise UserError(f"--master-timeout {out.master_timeout} is not usable; valid: seconds > 0")
        if out.device == "mps" and out.devices > 1:
            raise UserError(f"--devices {out.devices} with --device mps: Apple GPUs are one device; valid: 1")
        if batch is not None and batch % out.world_size:
            raise UserError(
                f"--batch-size {batch} is the global batch and must divide evenly over "
                f"{out.world_size} processes (--devices {out.devices} × --nnodes {out.nnodes}); "
                f"valid: a multiple of {out.world_size}"
            )


def _as_list(value: object, lower: bool = True) -> list[str]:
    """'pte,tflite', ['pte', 'tflite'], ('pte',) or one item → a list of texts (no blanks; lower-case unless asked)."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else [value]
    cleaned = [str(item).strip() for item in items if str(item).strip()]
    return [item.lower() for item in cleaned] if lower else cleaned


def _union(attribute: str) -> tuple[str, ...]:
    """Every value of one capability over all backends, in table order (what some backend can do)."""
    return tuple(dict.fromkeys(v for caps in CAPABILITIES.values() for v in getattr(caps, attribute)))


def _owners(attribute: str, value: str) -> str:
    return "/".join(name for name, caps in CAPABILITIES.items() if value in getattr(caps, attribute)) or "no backend"


# ------------------------------------------------------------------------------------------- export

FORMATS = _union("formats")
DEFAULT_FORMATS = tuple(name for name in FORMATS if FORMAT_RECORDS[name].default)  # without --formats
QUANTS = _union("quants")
PRUNE_KINDS = _union("prune_kinds")
PRUNE_NAMES = {"channels": "channel pruning", "magnitude": "magnitude pruning"}
# Measured on the demo model (benchmarks/export_figures.py, docs/HISTORY.md): beyond ~256 images the int8
# top-1 no longer moves, while calibration time keeps growing linearly.
DEFAULT_CALIB = 256
# How `edgetl export` makes int8: "auto" is post-training quantization, then, only for a file over --max-drop, the
# backend's remedies in order of cost (torch: cross-layer equalization, activation ranges per tensor, learned weight
# rounding, float fallback of the layers the user allows, then QAT); "ptq" and "qat" force one method.
INT8_MODES = ("auto", "ptq", "qat")


def parse_prune(value: object) -> tuple[str, float] | None:
    """`"channels:0.5"` → ("channels", 0.5); `"magnitude:0.5"`, a bare `0.5` (the keras meaning) → magnitude."""
    if value is None:
        return None
    text = str(value).strip().lower()
    kind, sep, number = text.partition(":")
    if not sep:
        kind, number = "magnitude", text
    valid = "channels:R (fraction of channels removed) or magnitude:S (fraction of weights zeroed), 0 < R, S < 1"
    if kind not in PRUNE_KINDS:
        raise UserError(f"--prune {value!s} has an unknown form; valid: {valid}")
    try:
        ratio = float(number)
    except ValueError:
        raise UserError(f"--prune {value!s} has an unknown form; valid: {valid}") from None
    if not 0 < ratio < 1:
        raise UserError(f"--prune {value!s}: {ratio:g} is not a usable fraction; valid: {valid}")
    return kind, ratio


def variant_tag(prune: object, qat: bool, quant: str) -> str:
    """File-name suffix of a compressed variant: `-ch50` (channels removed), `-pruned50` (weights zeroed), then
    `-qat` on int8 files that quantization-aware training made. Never rounded: 0.333 is `-pruned33p3`, so two
    sparsities never share a name."""
    spec = parse_prune(prune)
    tag = ""
    if spec is not None:
        percent = f"{100 * spec[1]:g}".replace(".", "p")
        tag = f"-ch{percent}" if spec[0] == "channels" else f"-pruned{percent}"
    return tag + ("-qat" if qat and quant == "int8" else "")


def artifact_name(model: Any, quant: str, fmt: str, tag: str = "") -> str:
    """`efficientnet_lite0-128-int8-ch50-qat.pte`: backbone, width, input size, precision, then `variant_tag`.

    `model` is a checkpoint's model description: a contracts.ModelInfo, or its JSON form."""
    described = model if isinstance(model, dict) else model.to_json()
    width = "" if float(described["width"]) == 1.0 else f"-w{float(described['width']):g}"
    return f"{described['backbone']}{width}-{described['image_size']}-{quant}{tag}.{fmt}"


# Flags as a user types them, for the options that are not plain `--name VALUE`.
_FLAG_TEXT = {"bias_correction": "--no-bias-correction", "fuse_clamp": "fuse_clamp = false",
              "float_layers": "--float-layers", "parts": "--parts",
              "debug_numerics": "--debug-numerics", "debug_blocks": "--debug-blocks"}


@dataclass(frozen=True)
class QuantizationOptions:
    """Which files are made, and how int8 is calibrated."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    quant: tuple[str, ...] = ("fp32", "int8")
    calib: int = DEFAULT_CALIB
    bias_correction: bool = True  # torch: PT2E bias correction of rounded weights
    fuse_clamp: bool = True  # torch: ReLU6 outputs observed after the clamp


@dataclass(frozen=True)
class Int8Policy:
    """How `--int8 auto` reaches the accuracy budget: PTQ first, then the remedies in order of cost."""

    int8: str = "auto"  # one of INT8_MODES; validate() makes `qat` say whether int8 is trained from the start
    qat: bool = False  # quantization-aware training before the int8 export (torch: PT2E QAT; keras: tfmot)
    no_qat: bool = False  # --int8 auto may not use QAT as a remedy (no labels are used then)
    max_drop: float = 1.0
    rounding_layers: int = 8  # torch: how many of the most sensitive layers the learned-rounding remedy optimises
    # torch: layers (names as the sensitivity table prints them) that --int8 auto may keep float when a file is
    # still over --max-drop after learned rounding; the int8 input and output tensors stay int8
    float_layers: tuple[str, ...] = ()
    sensitivity_seconds: float = 60.0  # torch: time budget of the per-layer sensitivity table
    qat_epochs: int | None = None  # epochs of quantization-aware training (None: the backend's default)
    qat_lr: float | None = None  # learning rate of QAT (None: measured default)


@dataclass(frozen=True)
class CompressionOptions:
    """Pruning, and the short fine-tunes that recover from it (QAT's fine-tune takes the images and distillation
    weight from here too)."""

    # "channels:R" (torch: remove a fraction R of channels) or "magnitude:S" (zero a fraction S of weights);
    # a bare number is magnitude sparsity (keras has magnitude only).
    prune: str | float | None = None
    recovery_epochs: int | None = None  # fine-tune epochs of pruning (None: the backend's measured default)
    recovery_lr: float | None = None  # learning rate of the pruning fine-tune (None: measured default)
    tune_images: int | None = None  # training images the short fine-tunes use (None: the whole training split)
    # torch: weight of the dense float model's soft targets (knowledge distillation) in the pruning fine-tune
    # and in QAT, 0 to 1 (None: the measured default of each)
    distill: float | None = None


@dataclass(frozen=True)
class ExportConfig(Sectioned):
    """Everything that decides an export: the files and their quantization, the int8 policy, compression, and
    what the run checks; a recipe sets any field, CLI flags override it."""

    STAGE: ClassVar[str] = "export"  # what its settings are called in an error line

    quantization: QuantizationOptions = field(default_factory=QuantizationOptions)
    policy: Int8Policy = field(default_factory=Int8Policy)
    compression: CompressionOptions = field(default_factory=CompressionOptions)
    seed: int = 0
    threads: int | None = None
    parts: bool = False  # torch: also lower each network block of every .pte on its own (bench --breakdown)
    # torch: compare every block of each int8 file in its runtime with the float model and the Q/DQ graph
    debug_numerics: bool = False
    # torch: the blocks (names as the debugger's table prints them) compared in the runtimes; empty: every block
    debug_blocks: tuple[str, ...] = ()
    recipe: str | None = None

    def validate(self) -> ExportConfig:
        """Every bad value becomes one UserError line before any framework import."""
        if self.checked:
            return self
        check_types(self)
        formats, quant = self._formats_and_quants()
        prune = self.compression.prune
        spec = parse_prune(prune)
        if spec is not None:  # canonical: a float stays a float (keras meaning); a spec string "kind:R"
            prune = spec[1] if isinstance(prune, float | int) or ":" not in str(prune) else f"{spec[0]}:{spec[1]:g}"
        int8 = self._int8_mode(quant)
        float_layers = tuple(dict.fromkeys(_as_list(self.policy.float_layers, lower=False)))
        if float_layers and int8 != "auto":
            raise UserError(f"--float-layers {','.join(float_layers)} is a remedy of --int8 auto (used only while a "
                            f"file is over --max-drop) but --int8 is {int8}; valid: --int8 auto --float-layers NAMES")
        if float_layers and "int8" not in quant:
            raise UserError(f"--float-layers {','.join(float_layers)} applies to int8 files but --quant is "
                            f"{','.join(quant)}; add int8 to --quant")
        debug_blocks = tuple(dict.fromkeys(_as_list(self.debug_blocks, lower=False)))
        if debug_blocks and not self.debug_numerics:
            raise UserError(f"--debug-blocks {','.join(debug_blocks)} selects blocks of the numerics debugger, which "
                            f"is off; valid: --debug-numerics --debug-blocks NAMES")
        if self.debug_numerics and "int8" not in quant:
            raise UserError(f"--debug-numerics compares int8 files with their float model, but --quant is "
                            f"{','.join(quant)}; valid: --quant int8 or fp32,int8")
        self._check_numbers(quant)
        return self.with_(formats=formats, quant=quant, prune=prune, int8=int8, qat=int8 == "qat",
                          float_layers=float_layers, debug_blocks=debug_blocks)._mark()

    def _formats_and_quants(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """--formats and --quant as lists of known names, each once."""
        formats = tuple(dict.fromkeys(_as_list(self.quantization.formats)))
        quant = tuple(dict.fromkeys(_as_list(self.quantization.quant)))
        for flag, values, valid, what in (("--formats", formats, FORMATS, "format"),
                                          ("--quant", quant, QUANTS, "quantization")):
            if not values:
                raise UserError(f"{flag} is empty; valid: {', '.join(valid)}")
            for value in values:
                if value not in valid:
                    raise UserError(one_of(value, valid, what))
        return formats, quant

    def _int8_mode(self, quant: tuple[str, ...]) -> str:
        """--int8 as one of INT8_MODES, agreeing with --qat, --no-qat and --quant."""
        int8 = str(self.policy.int8).strip().lower()
        if int8 not in INT8_MODES:
            raise UserError(one_of(self.policy.int8, INT8_MODES, "--int8 mode"))
        if self.policy.qat and int8 == "ptq":
            raise UserError("--qat asks for int8 by quantization-aware training but --int8 is ptq; valid: --int8 qat "
                            "(same as --qat), or --int8 ptq without --qat")
        int8 = "qat" if self.policy.qat else int8
        if self.policy.no_qat and int8 == "qat":
            raise UserError("--no-qat forbids quantization-aware training but --int8 is qat; valid: --int8 auto "
                            "--no-qat (post-training and learned rounding only), --int8 ptq, or --int8 qat alone")
        if int8 == "qat" and "int8" not in quant:
            raise UserError(f"--int8 qat trains for int8 but --quant is {','.join(quant)}; add int8 to --quant")
        return int8

    def _check_numbers(self, quant: tuple[str, ...]) -> None:
        """Counts, rates and budgets within what they can mean."""
        if not 0 <= self.policy.rounding_layers <= 1000:
            raise UserError(f"--rounding-layers {self.policy.rounding_layers} is not usable; valid: 0 (no learned "
                            f"rounding) to 1000")
        if not 0 <= self.policy.sensitivity_seconds <= 3600:
            raise UserError(f"sensitivity_seconds {self.policy.sensitivity_seconds:g} is not usable; valid: 0 (no "
                            f"table) to 3600")
        if self.compression.recovery_epochs is not None and not 0 <= self.compression.recovery_epochs <= 1000:
            raise UserError(f"recovery_epochs {self.compression.recovery_epochs} is not usable; valid: 0 to 1000")
        if self.policy.qat_epochs is not None and not 1 <= self.policy.qat_epochs <= 1000:
            raise UserError(f"qat_epochs {self.policy.qat_epochs} is not usable; valid: 1 to 1000")
        for name, value in (("recovery_lr", self.compression.recovery_lr), ("qat_lr", self.policy.qat_lr)):
            if value is not None and not 0 < value < 1:
                raise UserError(f"{name} {value:g} is not usable; valid: a learning rate between 0 and 1")
        if self.compression.distill is not None and not 0 <= self.compression.distill <= 1:
            raise UserError(f"--distill {self.compression.distill:g} is not usable; valid: 0 (labels only) to 1 "
                            f"(teacher only)")
        if self.compression.tune_images is not None and self.compression.tune_images < 1:
            raise UserError(f"tune_images {self.compression.tune_images} is not usable; valid: 1 or more training "
                            f"images")
        if "int8" in quant and not 1 <= self.quantization.calib <= 100_000:
            raise UserError(f"--calib {self.quantization.calib} is not usable; valid: 1 or more training images")
        if not 0 <= self.policy.max_drop <= 100:
            raise UserError(f"--max-drop {self.policy.max_drop:g} is not usable; valid: 0 to 100 points of top-1")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UserError(f"--threads {self.threads} is not usable; valid: 1 to {MAX_THREADS}")
        check_seed(self.seed)

    def for_backend(self, framework: object) -> ExportConfig:
        """This config as the checkpoint's backend can honour it, or one UserError line naming what it lacks.

        Formats it cannot make are dropped while at least one requested format remains (the default asks for
        both); precisions, pruning kinds and knobs it lacks are refused rather than ignored."""
        config = self.validate()
        caps = capabilities(framework)
        where = f"this checkpoint's framework is {caps.framework}"
        formats = tuple(f for f in config.quantization.formats if f in caps.formats)
        if not formats:
            raise UserError(f"--formats {','.join(config.quantization.formats)}: a {caps.framework} checkpoint "
                            f"exports to {', '.join('.' + f for f in caps.formats)} only; use --formats "
                            f"{','.join(caps.formats)}, or {caps.hint}")
        missing = [q for q in config.quantization.quant if q not in caps.quants]
        if missing:
            owners = _owners("quants", missing[0])
            raise UserError(f"{', '.join(f'--quant {q}' for q in missing)}: {owners}-only; {where} ({caps.hint})")
        spec = config.prune_spec
        if spec is not None and spec[0] not in caps.prune_kinds:
            valid = " or ".join(f"--prune {kind}:{spec[1]:g}" for kind in caps.prune_kinds)
            raise UserError(f"--prune {config.compression.prune}: {PRUNE_NAMES[spec[0]]} is "
                            f"{_owners('prune_kinds', spec[0])}-only; {where} (valid here: {valid})")
        if config.parts and not any(FORMAT_RECORDS[f].blocks == "lowered" for f in formats):  # nothing lowered
            config = replace(config, parts=False)
        defaults = _flat_defaults(ExportConfig)
        for name, value in config.flat().items():
            if caps.honours(name) or value == defaults[name]:
                continue
            flag = _FLAG_TEXT.get(name) or f"--{name.replace('_', '-')} {value:g}"
            owners = "/".join(n for n, c in CAPABILITIES.items() if c.honours(name))
            raise UserError(f"{flag}: {owners}-only; {where} ({caps.hint})")
        return config.with_(formats=formats)._mark()

    @property
    def prune_spec(self) -> tuple[str, float] | None:
        return parse_prune(self.compression.prune)


# ------------------------------------------------------------------------------------------- sweep


@dataclass(frozen=True)
class Variant:
    """One point of a sweep's grid: ExportConfig fields that differ from the sweep's base export config."""

    name: str
    overrides: dict[str, Any]
    description: str = ""

    @property
    def quant(self) -> str:
        return tuple(self.overrides.get("quant", ("fp32",)))[0]


# The built-in grid. int8-qat and the pruned rows need QAT and channel pruning (torch); export refuses them
# where the backend lacks them and the sweep records that variant as failed.
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32", {"quant": ("fp32",)}, "float32, no compression"),
    Variant("int8-ptq", {"quant": ("int8",), "int8": "ptq"}, "int8 post-training quantization (PT2E, calibrated)"),
    Variant("int8-auto", {"quant": ("int8",), "int8": "auto"},
            "int8 by export's default policy: post-training, then learned rounding and QAT only while over "
            "--max-drop"),
    Variant("int8-qat", {"quant": ("int8",), "qat": True}, "int8 quantization-aware training (PT2E QAT)"),
    Variant("pruned30-int8", {"quant": ("int8",), "prune": "channels:0.3"},
            "30% of prunable channels removed (torch-pruning, recovery fine-tune distilled from the "
            "dense model), then int8 PTQ"),
    Variant("pruned50-int8", {"quant": ("int8",), "prune": "channels:0.5"},
            "50% of prunable channels removed (torch-pruning, recovery fine-tune distilled from the "
            "dense model), then int8 PTQ"),
)}
# ExportConfig fields a variant may not set: the sweep sets them alike for every variant.
SWEEP_LEVEL_FIELDS = ("formats", "max_drop", "threads", "recipe", "parts", "debug_numerics")


def _threads(value: object) -> tuple[int, ...]:
    try:
        threads = tuple(dict.fromkeys(int(v) for v in _as_list(value)))
    except ValueError:
        threads = ()
    if not threads or any(not 1 <= t <= MAX_THREADS for t in threads):
        raise UserError(f"--threads {value!r} is not a comma-separated list of thread counts, 1 to {MAX_THREADS} "
                        f"(e.g. 1 or 1,2)")
    return threads


@dataclass(frozen=True)
class BenchOptions(Checked):
    """What `edgetl bench` measures and how; every field ends up in the results. A sweep holds one, with fewer
    iterations by default, for all its variants."""

    STAGE: ClassVar[str] = "bench"  # what its settings are called in an error line

    targets: tuple[str, ...] = ("host",)
    threads: tuple[int, ...] = (1, 2)
    inputs: Path | None = None
    out: Path | None = None
    iters: int = 50
    warmup: int = 5
    samples: int | None = None
    arm_iters: int = 5
    arm_warmup: int = 2
    arm_samples: int = 50
    allow_modified: bool = False  # benchmark a file whose sha256 no longer matches its export manifest
    remote_python: str = "python3"  # the interpreter device_bench runs with on ssh: targets
    taskset: str | None = None  # CPU list (taskset -c) that pins device_bench on ssh: targets, e.g. big cores
    breakdown: bool = False  # emulated targets: also count each network block of a .tflite on its own

    def validate(self) -> BenchOptions:
        """Targets as their specs (each once, in order) and thread counts as numbers; every bad value is one
        UserError line."""
        if self.checked:
            return self
        check_types(self)
        targets = self.parsed_targets()
        threads = _threads(self.threads)
        for name in ("iters", "arm_iters", "arm_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is not usable; valid: 1 or more")
        if self.samples is not None and self.samples < 1:
            raise UserError(f"--samples {self.samples} is not usable; valid: 1 or more images")
        for name in ("warmup", "arm_warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} {getattr(self, name)} is not usable; valid: 0 or more")
        from edgetl.targets.ssh import check_cores

        check_cores(self.taskset)
        if not self.remote_python.strip() or self.remote_python.startswith("-"):
            raise UserError(f"--remote-python {self.remote_python!r} is not a program; valid: e.g. python3 or "
                            "/home/pi/venv/bin/python")
        if self.breakdown and not any(t.emulated for t in targets):
            raise UserError(f"--breakdown needs an emulated target (it counts guest instructions); --target "
                            f"{','.join(self.targets)!r} has none (valid: add one of "
                            f"{', '.join(n for n, t in TARGETS.items() if t.emulated)})")
        return replace(self, targets=tuple(t.spec for t in targets), threads=threads)._mark()

    def parsed_targets(self) -> list:
        """The targets as objects (edgetl.targets), parsed from their specs."""
        return parse_targets(",".join(_as_list(self.targets, lower=False)))


def _sweep_bench() -> BenchOptions:
    """A sweep measures every variant on every target, with fewer runs than `edgetl bench`: bench top-1 is only a
    cross-check there (accuracy comes from verification over the whole test split), and under qemu every scored
    image costs as much as a counted invoke."""
    return BenchOptions(targets=tuple(TARGETS), threads=(1,), iters=30, samples=100, arm_iters=3, arm_samples=5)


@dataclass(frozen=True)
class SweepConfig(Sectioned):
    """What a sweep makes (variants, formats, the int8 budget) and how it measures them (`bench`, the options of
    `edgetl bench`); a recipe sets any field, CLI flags override it."""

    STAGE: ClassVar[str] = "sweep"  # what its settings are called in an error line

    variants: tuple[str, ...] = tuple(VARIANTS)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_drop: float = 1.0
    calib: int | None = None  # None: export's default
    debug_numerics: bool = False  # every int8 variant's export runs the numerics debugger (export --debug-numerics)
    bench: BenchOptions = field(default_factory=_sweep_bench)
    custom: dict[str, Variant] = field(default_factory=dict)
    recipe: str | None = None

    def known(self) -> dict[str, Variant]:
        return {**VARIANTS, **self.custom}

    def validate(self) -> SweepConfig:
        """Every bad value becomes one UserError line before anything runs."""
        if self.checked:
            return self
        check_types(self)
        variants = tuple(dict.fromkeys(_as_list(self.variants, lower=False)))
        if not variants:
            raise UserError(f"--variants is empty; valid: {', '.join(self.known())}")
        for name in variants:
            if name not in self.known():
                raise UserError(one_of(name, list(self.known()), "variant"))
        formats = tuple(dict.fromkeys(_as_list(self.formats)))
        if not formats:
            raise UserError(f"--formats is empty; valid: {', '.join(FORMATS)}")
        for value in formats:
            if value not in FORMATS:
                raise UserError(one_of(value, FORMATS, "format"))
        if not 0 <= self.max_drop <= 100:
            raise UserError(f"--max-drop {self.max_drop:g} is not usable; valid: 0 to 100 points of top-1")
        if self.bench.out is not None:
            raise UserError(f"out = {shown(str(self.bench.out))}: a sweep writes each variant's bench results in "
                            f"its own folder; valid: the sweep's --out")
        return replace(self, variants=variants, formats=formats, bench=self.bench.validate())._mark()

    def export_config(self, name: str) -> ExportConfig:
        """The ExportConfig of one variant: the sweep's base settings, then the variant's overrides."""
        lowered = any(FORMAT_RECORDS[f].blocks == "lowered" for f in self.formats)
        base: dict[str, Any] = {"formats": self.formats, "max_drop": self.max_drop,
                                "parts": self.bench.breakdown and lowered}  # each block lowered, for bench's breakdown
        if self.calib is not None:
            base["calib"] = self.calib
        overrides = dict(self.known()[name].overrides)
        if isinstance(overrides.get("quant"), str | list | tuple):
            overrides["quant"] = tuple(_as_list(overrides["quant"]))
        if self.debug_numerics and "int8" in overrides.get("quant", QuantizationOptions.quant):  # fp32 variants: none
            base["debug_numerics"] = True
        return ExportConfig.of(**{**base, **overrides})

    def to_json(self) -> dict:
        payload = super().to_json()
        payload["custom"] = {name: asdict(v) for name, v in self.custom.items()}
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SweepConfig:
        """A sweep.json's config, of either config version; its custom variants as Variant records."""
        custom = payload.get("custom") or {}
        config = super().from_json({k: v for k, v in payload.items() if k != "custom"})
        return replace(config, custom={name: Variant(**v) for name, v in custom.items()})


def variant_keys() -> list[str]:
    """What a `[variant.NAME]` table may set: ExportConfig's fields, less those the sweep sets for all."""
    return [key for key in _layout(ExportConfig) if key not in SWEEP_LEVEL_FIELDS]


# ------------------------------------------------------------------------------------ bench and bundle


PLATFORMS = ("android", "ios")


def parse_platforms(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(_as_list(value)))
    if not chosen:
        raise UserError(f"--platform is empty; valid: {', '.join(PLATFORMS)}")
    for item in chosen:
        if item not in PLATFORMS:
            raise UserError(one_of(item, PLATFORMS, "platform"))
    return chosen


@dataclass(frozen=True)
class BundleOptions(Checked):
    """What `edgetl bundle` was asked; defaults are what an app developer wants."""

    STAGE: ClassVar[str] = "bundle"  # what its settings are called in an error line

    artifact: str | None = None
    platforms: tuple[str, ...] = PLATFORMS
    out: Path | None = None
    golden: int = 5
    top_k: int = 3
    metadata: bool = True
    int8_io: bool = False

    def validate(self) -> BundleOptions:
        """Every bad value becomes one UserError line before anything is written."""
        if self.checked:
            return self
        check_types(self)
        if not 1 <= self.golden <= 50:
            raise UserError(f"--golden {self.golden} is not usable; valid: 1 to 50 images")
        return replace(self, platforms=parse_platforms(self.platforms))._mark()


# --------------------------------------------------------------------------------------- recipes

# kind → (folder under export/, what a user calls it, the config it sets, the recipe used when none is named);
# bench and bundle take no recipe (folder None), only `--set key=value`
RECIPES: dict[str, tuple[str | None, str, type, str | None]] = {
    "finetune": ("finetune", "fine-tuning recipe", FinetuneConfig, None),
    "export": ("recipes", "recipe", ExportConfig, None),
    "sweep": ("sweeps", "sweep recipe", SweepConfig, "default"),
    "bench": (None, "bench settings", BenchOptions, None),
    "bundle": (None, "bundle settings", BundleOptions, None),
}
NOT_SETTABLE = {"recipe", "custom"}  # set by --recipe and by a sweep recipe's [variant.NAME] tables
NOT_SETTABLE_IN = {"sweep": {"out"}}  # a sweep names each variant's bench folder itself


def _recipe_folder(kind: str) -> Path:
    from edgetl import assets

    return assets.folder("export") / RECIPES[kind][0]


def recipe_names(kind: str = "export") -> list[str]:
    if RECIPES[kind][0] is None:
        return []
    return sorted(path.stem for path in _recipe_folder(kind).glob("*.toml"))


def settable(kind: str) -> list[str]:
    """The keys a recipe of `kind` and `--set` may set: every field of its config."""
    hidden = NOT_SETTABLE | NOT_SETTABLE_IN.get(kind, set())
    return [key for key in _layout(RECIPES[kind][2]) if key not in hidden]


def _setting_value(text: str, hint: Any) -> object:
    """One `--set` value as its field's type reads it: a text field takes the text as it is (a comma list for a
    list of texts); any other field reads it as a TOML value (3, 0.1, true, [1, 2]), and `none` clears a field
    that may be empty. What is not of the field's type is left for `type_problems` to name in one line."""
    if text.lower() == "none" and _matches(None, hint):
        return None
    if _matches(text, hint) and not text.startswith("["):
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return text


def parse_settings(kind: str, pairs: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """`--set key=value` pairs → the fields they set, each of its field's type, or one UserError line that names
    the pair and the valid keys (a key may be written with - or _)."""
    _, what, config_type, _ = RECIPES[kind]
    keys, hints, values = settable(kind), _flat_hints(config_type), {}
    for pair in pairs or ():
        key, equals, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or not key:
            raise UserError(f"--set {pair!r} is not KEY=VALUE; valid keys for {kind}: {', '.join(keys)}")
        section, dot, name = key.partition(".")
        if dot and _layout(config_type).get(name) == section:  # section.key names the same setting as key
            key = name
        if key not in keys:
            raise UserError(f"--set {_key(key)}: {kind} has no such setting; valid keys: {', '.join(keys)}")
        values[key] = _setting_value(text.strip(), hints[key])
    problems = type_problems(config_type, values, "--set ")
    if problems:
        raise UserError("; ".join(problems))
    return _normalise(values, kind)


def load_recipe(name: str, kind: str = "export") -> dict[str, Any]:
    """A recipe by name (export/recipes/NAME.toml, export/sweeps/NAME.toml) or path → the fields it sets.

    A sweep recipe's `[variant.NAME]` tables define variants beyond the built-in grid (ExportConfig
    overrides plus a description); its `variants` list may then name them. Every key must be a field of the
    kind's config and every value of that field's type: anything else is one UserError line naming the file.
    """
    _, what, config_type, _ = RECIPES[kind]
    path = Path(name)
    if path.suffix != ".toml":
        path = _recipe_folder(kind) / f"{name}.toml"
    if not path.is_file():
        raise UserError(one_of(name, recipe_names(kind), what) + " (or a path to a .toml file)")
    where = f"{what} {str(path)!r}"
    try:
        payload = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; valid: a TOML file") from None
    except OSError as error:
        raise UserError(f"{where} cannot be read ({type(error).__name__}: {error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, ValueError) as error:  # ValueError: a number too long to convert
        raise UserError(f"{where} is not valid TOML ({' '.join(str(error).split())[:200]})") from None
    except RecursionError:
        raise UserError(f"{where} nests too deeply to be a recipe; valid: keys with values, lists of them "
                        f"and tables") from None
    try:
        return _recipe_values(payload, kind, where)
    except RecursionError:
        raise UserError(f"{where} nests too deeply to be a recipe; valid: keys with values, lists of them "
                        f"and tables") from None


def _recipe_values(payload: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """The fields a parsed recipe sets, each checked against its declared type (`type_problems`)."""
    _, _, config_type, _ = RECIPES[kind]
    description = payload.pop("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: description = {shown(description)} is {_kind(description)}; valid: a text")
    tables = payload.pop("variant", {}) if kind == "sweep" else {}
    payload = _ungrouped(payload, config_type, where)
    known = set(settable(kind))
    unknown = sorted(set(payload) - known)
    if unknown:
        raise UserError(f"{where} sets unknown key(s) {', '.join(map(_key, unknown))}; valid: "
                        f"{', '.join(sorted(known))}" + (", [variant.NAME] tables" if kind == "sweep" else ""))
    problems = type_problems(config_type, payload)
    if problems:
        raise UserError(f"{where}: {'; '.join(problems)}")
    custom = _custom_variants(tables, where)
    if custom:
        payload["custom"] = custom
    return _normalise(payload, kind)


def _ungrouped(payload: dict[str, Any], config_type: type, where: str) -> dict[str, Any]:
    """A recipe's `[section]` tables as the flat keys they hold (a key may be set in one place only)."""
    sections, flat = _sections(config_type), {}
    for key, value in payload.items():
        if key not in sections or not isinstance(value, dict):
            flat[key] = value
            continue
        valid = [f.name for f in fields(sections[key])]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise UserError(f"{where}: [{key}] sets unknown key(s) {', '.join(map(_key, unknown))}; valid: "
                            f"{', '.join(valid)}")
        twice = sorted(set(value) & set(payload))
        if twice:
            raise UserError(f"{where} sets {twice[0]} twice, in [{key}] and at the top; valid: one of the two")
        flat.update(value)
    return flat


def _normalise(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """Lists (from TOML or comma-separated flags) as the tuples the configs hold; a value of another type is
    left as it is, for `check_types` to refuse in one line."""
    listed, hints = (str, list, tuple), _flat_hints(RECIPES[kind][2])
    for key in ("formats", "quant", "variants", "targets"):  # only where the config holds a list
        if isinstance(values.get(key), listed) and get_origin(hints.get(key)) is tuple:
            values[key] = tuple(_as_list(values[key], lower=key in ("formats", "quant")))
    threads = hints.get("threads")  # a list of counts in bench and sweep; one count in export
    if get_origin(threads) is tuple and "threads" in values and _matches(values["threads"], threads):
        values["threads"] = _threads(values["threads"])
    return values


def _custom_variants(tables: object, where: str) -> dict[str, Variant]:
    """A sweep recipe's `[variant.NAME]` tables: ExportConfig fields (less the sweep-wide ones), each of its type."""
    if not isinstance(tables, dict):
        raise UserError(f"{where}: variant = {shown(tables)} is {_kind(tables)}; valid: [variant.NAME] tables of "
                        f"export settings")
    custom: dict[str, Variant] = {}
    allowed = variant_keys()
    for variant_name, table in tables.items():
        named = _key(variant_name)
        if not isinstance(table, dict):
            raise UserError(f"{where}: variant.{named} = {shown(table)} is {_kind(table)}; valid: a "
                            f"[variant.{named}] table of export settings")
        table = dict(table)
        description = table.pop("description", "")
        if not isinstance(description, str):
            raise UserError(f"{where}: variant.{named}.description = {shown(description)} is "
                            f"{_kind(description)}; valid: a text")
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise UserError(f"{where}: variant {named if named != variant_name else repr(named)} sets unknown "
                            f"key(s) {', '.join(map(_key, unknown))}; valid: {', '.join(allowed)}")
        problems = type_problems(ExportConfig, table, f"variant.{named}.")
        if problems:
            raise UserError(f"{where}: {'; '.join(problems)}")
        custom[variant_name] = Variant(variant_name, table, description)
    return custom


def resolve(kind: str, recipe: str | None = None, settings: list[str] | tuple[str, ...] | None = None,
            validate: bool = True, **flags: object) -> Any:
    """Defaults ← recipe (the kind's default recipe when none is named) ← `--set` pairs and flags that were given
    (None: not given). A key set both by its flag and by --set is one UserError line: neither silently wins."""
    _, _, config_type, default = RECIPES[kind]
    name = recipe or default
    values: dict[str, Any] = {}
    if recipe or (default and (_recipe_folder(kind) / f"{default}.toml").is_file()):
        values = load_recipe(name, kind)
    given = {k: v for k, v in flags.items() if v is not None}
    chosen = parse_settings(kind, settings)
    twice = sorted(set(given) & set(chosen))
    if twice:
        raise UserError(f"{twice[0]} is set twice, by its own flag and by --set {twice[0]}=…; "
                        f"valid: one of the two")
    values.update({**given, **chosen})
    if "recipe" in _layout(config_type):
        values["recipe"] = name
    values = _normalise(values, kind)
    config = config_type.of(**values) if issubclass(config_type, Sectioned) else config_type(**values)
    if not validate:
        check_types(config)
        return config
    return config.validate()
