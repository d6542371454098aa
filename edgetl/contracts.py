"""The files stages hand each other, as typed records: one schema version, one kind per file.

A stage writes its manifest with `to_json()` and the next stage reads it back with `from_json()`, which
checks every field it reads: a damaged or foreign file fails with one UserError line that names the file and,
for every damaged field, what it holds and what would be valid (a field under a broken parent is not
repeated), never deep inside a framework. This is the only place edgetl checks the fields of the files it
reads. Fields a record does not declare are kept in `extra` and written back unchanged, so a newer file read
by an older stage loses nothing.

- `CheckpointManifest` (RUN/checkpoint/manifest.json): what fine-tuning made, with `ModelInfo` and the
  `PreprocessSpec` every later stage applies to pixels; `SplitsFile` (RUN/checkpoint/splits.json): which
  image of the data folder is in which split.
- `ArtifactSidecar` (RUN/export/<file>.json): what an app or `edgetl bench` needs to use one exported file,
  with its input and output `TensorInfo`.
- `ExportManifest` (RUN/export/manifest.json): every file of an export (`ArtifactEntry`) and its verification.
- `BenchManifest` (RUN/bench/manifest.json): one `BenchRow` per file × target × thread count.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from edgetl.backbones import BACKBONES
from edgetl.capabilities import FRAMEWORKS
from edgetl.errors import UserError
from edgetl.formats import FORMATS

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "edgetl.checkpoint"
ARTIFACT_KIND = "edgetl.artifact"
EXPORT_KIND = "edgetl.export"
BENCH_KIND = "edgetl.bench"
BENCH_RESULT_KIND = "edgetl.bench.result"
BUNDLE_KIND = "edgetl.bundle"
SWEEP_KIND = "edgetl.sweep"
SPLITS = ("train", "val", "test")

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
    at: str = ""  # an object kept as it is, whose value at this dotted path is what `check` checks


def optional(rule: Rule) -> Rule:
    return Rule(rule.valid, rule.check, rule.convert, True, rule.record, rule.many, rule.at)


def _lookup(value: object, dotted: str) -> object:
    """The value at a dotted path inside nested objects, or _MISSING where one of them is not there."""
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


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
CHANNEL_NUMBERS = Rule("3 numbers (R, G, B)", lambda v: isinstance(v, list) and len(v) == 3
                       and all(_is_number(x) for x in v), lambda v: tuple(float(x) for x in v))
CHANNEL_SCALES = Rule("3 positive numbers (R, G, B)", lambda v: isinstance(v, list) and len(v) == 3
                      and all(_is_number(x) and x > 0 for x in v), lambda v: tuple(float(x) for x in v))
FILE_NAME = Rule("a file name in the checkpoint folder (no path, not hidden)",
                 lambda v: isinstance(v, str) and bool(v) and not v.startswith(".")
                 and not any(c in v for c in "/\\\x00"))
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


def _shown(value: object) -> str:
    """A value as its JSON text, on one line and short ("32" is a text, 32 a number)."""
    if value is None:
        return "null"
    text = json.dumps(_plain(value), default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(where: str, value: object, valid: str) -> str:
    """One damaged field, as it goes into the error line."""
    held = "missing" if value is _MISSING else f"{_shown(value)}"
    return f"{where} is {held} (valid: {valid})"


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
    TITLE: ClassVar[str] = "file"  # what the file is called in an error line
    FIX: ClassVar[str] = ""  # what the user can do about a damaged one

    @classmethod
    def from_json(cls, payload: object, source: str = "the file", prefix: str = "") -> Any:
        """Read and check `payload` (a parsed JSON object); `source` names the file in the error line, which
        lists every damaged field."""
        if cls.KIND is not None and isinstance(payload, dict):
            _check_header(payload, cls.KIND, source)
        record, problems = cls.parse(payload, prefix)
        if problems:
            raise damaged(source, problems, cls.FIX)
        return record

    @classmethod
    def parse(cls, payload: object, prefix: str = "") -> tuple[Any, list[str]]:
        """The record and [] when every field is usable, else None and one phrase per damaged field."""
        if not isinstance(payload, dict):
            return None, [_problem(prefix.rstrip(".") or "the whole file", payload,
                                   f"a JSON object ({cls.__name__})")]
        values: dict[str, Any] = {}
        problems: list[str] = []
        declared = {"kind", "schema_version"} if cls.KIND is not None else set()
        for spec in fields(cls):
            if spec.name == "extra":
                continue
            declared.add(spec.name)
            rule: Rule = spec.metadata["rule"]
            value = payload.get(spec.name, _MISSING)
            where = prefix + spec.name
            if rule.at:  # the object may hold anything else; the value it must hold is checked where it is
                inner = _lookup(value, rule.at)
                if inner is _MISSING or not rule.check(inner):
                    problems.append(_problem(f"{where}.{rule.at}", inner, rule.valid))
                else:
                    values[spec.name] = value
                continue
            if value is _MISSING or (value is None and rule.optional):
                if not rule.optional:
                    problems.append(_problem(where, value, rule.valid))
                continue
            if rule.record is not None and rule.many:
                if not isinstance(value, list):
                    problems.append(_problem(where, value, rule.valid))
                    continue
                items = [rule.record.parse(item, f"{where}[{i}].") for i, item in enumerate(value)]
                problems += [phrase for _, found in items for phrase in found]
                values[spec.name] = tuple(item for item, _ in items)
            elif rule.record is not None:
                values[spec.name], found = rule.record.parse(value, f"{where}.")
                problems += found
            elif not rule.check(value):
                problems.append(_problem(where, value, rule.valid))
            else:
                values[spec.name] = rule.convert(value)
        if problems:
            return None, problems
        extra = {key: value for key, value in payload.items() if key not in declared}
        record = cls(**values, extra=extra)
        return record, record.inconsistencies(prefix)

    def inconsistencies(self, prefix: str = "") -> list[str]:
        """Problems between fields that are each usable alone (none by default)."""
        return []

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


def damaged(source: str, problems: list[str], fix: str = "") -> UserError:
    """The one line for a file with damaged fields: the file, then each problem."""
    return UserError(f"{source} is damaged: {'; '.join(problems)}" + (f"; {fix}" if fix else ""))


def _check_header(payload: dict, kind: str, source: str) -> None:
    from edgetl import __version__

    held = payload.get("kind", _MISSING)
    if held != kind:  # shown short: a damaged file may hold anything there, of any length
        named = repr(held) if isinstance(held, str) and len(held) <= 60 else _shown(held)
        raise UserError(f"{source} holds {'no kind' if held is _MISSING else f'a {named} file'}, not an "
                        f"{kind!r} one; valid: the file the edgetl stage that makes it wrote")
    version = payload.get("schema_version", _MISSING)
    if not (_is_int(version) and version == SCHEMA_VERSION):  # true == 1 in Python, not in the file
        raise UserError(f"{source}: schema_version {'missing' if version is _MISSING else _shown(version)} is not "
                        f"supported by edgetl {__version__}; supported: {SCHEMA_VERSION}")


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
    mean: tuple[float, ...] = _field(CHANNEL_NUMBERS)
    std: tuple[float, ...] = _field(CHANNEL_SCALES)
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
    image_size: int = _field(Rule("a whole number of pixels, 8 or more", lambda v: _is_int(v) and v >= 8))
    num_classes: int = _field(Rule("a whole number, 2 or more", lambda v: _is_int(v) and v >= 2))
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
    TITLE: ClassVar[str] = "checkpoint manifest"
    framework: str = _field(one_of(*FRAMEWORKS))
    weights_file: str = _field(FILE_NAME)
    weights_sha256: str = _field(SHA256)
    model: ModelInfo = _field(record(ModelInfo))
    labels: tuple[str, ...] = _field(LABELS)
    preprocess: PreprocessSpec = _field(record(PreprocessSpec))
    data: dict = _field(Rule(FILE_NAME.valid, FILE_NAME.check, at="splits_file"))
    metrics: dict = _field(Rule(FRACTION.valid, FRACTION.check, at="test.top1"))
    created: str | None = _field(optional(TEXT))
    config: dict = _field(optional(OBJECT), dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, payload: object, prefix: str = "") -> tuple[Any, list[str]]:
        """ModelInfo's rules, and a backbone edgetl can rebuild to load the weights into (a sidecar's model may
        be any network; a checkpoint's must be one of edgetl's)."""
        record, problems = super().parse(payload, prefix)
        backbone = _lookup(payload, "model.backbone")
        if isinstance(backbone, str) and backbone not in BACKBONES:
            problems.append(_problem(f"{prefix}model.backbone", backbone,
                                     f"a backbone edgetl knows ({', '.join(BACKBONES)})"))
        return (None if problems else record), problems

    def inconsistencies(self, prefix: str = "") -> list[str]:
        """One label per model output, or the apps would show the wrong names (or fail deep in a metadata tool)."""
        if len(self.labels) == self.model.num_classes:
            return []
        return [f"{prefix}labels lists {len(self.labels)} labels but the model has {self.model.num_classes} outputs "
                f"({prefix}model.num_classes); they must match one to one: fine-tune again or fix the manifest"]

    @property
    def splits_file(self) -> str:
        return self.data["splits_file"]

    @property
    def test_top1(self) -> float:
        return float(self.metrics["test"]["top1"])


def _entry_problem(entry: object, classes: int) -> str | None:
    """What is wrong with one [relative path, label index] of a split, or None."""
    if not (isinstance(entry, list) and len(entry) == 2):
        return f"{_shown(entry)} is not [relative path, label index]"
    rel, label = entry
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/") or "\x00" in rel:
        return f"path {_shown(rel)} is not a relative path inside the data folder"
    if not _is_int(label) or not 0 <= label < classes:
        return f"label {_shown(label)} of {rel!r} is not an index from 0 to {classes - 1}"
    return None


@dataclass(frozen=True)
class SplitsFile(Record):
    """RUN/checkpoint/splits.json (a data.DatasetListing as JSON): the data folder and each split's images."""

    TITLE: ClassVar[str] = "splits file"
    FIX: ClassVar[str] = "fine-tune again to rewrite it"
    root: str = _field(Rule("the data folder's path", lambda v: isinstance(v, str) and bool(v)))
    source: str = _field(Rule("a text", lambda v: isinstance(v, str)))
    split_origin: str = _field(Rule("a text", lambda v: isinstance(v, str)))
    classes: tuple[str, ...] = _field(LABELS)
    splits: dict = _field(Rule(f"an object with {', '.join(SPLITS[:-1])} and {SPLITS[-1]} lists",
                               lambda v: isinstance(v, dict) and all(isinstance(v.get(s), list) for s in SPLITS)))
    extra: dict = field(default_factory=dict)

    def inconsistencies(self, prefix: str = "") -> list[str]:
        """The first entry of each split that does not name an image of the data folder and a class."""
        found = []
        for split in SPLITS:
            bad = next((p for p in (_entry_problem(e, len(self.classes)) for e in self.splits[split]) if p), None)
            if bad:
                found.append(f"{prefix}splits.{split}: {bad}")
        return found

    def classes_problems(self, labels: list[str] | tuple[str, ...]) -> list[str]:
        """The splits must index the checkpoint's own labels."""
        if list(self.classes) == list(labels):
            return []
        return [_problem("classes", self.classes, f"the checkpoint's labels {_shown(list(labels))}")]


@dataclass(frozen=True)
class ArtifactSidecar(Record):
    """RUN/export/<file>.json: everything an app, `edgetl bench` or a person needs to use one exported file."""

    KIND: ClassVar[str] = ARTIFACT_KIND
    TITLE: ClassVar[str] = "artifact manifest"
    file: str = _field(TEXT)
    format: str = _field(one_of(*FORMATS))
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
    format: str = _field(one_of(*FORMATS))
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
    TITLE: ClassVar[str] = "export manifest"
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
    numerics: dict | None = _field(optional(OBJECT))  # --debug-numerics: per block, each runtime against the graph
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
    modified_since_export: bool = _field(optional(FLAG), False)  # bench --allow-modified ran a changed file
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        payload = super().to_json()
        if self.failed is not None:  # a failed run has nothing else to say
            return {key: payload[key] for key in ("artifact", "target", "threads", "failed")} | self.extra
        del payload["failed"]
        if not self.modified_since_export:  # said only of the rows it is true of
            del payload["modified_since_export"]
        return payload


@dataclass(frozen=True)
class BenchManifest(Record):
    """RUN/bench/manifest.json: the rows of one `edgetl bench`, with how they were measured."""

    KIND: ClassVar[str] = BENCH_KIND
    TITLE: ClassVar[str] = "bench manifest"
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


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def load_object(path: Path, what: str = "file") -> dict:
    """A JSON file that must hold one object; a missing, unreadable or non-JSON file is one UserError line."""
    path = Path(path)
    named = f"{what} {str(path)!r}"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{named} is missing; valid: the file that edgetl wrote there") from None
    except UnicodeDecodeError:
        raise UserError(f"{named} is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"{named} cannot be read ({type(error).__name__}: {error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{named} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except ValueError as error:  # a number of more digits than Python converts (4300)
        raise UserError(f"{named} is not usable JSON ({' '.join(str(error).split())[:120]})") from None
    except RecursionError:
        raise UserError(f"{named} nests its JSON too deeply to be an edgetl file") from None
    if not isinstance(payload, dict):
        raise UserError(f"{named} holds a JSON {_JSON_TYPES.get(type(payload), type(payload).__name__)}, not an "
                        "object")
    return payload


def read(path: Any, kind: type) -> Any:
    """Read a stage file as the record `kind`; a missing or unparsable file is one UserError line too."""
    named = f"{kind.TITLE} {str(path)!r}"
    return kind.from_json(load_object(path, kind.TITLE), named)
