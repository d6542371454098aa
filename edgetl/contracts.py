"""The files stages hand each other, as typed records: one schema version, one kind per file.

A stage writes its manifest with `to_json()` and the next stage reads it back with `from_json()`, which
checks every field it reads: a damaged or foreign file fails with one UserError line that names the file, the
field, what it holds and what would be valid, never deep inside a framework. Fields a record does not
declare are kept in `extra` and written back unchanged, so a newer file read by an older stage loses nothing.

- `CheckpointManifest` (RUN/checkpoint/manifest.json): what fine-tuning made, with `ModelInfo` and the
  `PreprocessSpec` every later stage applies to pixels.
- `ArtifactSidecar` (RUN/export/<file>.json): what an app or `edgetl bench` needs to use one exported file,
  with its input and output `TensorInfo`.
- `ExportManifest` (RUN/export/manifest.json): every file of an export (`ArtifactEntry`) and its verification.
- `BenchManifest` (RUN/bench/manifest.json): one `BenchRow` per file × target × thread count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NoReturn

from edgetl.errors import UserError

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "edgetl.checkpoint"
ARTIFACT_KIND = "edgetl.artifact"
EXPORT_KIND = "edgetl.export"
BENCH_KIND = "edgetl.bench"
BENCH_RESULT_KIND = "edgetl.bench.result"
BUNDLE_KIND = "edgetl.bundle"
SWEEP_KIND = "edgetl.sweep"

_MISSING = object()


# ------------------------------------------------------------------------------------------- rules


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """How one field is read: what is valid (said in the error), the check, the conversion."""

    valid: str
    check: Callable[[Any], bool] = lambda value: True
    convert: Callable[[Any], Any] = lambda value: value
    optional: bool = False  # missing or null gives the field's default
    record: type | None = None  # a nested record (read with its own rules)
    many: bool = False  # a list of `record`


def optional(rule: Rule) -> Rule:
    return Rule(rule.valid, rule.check, rule.convert, True, rule.record, rule.many)


TEXT = Rule("a non-empty text", lambda v: isinstance(v, str) and bool(v))
SHA256 = Rule("64 hexadecimal digits (sha256)", lambda v: isinstance(v, str) and bool(re.fullmatch("[0-9a-f]{64}", v)))
WHOLE = Rule("a whole number of 1 or more", lambda v: _is_int(v) and v >= 1)
COUNT = Rule("a whole number of 0 or more", lambda v: _is_int(v) and v >= 0)
NUMBER = Rule("a number", _is_number, float)
POSITIVE = Rule("a number above 0", lambda v: _is_number(v) and v > 0, float)
SECONDS = Rule("seconds, 0 or more", lambda v: _is_number(v) and v >= 0, float)
FRACTION = Rule("a number from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1, float)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))
OBJECT = Rule("a JSON object", lambda v: isinstance(v, dict), dict)
ITEMS = Rule("a JSON list", lambda v: isinstance(v, list), list)
LABELS = Rule("a list of one or more texts",
              lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v), tuple)
NUMBERS = Rule("a list of numbers", lambda v: isinstance(v, list) and bool(v) and all(_is_number(x) for x in v),
               lambda v: tuple(float(x) for x in v))
SHAPE = Rule("a list of whole numbers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v), tuple)


def one_of(*choices: str) -> Rule:
    return Rule(", ".join(choices), lambda v: v in choices)


def record(kind: type, many: bool = False) -> Rule:
    return Rule(f"a list of {kind.__name__} objects" if many else f"a {kind.__name__} object", record=kind, many=many)


def _field(rule: Rule, default: Any = None) -> Any:
    if rule.optional:
        factory = default if callable(default) else None
        if factory:
            return field(default_factory=factory, metadata={"rule": rule})
        return field(default=default, metadata={"rule": rule})
    return field(metadata={"rule": rule})


def _fail(source: str, where: str, value: object, valid: str) -> NoReturn:
    shown = "missing" if value is _MISSING or value is None else f"{value!r}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise UserError(f"{source}: field {where!r} is {shown}; valid: {valid}")


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


@dataclass(frozen=True)
class Record:
    """A typed JSON object: declared fields checked on reading, the rest kept in `extra`."""

    KIND: ClassVar[str | None] = None

    @classmethod
    def from_json(cls, payload: object, source: str = "the file", prefix: str = "") -> Any:
        """Read and check `payload` (a parsed JSON object); `source` names the file in error messages."""
        if not isinstance(payload, dict):
            _fail(source, prefix.rstrip(".") or "(the whole file)", payload, f"a JSON object ({cls.__name__})")
        if cls.KIND is not None:
            _check_header(payload, cls.KIND, source)
        values: dict[str, Any] = {}
        declared = {"kind", "schema_version"} if cls.KIND is not None else set()
        for spec in fields(cls):
            if spec.name == "extra":
                continue
            declared.add(spec.name)
            rule: Rule = spec.metadata["rule"]
            value = payload.get(spec.name, _MISSING)
            where = prefix + spec.name
            if value is _MISSING or value is None:
                if not rule.optional:
                    _fail(source, where, value, rule.valid)
                continue
            if rule.record is not None and rule.many:
                if not isinstance(value, list):
                    _fail(source, where, value, rule.valid)
                values[spec.name] = tuple(rule.record.from_json(item, source, f"{where}[{i}].")
                                          for i, item in enumerate(value))
            elif rule.record is not None:
                values[spec.name] = rule.record.from_json(value, source, f"{where}.")
            elif not rule.check(value):
                _fail(source, where, value, rule.valid)
            else:
                values[spec.name] = rule.convert(value)
        extra = {key: value for key, value in payload.items() if key not in declared}
        return cls(**values, extra=extra)

    def to_json(self) -> dict[str, Any]:
        """The JSON object as the stage writes it (kind and schema version first, then the fields)."""
        payload: dict[str, Any] = {}
        if self.KIND is not None:
            payload.update(kind=self.KIND, schema_version=SCHEMA_VERSION)
        for spec in fields(self):
            if spec.name != "extra":
                payload[spec.name] = _plain(getattr(self, spec.name))
        payload.update(getattr(self, "extra", {}))
        return payload


def _check_header(payload: dict, kind: str, source: str) -> None:
    from edgetl import __version__

    if payload.get("kind") != kind:
        raise UserError(f"{source} holds a {payload.get('kind')!r} file, not an {kind!r} one; valid: the file "
                        f"the edgetl stage that makes it wrote")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{source}: schema_version {payload.get('schema_version')!r} is not supported by edgetl "
                        f"{__version__}; supported: {SCHEMA_VERSION}")


# ---------------------------------------------------------------------------------- the records


@dataclass(frozen=True)
class Resize(Record):
    height: int = _field(WHOLE)
    width: int = _field(WHOLE)
    method: str = _field(one_of("bilinear"))
    keep_aspect: bool = _field(FLAG)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PreprocessSpec(Record):
    """How pixels become the model's input: the contract between training, export, verification and apps.

    x[c] = (pixel[c] * scale - mean[c]) / std[c], after an RGB conversion and a resize."""

    color: str = _field(one_of("RGB"))
    resize: Resize = _field(record(Resize))
    scale: float = _field(POSITIVE)
    mean: tuple[float, ...] = _field(NUMBERS)
    std: tuple[float, ...] = _field(NUMBERS)
    layout: str = _field(one_of("NCHW", "NHWC"))
    dtype: str = _field(one_of("float32"))
    extra: dict = field(default_factory=dict)

    def with_layout(self, layout: str) -> dict:
        """The JSON form with `layout` (what the decoding functions of edgetl.data take)."""
        return {**self.to_json(), "layout": layout}


@dataclass(frozen=True)
class ModelInfo(Record):
    """Which network: what rebuilds it (backbone, width, input size, classes); describe() figures in `extra`."""

    backbone: str = _field(TEXT)
    width: float = _field(POSITIVE)
    image_size: int = _field(WHOLE)
    num_classes: int = _field(WHOLE)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TensorInfo(Record):
    """A model file's input or output tensor; quantization None for a float tensor."""

    name: str = _field(Rule("a text", lambda v: isinstance(v, str)))
    dtype: str = _field(TEXT)
    shape: tuple[int, ...] = _field(SHAPE)
    quantization: dict | None = _field(optional(Rule(
        "null or {scale, zero_point}", lambda v: isinstance(v, dict) and _is_number(v.get("scale"))
        and _is_int(v.get("zero_point")))))
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointManifest(Record):
    """RUN/checkpoint/manifest.json, written by `edgetl finetune`."""

    KIND: ClassVar[str] = CHECKPOINT_KIND
    framework: str = _field(TEXT)
    weights_file: str = _field(TEXT)
    weights_sha256: str = _field(SHA256)
    model: ModelInfo = _field(record(ModelInfo))
    labels: tuple[str, ...] = _field(LABELS)
    preprocess: PreprocessSpec = _field(record(PreprocessSpec))
    data: dict = _field(Rule("an object with splits_file", lambda v: isinstance(v, dict)
                             and isinstance(v.get("splits_file"), str) and bool(v["splits_file"])))
    metrics: dict = _field(Rule("an object with test.top1 from 0 to 1", lambda v: isinstance(v, dict)
                                and isinstance(v.get("test"), dict) and _is_number(v["test"].get("top1"))
                                and 0 <= v["test"]["top1"] <= 1))
    created: str | None = _field(optional(TEXT))
    config: dict = _field(optional(OBJECT), dict)
    extra: dict = field(default_factory=dict)

    @property
    def splits_file(self) -> str:
        return self.data["splits_file"]

    @property
    def test_top1(self) -> float:
        return float(self.metrics["test"]["top1"])


@dataclass(frozen=True)
class ArtifactSidecar(Record):
    """RUN/export/<file>.json: everything an app, `edgetl bench` or a person needs to use one exported file."""

    KIND: ClassVar[str] = ARTIFACT_KIND
    file: str = _field(TEXT)
    format: str = _field(one_of("tflite", "pte"))
    quant: str = _field(TEXT)
    runtime: str = _field(TEXT)
    bytes: int = _field(WHOLE)
    sha256: str = _field(SHA256)
    labels: tuple[str, ...] = _field(LABELS)
    model: ModelInfo = _field(record(ModelInfo))
    preprocess: PreprocessSpec = _field(record(PreprocessSpec))
    input: TensorInfo = _field(record(TensorInfo))
    output: TensorInfo = _field(record(TensorInfo))
    labels_file: str = _field(optional(TEXT), "labels.txt")
    framework: str | None = _field(optional(TEXT))
    converter: str | None = _field(optional(TEXT))
    created: str | None = _field(optional(TEXT))
    gzip_bytes: int | None = _field(optional(WHOLE))
    export_seconds: float | None = _field(optional(SECONDS))
    quantization: dict | None = _field(optional(OBJECT))
    pruning: dict | None = _field(optional(OBJECT))
    parent: dict | None = _field(optional(OBJECT))
    delegation: dict | None = _field(optional(OBJECT))
    ops: dict | None = _field(optional(OBJECT))
    weight_sparsity: dict | None = _field(optional(OBJECT))
    verification: dict | None = _field(optional(OBJECT))
    versions: dict = _field(optional(OBJECT), dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactEntry(Record):
    """One line of an export manifest's `artifacts`: a file made (status ok) or why it was not (failed)."""

    file: str = _field(TEXT)
    format: str = _field(one_of("tflite", "pte"))
    quant: str = _field(TEXT)
    status: str = _field(one_of("ok", "failed"))
    error: str | None = _field(optional(TEXT))
    bytes: int | None = _field(optional(WHOLE))
    gzip_bytes: int | None = _field(optional(WHOLE))
    sha256: str | None = _field(optional(SHA256))
    export_seconds: float | None = _field(optional(SECONDS))
    manifest: str | None = _field(optional(TEXT))
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class ExportManifest(Record):
    """RUN/export/manifest.json: every file of one export, and their verification in their runtimes."""

    KIND: ClassVar[str] = EXPORT_KIND
    model: ModelInfo = _field(record(ModelInfo))
    labels: tuple[str, ...] = _field(LABELS)
    preprocess: PreprocessSpec = _field(record(PreprocessSpec))
    artifacts: tuple[ArtifactEntry, ...] = _field(record(ArtifactEntry, many=True))
    verification: dict = _field(Rule("an object with rows", lambda v: isinstance(v, dict)
                                     and isinstance(v.get("rows"), list)))
    framework: str | None = _field(optional(TEXT))
    created: str | None = _field(optional(TEXT))
    parent: dict = _field(optional(OBJECT), dict)
    config: dict = _field(optional(OBJECT), dict)
    test_inputs: dict | None = _field(optional(OBJECT))
    float_reference: dict | None = _field(optional(OBJECT))
    quantization: dict | None = _field(optional(OBJECT))
    pruning: dict | None = _field(optional(OBJECT))
    seconds: float | None = _field(optional(SECONDS))
    versions: dict = _field(optional(OBJECT), dict)
    extra: dict = field(default_factory=dict)

    def made(self) -> list[str]:
        """Files exported without error."""
        return [a.file for a in self.artifacts if a.ok]

    def verified(self) -> dict[str, dict]:
        """Verification rows that ran, by file."""
        return {row["file"]: row for row in self.verification["rows"] if row.get("status") == "ok"}


@dataclass(frozen=True)
class BenchRow(Record):
    """One file × target × thread count as `edgetl bench` measured it (or why it could not)."""

    artifact: str = _field(TEXT)
    target: str = _field(TEXT)
    threads: int = _field(WHOLE)
    failed: str | None = _field(optional(TEXT))
    emulated: bool | None = _field(optional(FLAG))
    runtime: str | None = _field(optional(TEXT))
    p50_ms: float | None = _field(optional(SECONDS))
    p90_ms: float | None = _field(optional(SECONDS))
    load_ms: float | None = _field(optional(SECONDS))
    latency_label: str | None = _field(optional(TEXT))
    top1: float | None = _field(optional(FRACTION))
    top1_samples: int | None = _field(optional(COUNT))
    instructions_per_invoke: int | None = _field(optional(COUNT))
    macs: int | None = _field(optional(COUNT))
    instructions_per_mac: float | None = _field(optional(NUMBER))
    size_bytes: int | None = _field(optional(WHOLE))
    peak_rss_kb: int | None = _field(optional(COUNT))
    model_rss_kb: int | None = _field(optional(COUNT))
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        payload = super().to_json()
        if self.failed is not None:  # a failed run has nothing else to say
            return {key: payload[key] for key in ("artifact", "target", "threads", "failed")} | self.extra
        del payload["failed"]
        return payload


@dataclass(frozen=True)
class BenchManifest(Record):
    """RUN/bench/manifest.json: the rows of one `edgetl bench`, with how they were measured."""

    KIND: ClassVar[str] = BENCH_KIND
    rows: tuple[BenchRow, ...] = _field(record(BenchRow, many=True))
    created: str | None = _field(optional(TEXT))
    edgetl: str | None = _field(optional(TEXT))
    source: dict = _field(optional(OBJECT), dict)
    conditions: dict = _field(optional(OBJECT), dict)
    files: list = _field(optional(ITEMS), list)
    plot: str | None = _field(optional(TEXT))
    int8_fp32_instruction_ratios: list = _field(optional(ITEMS), list)
    arm64_setup: dict | None = _field(optional(OBJECT))
    versions: dict = _field(optional(OBJECT), dict)
    seconds: float | None = _field(optional(SECONDS))
    extra: dict = field(default_factory=dict)


def read(path: Any, kind: type) -> Any:
    """Read a stage file as the record `kind`; a missing or unparsable file is one UserError line too."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} is missing; valid: the {kind.__name__} that edgetl wrote there") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{str(path)!r} cannot be read ({type(error).__name__}: {error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{str(path)!r} is not valid JSON ({error.msg}, line {error.lineno})") from None
    return kind.from_json(payload, repr(str(path)))
