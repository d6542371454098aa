"""The export stage: one checkpoint in, verified .tflite / .pte files out, whichever backend made it.

One orchestration for every backend (`edgetl.backends.base`): the checkpoint and every option are checked
before any framework is imported (an option the checkpoint's backend lacks is refused in one line); the test
split and the calibration images are preprocessed with the checkpoint's own spec; the backend makes the float
model (pruned when asked) and the int8 one (QAT or post-training, its policy), and converts each requested
format × precision. A failure in one file is recorded and the others go on; every file is verified in its own
runtime, and only then does the finished folder move into place.

int8 (`--int8 auto`, the default): post-training quantization first, with a per-layer sensitivity table; an int8
file that lost more than `max_drop` points in its runtime on the validation split gets the backend's remedies in
order of cost (torch: equalization, ranges per tensor and learned weight rounding, unlabelled; then float fallback
of the layers the user allows with `--float-layers`; then QAT unless `--no-qat`), each recorded with its cost and
gain (the predictions a file changes against float are also counted on training images left out of calibration);
the test split only reports the result (`Judge`), and a file still over the budget there fails the run after
everything is written.

The user's data is safe (edgetl.paths): the output folder is claimed before any work (only a folder edgetl made
for an export is replaced, never the checkpoint or a folder that holds it), and an export in which no file was
both written and verified publishes nothing, so the previous folder stays exactly as it was; so does Ctrl-C.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgetl import backends, formats
from edgetl.backends.base import Backend, Graphs, one_line
from edgetl.breakdown import PARTS_KIND, parts_folder
from edgetl.config import ExportConfig, artifact_name, resolve, variant_tag
from edgetl.contracts import (
    EXPORT_KIND,
    ArtifactEntry,
    ArtifactSidecar,
    CheckpointManifest,
    ExportManifest,
    PreprocessSpec,
    TensorInfo,
    read,
)
from edgetl.data import DatasetListing, model_input
from edgetl.errors import StageFailed, UserError, machine_failure
from edgetl.manifest import (
    library_versions,
    now_utc,
    read_checkpoint,
    read_splits,
    sha256_file,
    write_json,
    write_labels,
)
from edgetl.paths import atomic_dir, atomic_write_bytes, claim_output, ensure_writable_dir, room_for
from edgetl.ui import console, progress, quiet_native, stdout
from edgetl.verify import FLOAT_REFERENCE, TEST_INPUTS, check_drop, compare, print_record, store, verify_artifacts

LABELS_FILE = "labels.txt"
OUTPUT_MEANING = "logits (apply softmax for probabilities), one per label in labels.txt"


class ExportFailed(StageFailed):
    """At least one format failed; the others were written (exit 1)."""


def resolve_config(recipe: str | None = None, settings: list[str] | None = None, **flags: object) -> ExportConfig:
    """Defaults ← recipe (export/recipes/NAME.toml or a path) ← flags that were given (None: not given)."""
    return resolve("export", recipe, settings, **flags)


# ------------------------------------------------------------------------------------------- inputs


def _load_split(
    listing: DatasetListing, records: list[tuple[str, int]], spec: dict, what: str
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode and preprocess images (NHWC float32) exactly as fine-tuning did; files that fail to decode are
    skipped and listed."""
    arrays, labels, skipped = [], [], []
    with progress() as bar:
        task = bar.add_task(what, total=len(records), status="")
        for rel, label in records:
            try:
                arrays.append(model_input(listing.root, rel, spec))  # as fine-tuning saw it (JPEG draft too)
                labels.append(label)
            except Exception as error:  # Pillow raises many types for damaged files
                skipped.append({"path": rel, "reason": f"{type(error).__name__}: {error}"[:200]})
            bar.advance(task)
    if not arrays:
        raise UserError(f"no {what} image could be decoded under {str(listing.root)!r}")
    return np.stack(arrays).astype(np.float32), np.asarray(labels, dtype=np.int64), skipped


def load_listing(checkpoint: Path, manifest: CheckpointManifest) -> DatasetListing:
    """The checkpoint's own splits; the data must still be where fine-tuning found it."""
    listing = DatasetListing.from_json(read_splits(checkpoint / manifest.splits_file, manifest.labels))
    if not listing.root.is_dir():
        raise UserError(
            f"the checkpoint's data folder {str(listing.root)!r} is gone; export needs its test split and "
            f"training images for calibration"
        )
    if not listing.splits.get("test"):
        raise UserError(f"checkpoint {str(checkpoint)!r} has an empty test split; nothing to verify against")
    return listing


def _check_training_data(listing: DatasetListing, option: str) -> None:
    """Pruning and QAT train on the checkpoint's training split: it must be listed and on disk."""
    train = listing.splits.get("train") or []
    if not train or not any((listing.root / rel).is_file() for rel, _ in train[:16]):
        raise UserError(f"{option} needs the checkpoint's training images, and none is reachable under "
                        f"{str(listing.root)!r} ({len(train)} listed); restore the data folder or drop {option}")


@dataclass
class Inputs:
    """The arrays an export is made and verified with, all preprocessed as the checkpoint says (NHWC)."""

    spec: dict
    x_test: np.ndarray
    y_test: np.ndarray
    calibration: np.ndarray
    skipped: list[dict]
    x_val: np.ndarray | None = None  # the validation split, when the int8 policy judges remedies on it
    y_val: np.ndarray | None = None
    x_unlabelled: np.ndarray | None = None  # training images left out of calibration (`UNLABELLED_JUDGE_IMAGES`)


@dataclass
class Judge:
    """The images the int8 policy judges its files by, and the float model's logits on them. The validation split,
    never the test split when there is one: the test split's figures are what verification reports, and a remedy
    kept because it did better on the test images would make them look better than the file is.

    The drop needs labels, so it is measured on `x` alone; the predictions a file changes against float need none,
    so they are also counted on `unlabelled` (training images no remedy was calibrated on). On a small folder the
    validation split is a coarse judge (51 images on sprites-5: one image is 2 points); the changed predictions on
    a few hundred images more are not."""

    split: str
    x: np.ndarray
    y: np.ndarray
    reference: np.ndarray
    unlabelled: np.ndarray | None = None
    unlabelled_reference: np.ndarray | None = None

    def describe(self) -> dict:
        described = {"split": self.split, "images": int(len(self.y))}
        if self.unlabelled is not None:
            described["unlabelled_images"] = int(len(self.unlabelled))
        return described

    def says(self) -> str:
        """The judge's images in words, for the console."""
        said = f"the {len(self.y)} {self.split} images"
        if self.unlabelled is not None:
            said += f" (changed predictions also on {len(self.unlabelled)} unlabelled training images)"
        return said


def judge_of(inputs: Inputs, test: Judge, float_logits) -> Judge:
    """The validation split when the checkpoint has one (`float_logits(x)` gives the float model's logits on it),
    else `test`, which the policy record then names; either with the unlabelled training images when there are
    any."""
    labelled = test
    if inputs.x_val is not None and len(inputs.x_val):
        labelled = Judge("validation", inputs.x_val, inputs.y_val, float_logits(inputs.x_val))
    if inputs.x_unlabelled is None or not len(inputs.x_unlabelled):
        return labelled
    return replace(labelled, unlabelled=inputs.x_unlabelled, unlabelled_reference=float_logits(inputs.x_unlabelled))


UNLABELLED_JUDGE_IMAGES = 512  # training images beyond the calibration draw, for the changed predictions (`Judge`)


def load_inputs(listing: DatasetListing, manifest: CheckpointManifest, config: ExportConfig,
                calibrate: bool, judge: bool = False) -> Inputs:
    """The test split, with `calibrate` a seeded draw of `config.quantization.calib` training images (never
    test ones), and with `judge` the validation split when the checkpoint has one and up to
    `UNLABELLED_JUDGE_IMAGES` training images of the same draw after the calibration ones (`Judge`)."""
    spec = manifest.preprocess.with_layout("NHWC")
    x_test, y_test, skipped = _load_split(listing, listing.splits["test"], spec, "test images")
    x_val = y_val = None
    if judge and listing.splits.get("val"):
        x_val, y_val, bad = _load_split(listing, listing.splits["val"], spec, "validation images")
        skipped += bad
    calibration = np.zeros((0, *x_test.shape[1:]), np.float32)
    x_unlabelled = None
    if calibrate:
        train = listing.splits["train"]
        order = np.random.default_rng(config.seed).permutation(len(train))
        calib = config.quantization.calib
        calibration, _, bad = _load_split(listing, [train[i] for i in order[:calib]], spec, "calibration images")
        skipped += bad
        left_out = order[calib:calib + UNLABELLED_JUDGE_IMAGES]
        if judge and len(left_out):
            x_unlabelled, _, bad = _load_split(listing, [train[i] for i in left_out], spec,
                                               "unlabelled judge images")
            skipped += bad
        if len(train) < config.quantization.calib:
            console.print(f"[yellow]--calib {config.quantization.calib}: only {len(train)} training images; using "
                          f"them all[/]")
    return Inputs(spec, x_test, y_test, calibration, skipped, x_val, y_val, x_unlabelled)


# ------------------------------------------------------------------------------------------ the stage


def run_export(checkpoint: Path, config: ExportConfig, out: Path | None = None, allow_modified: bool = False) -> Path:
    """Export and verify; returns the export folder. Raises QualityError (after writing) on a big int8 drop,
    ExportFailed (after writing the others) when a file could not be made or verified, and (publishing
    nothing) when none could. Weights that differ from the checkpoint's manifest are refused unless
    `allow_modified`."""
    checkpoint = Path(checkpoint)
    manifest = read_checkpoint(checkpoint)  # every field checked, labels against the model's outputs too
    weights_sha256 = check_weights(checkpoint, manifest, allow_modified)
    asked = config.validate()
    config = asked.for_backend(manifest.framework)
    out = _output_folder(checkpoint, out)
    listing = load_listing(checkpoint, manifest)
    if config.prune_spec is not None or config.policy.qat:
        _check_training_data(listing, "--prune" if config.prune_spec is not None else "--int8 qat (--qat)")
    elif ("int8" in config.quantization.quant and config.policy.int8 == "auto" and not config.policy.no_qat
          and "qat" in _remedies(manifest)):
        _check_training_data(listing, "--int8 auto (its last remedy is QAT; --no-qat forbids it)")
    backend = backends.load(manifest.framework)
    _check_float_layers(backend, checkpoint, manifest, config)
    _check_debug_blocks(backend, checkpoint, manifest, config)
    if asked.parts and not config.parts:
        console.print("[yellow]--parts: this export makes no .pte, so there are no .pte blocks to lower[/]")
    for fmt in (f for f in asked.quantization.formats if f not in config.quantization.formats):
        console.print(f"[yellow].{fmt} skipped: this checkpoint's framework is {manifest.framework}, which exports "
                      f"{', '.join('.' + f for f in config.quantization.formats)} only[/]")
    calibrate = "int8" in config.quantization.quant and backend.needs_calibration(config)
    inputs = load_inputs(listing, manifest, config, calibrate,
                         judge="int8" in config.quantization.quant and config.policy.int8 == "auto")
    console.print(f"export ({manifest.framework}): {checkpoint} → {out} "
                  f"({', '.join(config.quantization.formats)} × {', '.join(config.quantization.quant)})")
    started = time.perf_counter()
    graphs = _make_graphs(backend, checkpoint, manifest, listing, inputs, config)
    with quiet_native():
        reference = backend.logits(graphs.float_model, inputs.x_test)
        test = Judge("test", inputs.x_test, inputs.y_test, reference)
        judge = judge_of(inputs, test, lambda x: backend.logits(graphs.float_model, x))
    context = _Context(manifest, config, graphs, inputs.spec, _parent(checkpoint, manifest, weights_sha256),
                       library_versions(_libraries(backend, config)))
    with room_for(out.parent, "the export"), atomic_dir(out, check=publishable(out)) as tmp:
        write_labels(tmp / LABELS_FILE, list(manifest.labels))
        np.savez(tmp / TEST_INPUTS, x=inputs.x_test, y=inputs.y_test)
        np.savez(tmp / FLOAT_REFERENCE, logits=reference, labels=inputs.y_test)
        backend.save_extras(graphs, tmp)
        asked_files = config.quantization
        artifacts = [_export_one(backend, context, quant, fmt, tmp) for quant in asked_files.quant
                     for fmt in asked_files.formats]
        context.graph_of = {a.file: graphs.int8 for a in artifacts if a.quant == "int8" and a.ok}
        first_quantization = dict(graphs.quantization)
        policy = _apply_policy(backend, context, checkpoint, listing, inputs, judge, artifacts, tmp, test)
        graphs.quantization = {**first_quantization, "policy": policy, "sensitivity": graphs.sensitivity}
        record = _verify(tmp, artifacts, context, policy)
        numerics = _debug_numerics(backend, context, artifacts, inputs, tmp) if config.debug_numerics else None
        write_json(tmp / "manifest.json", _export_manifest(context, inputs, reference, artifacts, record,
                                                           time.perf_counter() - started, numerics).to_json())
        if sha256_file(checkpoint / manifest.weights_file) != weights_sha256:
            raise StageFailed(f"{manifest.weights_file} in {str(checkpoint)!r} changed while it was exported; "
                              "nothing was published: run the export again")
    if graphs.sensitivity is not None:
        print_sensitivity(graphs.sensitivity)
    print_record(record)
    if numerics is not None:
        print_numerics(numerics)
    if graphs.pruning is not None:
        console.print(backend.pruning_summary(graphs.pruning))
    console.print(f"export folder: {out}")
    _raise_failures(artifacts, record, out)
    check_drop(record, config.policy.max_drop)
    return out


def _output_folder(checkpoint: Path, out: Path | None) -> Path:
    """RUN/export unless `out` says otherwise, claimed before any work: missing, empty or an export edgetl made,
    never the checkpoint or a folder that holds it."""
    out = claim_output(Path(out) if out is not None else checkpoint.parent / "export", EXPORT_KIND, [checkpoint])
    ensure_writable_dir(out.parent, "output folder")
    return out


def publishable(out: Path):
    """atomic_dir's last check: an export in which no file was both written and verified publishes nothing,
    so a failed export leaves the previous folder at `out` exactly as it was."""

    def check(folder: Path) -> None:
        manifest = read(folder / "manifest.json", ExportManifest)
        verified = manifest.verified()
        if any(name in verified and (folder / name).is_file() for name in manifest.made()):
            return
        errors = [a.error for a in manifest.artifacts if a.error]
        errors += [row["error"] for row in manifest.verification["rows"] if row.get("error")]
        raise ExportFailed(f"every export failed ({errors[0] if errors else 'none verified'}); nothing was "
                           f"published" + (f" and {str(out)!r} is as it was" if out.exists() else ""))

    return check


def _make_graphs(backend: Backend, checkpoint: Path, manifest: CheckpointManifest, listing: DatasetListing,
                 inputs: Inputs, config: ExportConfig) -> Graphs:
    """The backend's float model, then its int8 one. int8 failing must not cost the float files: the error is
    recorded and every int8 file is listed as failed with it. A UserError (an option this model cannot take)
    still stops the run."""
    graphs = backend.load_float(checkpoint, manifest, listing, config)
    if "int8" not in config.quantization.quant:
        return graphs
    try:
        backend.quantize(graphs, checkpoint, manifest, listing, inputs.calibration, config)
    except UserError:
        raise
    except Exception as error:
        if machine_failure(error):
            raise
        graphs.int8, graphs.int8_error = None, one_line(error)
        console.print(f"[red]int8: quantization failed[/] — {graphs.int8_error}")
        return graphs
    if graphs.quantization.get("seconds") is not None:
        console.print(f"int8: quantized in {graphs.quantization['seconds']:.0f} s")
    try:
        graphs.sensitivity = backend.sensitivity(graphs, inputs.calibration, config)
    except Exception as error:  # a missing table must not cost the files
        if machine_failure(error):
            raise
        console.print(f"[yellow]int8: per-layer sensitivity failed[/] — {one_line(error)}")
    return graphs


@dataclass
class _Context:
    """What every file of one export shares."""

    manifest: CheckpointManifest
    config: ExportConfig
    graphs: Graphs
    spec: dict
    parent: dict
    versions: dict
    graph_of: dict = field(default_factory=dict)  # int8 file → the Q/DQ graph it was converted from


def check_weights(checkpoint: Path, manifest: CheckpointManifest, allow_modified: bool) -> str:
    """The sha256 of the weights file as it is now. Weights that are not the ones fine-tuning wrote and measured
    (a file swapped or edited since) are refused, or with `allow_modified` exported under their own sha256 and
    marked: an export never records a hash its weights do not have."""
    actual = sha256_file(checkpoint / manifest.weights_file)
    if actual == manifest.weights_sha256:
        return actual
    if not allow_modified:
        raise UserError(f"{manifest.weights_file} in {str(checkpoint)!r} does not match the sha256 in its "
                        "manifest.json (the weights changed after fine-tuning, so the accuracy recorded there is not "
                        "theirs): fine-tune again, or pass --allow-modified to export them as they are")
    console.print(f"[yellow]export: {manifest.weights_file} changed after fine-tuning (sha256 differs from its "
                  "manifest); exported as it is, marked modified in the export's manifest and sidecars[/]")
    return actual


def _parent(checkpoint: Path, manifest: CheckpointManifest, weights_sha256: str) -> dict:
    parent = {"checkpoint": str(checkpoint.resolve()), "manifest_sha256": sha256_file(checkpoint / "manifest.json"),
              "weights_sha256": weights_sha256}
    if weights_sha256 != manifest.weights_sha256:
        parent["weights_modified"] = True
        parent["manifest_weights_sha256"] = manifest.weights_sha256
    return parent


def _export_one(backend: Backend, context: _Context, quant: str, fmt: str, folder: Path,
                parts: bool = True) -> ArtifactEntry:
    """One file and its sidecar manifest (and with --parts, a .pte's blocks, unless `parts` is False: a remedy's
    candidate gets them only once kept); any exception but a UserError becomes a recorded failure."""
    config, graphs = context.config, context.graphs
    tag = variant_tag(config.compression.prune, config.policy.qat, quant)
    name = artifact_name(context.manifest.model, quant, fmt, tag)
    if quant == "int8" and graphs.int8_error:
        return ArtifactEntry(file=name, format=fmt, quant=quant, status="failed",
                             error=f"quantization: {graphs.int8_error}")
    converter = backend.capabilities.converters[fmt]
    console.print(f"{name}: converting with {converter}…")
    started = time.perf_counter()
    try:
        with quiet_native():
            converted = backend.convert(graphs, quant, fmt)
        atomic_write_bytes(folder / name, converted.payload)
        seconds = round(time.perf_counter() - started, 1)
        sidecar = _sidecar(context, name, fmt, quant, folder / name, converter, converted.details, seconds,
                           gzip_size(converted.payload))
        write_json(folder / f"{name}.json", sidecar.to_json())
    except Exception as error:  # isolate this file: record why, keep going with the others
        (folder / name).unlink(missing_ok=True)  # a file without its manifest is not a finished artifact
        if isinstance(error, UserError) or machine_failure(error):
            raise  # bad input, or the machine failed (a full disk): not this file's fault, publish nothing
        entry = ArtifactEntry(file=name, format=fmt, quant=quant, status="failed", error=one_line(error))
        console.print(f"[red]{name}: failed[/] — {entry.error}")
        return entry
    console.print(f"{name}: {sidecar.bytes / 1e6:.2f} MB (gzip {sidecar.gzip_bytes / 1e6:.2f} MB) in {seconds:.0f} s")
    _warn_delegation(name, sidecar.delegation or {}, quant)
    if formats.get(fmt).blocks == "lowered" and config.parts and parts:
        _write_parts(backend, graphs, quant, folder, name, sidecar.sha256)
    return ArtifactEntry(file=name, format=fmt, quant=quant, status="ok", bytes=sidecar.bytes,
                         gzip_bytes=sidecar.gzip_bytes, sha256=sidecar.sha256, export_seconds=seconds,
                         manifest=f"{name}.json")


def _write_parts(backend: Backend, graphs: Graphs, quant: str, folder: Path, name: str, sha256: str) -> None:
    """`--parts`: each network block of this .pte lowered on its own from the same graph, with what bench needs to
    count them; a failure is a warning (the file itself is made and verified)."""
    started = time.perf_counter()
    console.print(f"{name}: lowering each network block on its own (--parts)…")
    try:
        made = backend.pte_parts(graphs, quant)
    except Exception as error:  # noqa: BLE001 - the breakdown is optional; the file stands
        if machine_failure(error):
            raise
        console.print(f"[yellow]{name}: --parts failed — {one_line(error)}[/]")
        return
    if not made:
        console.print(f"[yellow]{name}: --parts: this backend cannot cut its graph into blocks[/]")
        return
    target = parts_folder(folder, name)
    target.mkdir()
    entries = []
    for index, part in enumerate(made):
        file = f"{index:02d}-{part['name']}.pte"
        atomic_write_bytes(target / file, part["payload"])
        entries.append({k: v for k, v in part.items() if k != "payload"} | {"file": file})
    write_json(target / "parts.json", {
        "kind": PARTS_KIND, "schema_version": 1, "file": name, "sha256": sha256,
        "method": "each block of the graph this .pte was lowered from (same operators, weights, scales and "
                  "zero-points), lowered on its own with the same XNNPACK partitioner; every part reads and returns "
                  "float, quantizing its input and dequantizing its output as the whole does",
        "seconds": round(time.perf_counter() - started, 1), "parts": entries})
    console.print(f"{name}: {len(entries)} parts in {time.perf_counter() - started:.0f} s")


def _warn_delegation(name: str, delegation: dict, quant: str) -> None:
    islands = delegation.get("xnnpack_float_compute") or {}
    if quant == "int8" and islands:  # an int8 op the partitioner took in float, between two conversions
        listed = ", ".join(f"{count} {kind.removeprefix('XNN')}" for kind, count in islands.items())
        console.print(f"[yellow]warning: {name}: float compute inside the XNNPACK partition: {listed} "
                      f"({delegation.get('xnnpack_conversions', 0)} conversions between int8 and float)[/]")
    if not delegation.get("whole_graph_delegated", True):
        console.print(f"[yellow]warning: {name}: LiteRT's XNNPACK delegate did not take the whole graph[/]")
    if delegation.get("compute_ops_outside"):
        console.print(f"[yellow]warning: {name}: compute ops outside the XNNPACK delegate: "
                      f"{', '.join(delegation['compute_ops_outside'])}[/] (they run on slower portable kernels)")


def _libraries(backend: Backend, config: ExportConfig) -> tuple[str, ...]:
    """The backend's libraries and those of every format this export makes (its converter, its runtime)."""
    made = [lib for fmt in config.quantization.formats for lib in formats.get(fmt).libraries]
    return tuple(dict.fromkeys([*backend.capabilities.libraries, *made]))


def _describe(path: Path, fmt: str) -> dict:
    """What the file itself says about its tensors, and what its format adds (a .tflite's weight sparsity)."""
    return {**formats.describe(path, fmt), **formats.facts(path, fmt)}


def _sidecar(context: _Context, name: str, fmt: str, quant: str, path: Path, converter: str, details: dict,
             seconds: float, gzip_bytes: int) -> ArtifactSidecar:
    """What an app, `edgetl bench` or a person needs to use this one file correctly."""
    described = _describe(path, fmt)
    graphs, source = context.graphs, repr(str(path))
    inside = formats.get(fmt).quantizes_inside
    quantized_inside = graphs.quantization.get("input_quantization") if quant == "int8" and inside else None
    extra_in = {"layout": "NHWC", **({"quantized_inside": quantized_inside} if inside else {})}
    tensor_in = TensorInfo.from_json({**described["inputs"][0], **extra_in}, source, "input.")
    tensor_out = TensorInfo.from_json({**described["outputs"][0], "meaning": OUTPUT_MEANING}, source, "output.")
    return ArtifactSidecar(
        created=now_utc(), file=name, format=fmt, runtime=formats.get(fmt).runtime,
        framework=context.manifest.framework, quant=quant, converter=converter, bytes=path.stat().st_size,
        gzip_bytes=gzip_bytes,
        sha256=sha256_file(path), labels_file=LABELS_FILE, labels=context.manifest.labels,
        model=context.manifest.model, preprocess=PreprocessSpec.from_json(context.spec), input=tensor_in,
        output=tensor_out, quantization=graphs.quantization if quant == "int8" else None, pruning=graphs.pruning,
        parent=context.parent, export_seconds=seconds, ops=described.get("ops"),
        delegation=details.get("delegation", described.get("delegation")),
        weight_sparsity=described.get("weight_sparsity"), versions=context.versions,
    )


def gzip_size(payload: bytes) -> int:
    """Bytes after gzip -9: what zeroed weights save in a download (the file itself stays dense)."""
    return len(gzip.compress(payload, compresslevel=9, mtime=0))


def _verify(folder: Path, artifacts: list[ArtifactEntry], context: _Context, policy: dict | None = None) -> dict:
    """Every file made, run in its runtime; the figures also go into each file's sidecar."""
    record = verify_artifacts(folder, [a.to_json() for a in artifacts if a.ok], context.config.threads)
    for row in record["rows"]:
        if row["quant"] == "int8" and policy is not None:
            row["remedy"] = policy["remedy_of"].get(row["file"])
    record["float_top1_manifest"] = context.manifest.test_top1
    if context.graphs.pruning is not None:  # a pruned export is measured against its own pruned float model
        kind, ratio = context.config.prune_spec
        record["reference"] = f"pruned float model ({kind}:{ratio:g})"
    for row in record["rows"]:
        _attach_verification(folder, row)
    store(folder, record)
    return record


def _attach_verification(folder: Path, row: dict) -> None:
    """Copy a file's verification figures into its sidecar manifest."""
    path = folder / f"{row['file']}.json"
    if not path.is_file():
        return
    sidecar = ArtifactSidecar.from_json(json.loads(path.read_text()), repr(str(path)))
    figures = {k: v for k, v in row.items() if k not in ("file", "format", "quant")}
    write_json(path, {**sidecar.to_json(), "verification": figures})


def _export_manifest(context: _Context, inputs: Inputs, reference: np.ndarray, artifacts: list[ArtifactEntry],
                     record: dict, seconds: float, numerics: dict | None = None) -> ExportManifest:
    graphs = context.graphs
    return ExportManifest(
        created=now_utc(), framework=context.manifest.framework, parent=context.parent,
        model=context.manifest.model, labels=context.manifest.labels,
        preprocess=PreprocessSpec.from_json(context.spec), config=context.config.to_json(),
        test_inputs={"file": TEST_INPUTS, "images": int(len(inputs.y_test)), "layout": "NHWC", "dtype": "float32",
                     "skipped": inputs.skipped},
        float_reference={"file": FLOAT_REFERENCE, "top1": float((reference.argmax(axis=1) == inputs.y_test).mean()),
                         "model": graphs.float_label},
        quantization=graphs.quantization or None, pruning=graphs.pruning, artifacts=tuple(artifacts),
        verification=record, seconds=round(seconds, 1), versions=context.versions, numerics=numerics,
    )


# ------------------------------------------------------------------------------------ the int8 policy


def _check_names(flag: str, given: tuple[str, ...], names: list[str] | None, what: str,
                 manifest: CheckpointManifest) -> None:
    """Every name given to `flag` must be one of `names` (a `what` of the model); one error lists them all."""
    unknown = [name for name in given if name not in (names or [])]
    if unknown:
        verb = f"is not a {what}" if len(unknown) == 1 else f"are not {what}s"
        raise UserError(f"{flag}: {', '.join(map(repr, unknown))} {verb} of this {manifest.model.backbone}; "
                        f"valid: {', '.join(names or [])}")


def _check_float_layers(backend: Backend, checkpoint: Path, manifest: CheckpointManifest, config: ExportConfig) -> None:
    """Every --float-layers name must be a layer int8 quantizes (checked before any work)."""
    if config.policy.float_layers:
        _check_names("--float-layers", config.policy.float_layers, backend.quantized_layer_names(checkpoint, manifest),
                     "quantized layer", manifest)


def _check_debug_blocks(backend: Backend, checkpoint: Path, manifest: CheckpointManifest, config: ExportConfig) -> None:
    """Every --debug-blocks name must be a block the numerics debugger cuts (checked before any work)."""
    if config.debug_blocks:
        _check_names("--debug-blocks", config.debug_blocks, backend.block_names(checkpoint, manifest), "block",
                     manifest)


def _remedies(manifest: CheckpointManifest) -> tuple[str, ...]:
    return backends.capabilities(manifest.framework).remedies


def _measure(path: Path, fmt: str, judge: Judge, threads: int | None) -> dict:
    """One file's top-1 drop against the float reference on the judge's labelled images, and the predictions it
    changes against float on those and on its unlabelled ones, in its own runtime."""
    with quiet_native():
        out = formats.run(path, judge.x, threads, fmt=fmt)
        unlabelled = None if judge.unlabelled is None else formats.run(path, judge.unlabelled, threads, fmt=fmt)
    row = compare(out, judge.reference, judge.y)
    float_top1 = float((judge.reference.argmax(axis=1) == judge.y).mean())
    measured = {"drop_points": round(100 * (float_top1 - row["top1"]), 2), "top1": row["top1"],
                "changed_predictions": row["changed"]}
    if unlabelled is not None:
        changed = int((unlabelled.argmax(axis=1) != judge.unlabelled_reference.argmax(axis=1)).sum())
        measured.update(changed_labelled=row["changed"], changed_unlabelled=changed,
                        changed_predictions=row["changed"] + changed)
    return measured


def _apply_policy(backend: Backend, context: _Context, checkpoint: Path, listing: DatasetListing, inputs: Inputs,
                  judge: Judge, artifacts: list[ArtifactEntry], folder: Path, test: Judge | None = None) -> dict:
    """`--int8 auto`: each int8 file over --max-drop on the `judge`'s images (the validation split: `Judge`) gets
    the backend's remedies in order of cost until it is within the budget. A remedied file replaces the earlier one
    only when it is closer to the float model there (`replaces`); each step is recorded with its cost (seconds) and
    its gain (points) per file. The first files are also measured on `test` (when that is other images), for the
    record only: what PTQ alone gives. `artifacts` is updated in place."""
    config, graphs = context.config, context.graphs
    first = "qat" if config.policy.qat else "ptq"
    int8 = {a.file: a for a in artifacts if a.quant == "int8" and a.ok}
    asked = config.policy
    policy: dict = {"mode": asked.int8, "max_drop": asked.max_drop, "no_qat": asked.no_qat, "steps": [],
                    "judged_on": judge.describe(), "remedy_of": dict.fromkeys(int8, first), "first": {}}
    if not int8:
        return policy
    for name, entry in list(int8.items()):
        try:
            policy["first"][name] = _measure(folder / name, entry.format, judge, config.threads)
            if test is not None and test.split != judge.split:
                policy["first"][name]["test"] = _measure(folder / name, entry.format, test, config.threads)
        except Exception as error:  # noqa: BLE001 - a file that does not run: verification records why
            if machine_failure(error):
                raise
            del int8[name]
    current = {name: policy["first"][name]["drop_points"] for name in int8}
    changed = {name: policy["first"][name]["changed_predictions"] for name in int8}
    if config.policy.int8 != "auto":
        return policy
    for remedy in backend.capabilities.remedies:
        over = [name for name in int8 if current[name] > config.policy.max_drop]
        if not over:
            break
        step: dict = {"remedy": remedy, "files": {}}
        policy["steps"].append(step)
        if remedy == "qat" and config.policy.no_qat:
            step["skipped"] = "--no-qat"
            continue
        if remedy == "adaround" and config.policy.rounding_layers == 0:
            step["skipped"] = "--rounding-layers 0"
            continue
        if remedy == "float-fallback" and not config.policy.float_layers:
            step["skipped"] = "no --float-layers"
            continue
        console.print(f"int8: {', '.join(over)} over --max-drop {config.policy.max_drop:g} on {judge.says()}; "
                      f"trying {REMEDY_NAMES[remedy]}")
        started = time.perf_counter()
        try:
            backend.remedy(remedy, graphs, checkpoint, context.manifest, listing, inputs.calibration, config)
        except UserError:
            raise
        except Exception as error:  # a remedy that fails leaves the earlier files as they are
            if machine_failure(error):
                raise
            step.update(error=one_line(error), seconds=round(time.perf_counter() - started, 1))
            console.print(f"[red]int8: {remedy} failed[/] — {step['error']}")
            continue
        step["quantize_seconds"] = round(time.perf_counter() - started, 1)
        step["quantization"] = {k: v for k, v in graphs.quantization.items() if k != "input_quantization"}
        for name in over:
            step["files"][name] = _remake(backend, context, int8[name], remedy, folder, judge,
                                          current[name], changed[name], artifacts)
            if step["files"][name]["kept"]:
                current[name] = step["files"][name]["drop_points"]
                changed[name] = step["files"][name]["changed_predictions"]
                policy["remedy_of"][name] = remedy
                int8[name] = next(a for a in artifacts if a.file == name)
        step["seconds"] = round(time.perf_counter() - started, 1)
    return policy


REMEDY_NAMES = {"equalize": "cross-layer equalization and bias absorption (no labels)",
                "ranges": "activation ranges chosen per tensor by output error: one histogram over all images or each "
                          "image's own min/max (no labels)",
                "adaround": "learned weight rounding (no labels)",
                "float-fallback": "float fallback of --float-layers (no labels; those layers run in fp32)",
                "qat": "quantization-aware training (labels)"}


def replaces(remedy: str, drop: float, changed: int, drop_before: float, changed_before: int) -> bool:
    """Whether a remedied int8 file should replace the earlier one.

    A label-free remedy aims at the float model, so it replaces the file only when it loses no more points and
    changes no more predictions against float (the drop on the validation images, the changed predictions on those
    and on unlabelled training images: `Judge`), and does better on one of the two: judged by the drop alone, a
    remedy that moved 53 of 131 predictions of a weak model and happened to gain 13 points was kept, and judged by
    the changed predictions alone one that changed one fewer while losing one more image would be. QAT trains
    toward the labels, so it is judged by the drop, then by the changed predictions."""
    if remedy == "qat":
        return drop < drop_before or (drop == drop_before and changed < changed_before)
    return drop <= drop_before and changed <= changed_before and (drop, changed) != (drop_before, changed_before)


def _remake(backend: Backend, context: _Context, entry: ArtifactEntry, remedy: str, folder: Path, judge: Judge,
            before: float, changed_before: int, artifacts: list[ArtifactEntry]) -> dict:
    """Convert one int8 file again from the remedied graph into a side folder; it replaces the earlier file (and
    sidecar) only if it is closer to the float model on the judge's images (`replaces`)."""
    side = folder / f".remedy-{remedy}"
    side.mkdir(exist_ok=True)
    started = time.perf_counter()
    made = _export_one(backend, context, "int8", entry.format, side, parts=False)
    if not made.ok:
        return {"kept": False, "error": made.error, "seconds": round(time.perf_counter() - started, 1)}
    try:
        measured = _measure(side / made.file, made.format, judge, context.config.threads)
    except Exception as error:  # the remedied file does not run: the earlier one stays
        if machine_failure(error):
            raise
        shutil.rmtree(side, ignore_errors=True)
        return {"kept": False, "error": one_line(error), "seconds": round(time.perf_counter() - started, 1)}
    kept = replaces(remedy, measured["drop_points"], measured["changed_predictions"], before, changed_before)
    if kept:
        for suffix in ("", ".json"):
            os.replace(side / f"{made.file}{suffix}", folder / f"{made.file}{suffix}")
        if formats.get(made.format).blocks == "lowered" and context.config.parts:  # the earlier file's blocks go
            shutil.rmtree(parts_folder(folder, made.file), ignore_errors=True)
            _write_parts(backend, context.graphs, "int8", folder, made.file, made.sha256)
        artifacts[[a.file for a in artifacts].index(entry.file)] = made
        context.graph_of[made.file] = context.graphs.int8
    shutil.rmtree(side, ignore_errors=True)
    gain = round(before - measured["drop_points"], 2)
    among = "" if judge.unlabelled is None else f" (with {len(judge.unlabelled)} unlabelled training images)"
    console.print(f"int8: {made.file}: {remedy} {'kept' if kept else 'not kept'} — on the {len(judge.y)} "
                  f"{judge.split} images, drop {before:.1f} → {measured['drop_points']:.1f} points ({gain:+.1f}); "
                  f"predictions changed against float{among} {changed_before} → {measured['changed_predictions']}")
    return {**measured, "drop_before": before, "changed_before": changed_before, "gain_points": gain, "kept": kept,
            "seconds": round(time.perf_counter() - started, 1)}


NUMERICS_IMAGES = 8  # calibration images the debugger runs: enough for stable per-block SQNR, seconds per block
NUMERICS_PLOT = "numerics.png"


def _debug_numerics(backend: Backend, context: _Context, artifacts: list[ArtifactEntry], inputs: Inputs,
                    folder: Path) -> dict:
    """`--debug-numerics`: every block of each int8 file in its runtime against the float model and the Q/DQ graph
    it was converted from (files made from different graphs, as after a remedy, are compared with their own)."""
    from edgetl import numerics

    made = [a for a in artifacts if a.quant == "int8" and a.ok and context.graph_of.get(a.file) is not None]
    if not made:
        return {"kind": numerics.KIND, "skipped": "no int8 file was made from a quantized graph"}
    images = inputs.calibration[:NUMERICS_IMAGES]
    console.print(f"int8: numerics debugger on {len(images)} calibration images, block by block in each runtime…")
    started = time.perf_counter()
    records = []
    for graph in {id(context.graph_of[a.file]): context.graph_of[a.file] for a in made}.values():
        files = {a.format: folder / a.file for a in made if context.graph_of[a.file] is graph}
        try:
            lowered = any(formats.get(fmt).blocks == "lowered" for fmt in files)
            signals = backend.block_signals(replace(context.graphs, int8=graph), images, lower_pte=lowered,
                                            selected=context.config.debug_blocks)
        except Exception as error:  # noqa: BLE001 - the debugger failing must not cost the files
            if machine_failure(error):
                raise
            signals, reason = None, f"the graph could not be cut into blocks ({one_line(error)})"
        else:
            reason = "this backend cannot cut its graph into blocks"
        if signals is None:
            records.append({"kind": numerics.KIND, "files": [p.name for p in files.values()], "skipped": reason})
            continue
        records.append(numerics.debug_numerics(signals, files, images, context.config.threads,
                                               selected=context.config.debug_blocks))
    record = records[0] if len(records) == 1 else {"kind": numerics.KIND, "graphs": records}
    record["seconds"] = round(time.perf_counter() - started, 1)
    plot = numerics.plot(records[0]) if "blocks" in records[0] else None
    if plot is not None:
        atomic_write_bytes(folder / NUMERICS_PLOT, plot)
        record["plot"] = NUMERICS_PLOT
    return record


def print_numerics(record: dict) -> None:
    from edgetl import numerics

    for one in record.get("graphs", [record]):
        if "skipped" in one:
            console.print(f"[yellow]numerics debugger: {one['skipped']}[/]")
            continue
        stdout.print(numerics.render_table(one))
        stdout.print(numerics.summary(one))


def print_sensitivity(record: dict, top: int = 10) -> None:
    """The layers whose int8 rounding costs most, as a table (the full one is in manifest.json)."""
    from rich import box
    from rich.table import Table

    measured = sorted((r for r in record["rows"] if r.get("measured")), key=lambda r: r["rank"])
    table = Table(title=f"int8 sensitivity: each layer's weights rounded alone, {record['images']} calibration images "
                        f"({record['measured']}/{record['layers']} layers measured in {record['seconds']:.0f} s)",
                  box=box.SIMPLE_HEAD, caption="mean |Δlogit| against the float model; all rows in manifest.json")
    for column in ("rank", "layer", "kind", "|Δlogit|", "changed", "MACs"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right", no_wrap=True)
    for row in measured[:top]:
        table.add_row(str(row["rank"]), row["layer"], row["kind"], f"{row['logit_error']:.4f}",
                      f"{row['changed_predictions']}/{record['images']}", f"{100 * row['macs_share']:.1f}%")
    stdout.print(table)


def _raise_failures(artifacts: list[ArtifactEntry], record: dict, out: Path) -> None:
    failed = {a.file for a in artifacts if not a.ok} | {r["file"] for r in record["rows"] if r["status"] != "ok"}
    if failed:
        count = sum(not a.ok for a in artifacts) + sum(r["status"] != "ok" for r in record["rows"])
        raise ExportFailed(f"{count} export(s) failed: {', '.join(sorted(failed))}; the others are in "
                           f"{str(out)!r} (see manifest.json)")
