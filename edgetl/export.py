"""The export stage: one checkpoint in, verified .tflite / .pte files (fp32 and int8) out.

Framework-free orchestration. It checks the checkpoint and every option before importing torch,
preprocesses the test split and the calibration images with the checkpoint's own spec, asks the torch
backend for one float graph and one PT2E int8 graph, turns each into every requested format (a failure
in one is recorded and the others go on), verifies every file in its real runtime, and only then moves
the finished folder into place. An int8 file that lost more than `max_drop` points fails the run after
everything is written.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from edgetl.data import DatasetListing, load_rgb, to_array
from edgetl.errors import UserError, one_of
from edgetl.manifest import (
    SCHEMA_VERSION,
    library_versions,
    now_utc,
    read_checkpoint_manifest,
    sha256_file,
    write_json,
    write_labels,
)
from edgetl.paths import atomic_dir, atomic_write_bytes, ensure_writable_dir
from edgetl.ui import console, progress, quiet_native
from edgetl.verify import FLOAT_REFERENCE, TEST_INPUTS, check_drop, print_record, store, verify_artifacts

FORMATS = ("tflite", "pte")
QUANTS = ("fp32", "int8")
KERAS_QUANTS = ("fp16", "dynamic")  # TFLiteConverter variants, keras checkpoints only (issue #5)
EXPORT_KIND = "edgetl.export"
ARTIFACT_KIND = "edgetl.artifact"
RUNTIMES = {"tflite": "LiteRT (ai-edge-litert Interpreter)", "pte": "ExecuTorch (XNNPACK delegate)"}
EXPORT_LIBRARIES = ("torch", "torchao", "executorch", "litert-torch", "ai-edge-litert", "numpy", "pillow")
# Measured on the demo model (benchmarks/export_figures.py, docs/BENCHMARKS.md): beyond ~256 images
# the int8 top-1 no longer moves, while calibration time keeps growing linearly.
DEFAULT_CALIB = 256
PRUNE_KINDS = ("channels", "magnitude")
# Short fine-tunes of the torch backend (docs/BENCHMARKS.md, "Compression (torch)"): epochs over the training
# split after channel pruning / while magnitude pruning, and of quantization-aware training.
# Measured on the demo model: channels:0.5 leaves the network at chance; 3 epochs on labels alone recovered val
# top-1 to 76.3%; 8 epochs distilled from the dense model with BatchNorm trained reach 86.0% test top-1 in float
# (dense float 86.5%; ~1 min per epoch on an idle 2-core host). QAT 2 epochs at 1e-4 took checkpoint B's int8
# from 0.9 point below float to 1.2 above (1 epoch at 2e-5 recovered 22%).
RECOVERY_EPOCHS = {"channels": 8, "magnitude": 4}
QAT_EPOCHS = 2


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
    """File-name suffix of a compressed variant: `-ch50` (channels removed), `-pruned50` (weights zeroed, as the
    keras backend names it), then `-qat` on int8 files that quantization-aware training made."""
    spec = parse_prune(prune)
    tag = ""
    if spec is not None:
        percent = f"{100 * spec[1]:g}".replace(".", "p")
        tag = f"-ch{percent}" if spec[0] == "channels" else f"-pruned{percent}"
    return tag + ("-qat" if qat and quant == "int8" else "")


@dataclass(frozen=True)
class ExportConfig:
    """Everything that decides an export; a recipe sets any field, CLI flags override it."""

    formats: tuple[str, ...] = FORMATS
    quant: tuple[str, ...] = QUANTS
    calib: int = DEFAULT_CALIB
    max_drop: float = 1.0
    bias_correction: bool = True
    fuse_clamp: bool = True
    seed: int = 0
    threads: int | None = None
    # "channels:R" (torch: remove a fraction R of channels) or "magnitude:S" (zero a fraction S of weights);
    # a bare number is magnitude sparsity (the keras backend's original meaning; keras has magnitude only).
    prune: str | float | None = None
    qat: bool = False  # quantization-aware training before the int8 export (torch: PT2E QAT; keras: tfmot)
    recovery_epochs: int | None = None  # torch: fine-tune epochs of pruning (None: RECOVERY_EPOCHS of its kind)
    qat_epochs: int = QAT_EPOCHS  # torch: epochs of quantization-aware training
    tune_images: int | None = None  # training images the short fine-tunes use (None: the whole training split)
    recovery_lr: float | None = None  # torch: learning rate of the pruning fine-tune (None: measured default)
    qat_lr: float | None = None  # torch: learning rate of QAT (None: measured default)
    # torch: weight of the dense float model's soft targets (knowledge distillation) in the pruning fine-tune
    # and in QAT, 0 to 1 (None: the measured default of each, backends/torch/compress.DISTILL)
    distill: float | None = None
    recipe: str | None = None

    def validate(self) -> ExportConfig:
        """Every bad value becomes one UserError line before any framework import."""
        formats = tuple(dict.fromkeys(_as_list(self.formats)))
        quant = tuple(dict.fromkeys(_as_list(self.quant)))
        if not formats:
            raise UserError(f"--formats is empty; valid: {', '.join(FORMATS)}")
        if not quant:
            raise UserError(f"--quant is empty; valid: {', '.join(QUANTS)}")
        for value in formats:
            if value not in FORMATS:
                raise UserError(one_of(value, FORMATS, "format"))
        for value in quant:
            if value not in QUANTS + KERAS_QUANTS:
                raise UserError(one_of(value, QUANTS + KERAS_QUANTS, "quantization"))
        prune = self.prune
        spec = parse_prune(prune)
        if spec is not None:  # canonical: a float stays a float (keras meaning); a spec string "kind:R"
            prune = spec[1] if isinstance(prune, float | int) or ":" not in str(prune) else f"{spec[0]}:{spec[1]:g}"
        if self.qat and "int8" not in quant:
            raise UserError(f"--qat trains for int8 but --quant is {','.join(quant)}; add int8 to --quant")
        if self.recovery_epochs is not None and not 0 <= self.recovery_epochs <= 1000:
            raise UserError(f"recovery_epochs {self.recovery_epochs} is not usable; valid: 0 to 1000")
        if not 1 <= self.qat_epochs <= 1000:
            raise UserError(f"qat_epochs {self.qat_epochs} is not usable; valid: 1 to 1000")
        for name in ("recovery_lr", "qat_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise UserError(f"{name} {value:g} is not usable; valid: a learning rate between 0 and 1")
        if self.distill is not None and not 0 <= self.distill <= 1:
            raise UserError(f"--distill {self.distill:g} is not usable; valid: 0 (labels only) to 1 (teacher only)")
        if self.tune_images is not None and self.tune_images < 1:
            raise UserError(f"tune_images {self.tune_images} is not usable; valid: 1 or more training images")
        if "int8" in quant and not 1 <= self.calib <= 100_000:
            raise UserError(f"--calib {self.calib} is not usable; valid: 1 or more training images")
        if not 0 <= self.max_drop <= 100:
            raise UserError(f"--max-drop {self.max_drop:g} is not usable; valid: 0 to 100 points of top-1")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads} is not usable; valid: 1 or more")
        return replace(self, formats=formats, quant=quant, prune=prune)

    @property
    def prune_spec(self) -> tuple[str, float] | None:
        return parse_prune(self.prune)

    def to_json(self) -> dict:
        payload = asdict(self)
        payload["formats"], payload["quant"] = list(self.formats), list(self.quant)
        return payload


def _as_list(value: object) -> list[str]:
    """'pte,tflite', ['pte', 'tflite'] or ('pte',) → ['pte', 'tflite'] (lower-case, no blanks)."""
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[arg-type]
    return [str(item).strip().lower() for item in items if str(item).strip()]


def recipe_names() -> list[str]:
    return sorted(path.stem for path in _recipes_dir().glob("*.toml"))


def _recipes_dir() -> Path:
    from edgetl import assets

    return assets.folder("export") / "recipes"


def load_recipe(name: str) -> dict:
    """A recipe by name (export/recipes/NAME.toml) or by path; returns the ExportConfig fields it sets."""
    path = Path(name)
    if path.suffix != ".toml":
        path = _recipes_dir() / f"{name}.toml"
    if not path.is_file():
        raise UserError(one_of(name, recipe_names(), "recipe"))
    try:
        payload = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"recipe {str(path)!r} is not valid TOML ({error})") from None
    payload.pop("description", None)
    known = {f.name for f in fields(ExportConfig)} - {"recipe"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise UserError(
            f"recipe {str(path)!r} sets unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    if "formats" in payload:
        payload["formats"] = tuple(_as_list(payload["formats"]))
    if "quant" in payload:
        payload["quant"] = tuple(_as_list(payload["quant"]))
    return payload


def resolve_config(recipe: str | None = None, **overrides: object) -> ExportConfig:
    """Defaults ← recipe ← flags that were given (None means 'not given')."""
    values: dict = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "formats" in values:
        values["formats"] = tuple(_as_list(values["formats"]))
    if "quant" in values:
        values["quant"] = tuple(_as_list(values["quant"]))
    return ExportConfig(recipe=recipe, **values).validate()


def artifact_name(manifest: dict, quant: str, fmt: str, tag: str = "") -> str:
    """`efficientnet_lite0-128-int8-ch50-qat.pte`: backbone, width, input size, precision, then `variant_tag`."""
    model = manifest["model"]
    width = "" if float(model["width"]) == 1.0 else f"-w{float(model['width']):g}"
    return f"{model['backbone']}{width}-{model['image_size']}-{quant}{tag}.{fmt}"


def _backend():
    try:
        from edgetl.backends.torch import export as backend
    except ImportError as error:
        raise UserError(
            f"the torch export backend cannot be imported ({error}); install it with: pip install 'edgetl[torch]'"
        ) from None
    return backend


def _check_framework_options(config: ExportConfig, framework: str) -> None:
    """Options that only one backend has are refused with the checkpoint's framework named."""
    spec = config.prune_spec
    if framework == "keras" and spec is not None and spec[0] == "channels":
        raise UserError(f"--prune {config.prune}: channel pruning is torch-only; this checkpoint's framework is "
                        f"keras (tfmot prunes by magnitude: use --prune magnitude:{spec[1]:g})")
    if framework == "torch":
        used = [f"--quant {q}" for q in config.quant if q in KERAS_QUANTS]
        if used:
            raise UserError(f"{', '.join(used)}: keras-only; this checkpoint's framework is torch "
                            f"(fine-tune with --framework keras to use them)")
    elif config.distill is not None:
        raise UserError(f"--distill {config.distill:g}: torch-only (distillation in the pruning fine-tune and "
                        f"QAT); this checkpoint's framework is keras")
    elif not (config.bias_correction and config.fuse_clamp):
        raise UserError("--no-bias-correction / fuse_clamp=false: torch-only (PT2E); this checkpoint's framework "
                        "is keras (TFLiteConverter quantizes it)")


def _keras_backend():
    try:
        from edgetl.backends.keras import export as backend
    except ImportError as error:
        raise UserError(
            f"the keras export backend cannot be imported ({error}); install it with: pip install 'edgetl[keras]'"
        ) from None
    return backend


def _load_split(
    listing: DatasetListing, records: list[tuple[str, int]], spec: dict, what: str
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode and preprocess images (NHWC float32); files that fail to decode are skipped and listed."""
    arrays, labels, skipped = [], [], []
    with progress() as bar:
        task = bar.add_task(what, total=len(records), status="")
        for rel, label in records:
            try:
                arrays.append(to_array(load_rgb(listing.root / rel), spec))
                labels.append(label)
            except Exception as error:  # Pillow raises many types for damaged files
                skipped.append({"path": rel, "reason": f"{type(error).__name__}: {error}"[:200]})
            bar.advance(task)
    if not arrays:
        raise UserError(f"no {what} image could be decoded under {str(listing.root)!r}")
    return np.stack(arrays).astype(np.float32), np.asarray(labels, dtype=np.int64), skipped


def load_listing(checkpoint: Path, manifest: dict) -> DatasetListing:
    """The checkpoint's own splits; the data must still be where fine-tuning found it."""
    listing = DatasetListing.from_json(json.loads((checkpoint / manifest["data"]["splits_file"]).read_text()))
    if not listing.root.is_dir():
        raise UserError(
            f"the checkpoint's data folder {str(listing.root)!r} is gone; export needs its test split and "
            f"training images for calibration"
        )
    if not listing.splits.get("test"):
        raise UserError(f"checkpoint {str(checkpoint)!r} has an empty test split; nothing to verify against")
    return listing


def run_export(checkpoint: Path, config: ExportConfig, out: Path | None = None) -> Path:
    """Export and verify; returns the export folder. Raises QualityError (after writing) on a big int8 drop."""
    checkpoint = Path(checkpoint)
    manifest = read_checkpoint_manifest(checkpoint)
    framework = manifest.get("framework")
    if framework not in ("torch", "keras"):
        raise UserError(f"checkpoint framework {framework!r} has no export backend; valid: torch, keras")
    config = config.validate()
    _check_framework_options(config, framework)
    out = Path(out) if out is not None else checkpoint.parent / "export"
    ensure_writable_dir(out.parent, "output folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {str(out)!r} exists and is not a folder; choose a folder path")
    spec_prune = config.prune_spec
    if framework == "keras":
        if spec_prune is not None and not isinstance(config.prune, float):
            config = replace(config, prune=spec_prune[1])  # the keras backend takes the sparsity as a number
        return _keras_backend().export_checkpoint(checkpoint, manifest, config, out)
    listing = load_listing(checkpoint, manifest)
    if spec_prune is not None or config.qat:
        _check_training_data(listing, "--prune" if spec_prune is not None else "--qat")
    with quiet_native():  # torchao prints harmless "Failed to load ... mxfp8" lines on import
        backend = _backend()

    spec = dict(manifest["preprocess"], layout="NHWC")
    x_test, y_test, skipped = _load_split(listing, listing.splits["test"], spec, "test images")
    want_int8 = "int8" in config.quant
    calibration = np.zeros((0, *x_test.shape[1:]), np.float32)
    if want_int8 and not config.qat:  # QAT learns its ranges in training: no calibration set
        train = listing.splits["train"]
        order = np.random.default_rng(config.seed).permutation(len(train))[: config.calib]
        calibration, _, bad = _load_split(listing, [train[i] for i in order], spec, "calibration images")
        skipped += bad
        if len(train) < config.calib:
            console.print(f"[yellow]--calib {config.calib}: only {len(train)} training images; using them all[/]")

    console.print(f"export: {checkpoint} → {out} ({', '.join(config.formats)} × {', '.join(config.quant)})")
    started = time.perf_counter()
    compress, pruned, pruning = None, None, None
    if spec_prune is not None or config.qat:
        with quiet_native():
            from edgetl.backends.torch import compress
    if spec_prune is not None:  # the pruned float model is what every file below is made from
        # not inside quiet_native: the fine-tune reports its epochs (it runs for minutes)
        pruned, pruning = compress.prune_model(checkpoint, manifest, listing, spec_prune, config)
    if want_int8 and not config.qat:
        console.print(f"int8: PT2E post-training quantization on {len(calibration)} calibration images…")
    int8_error, graphs = None, None
    if config.qat:  # outside quiet_native too, for the same reason
        try:
            graphs = compress.qat_graphs(checkpoint, manifest, listing, pruned, config)
        except Exception as error:  # int8 failing must not cost the fp32 files
            int8_error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    with quiet_native():
        try:
            if graphs is None:  # PTQ, or only the float graph when QAT failed
                graphs = backend.build_graphs(
                    checkpoint, manifest, calibration, want_int8 and not int8_error, config.bias_correction,
                    config.fuse_clamp, model=pruned,
                )
        except Exception as error:  # int8 failing must not cost the fp32 files
            if not want_int8:
                raise
            int8_error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            graphs = backend.build_graphs(checkpoint, manifest, calibration, False, model=pruned)
        reference = backend.logits(graphs.float_model, x_test)
    float_top1 = float((reference.argmax(axis=1) == y_test).mean())
    if int8_error:
        console.print(f"[red]int8: quantization failed[/] — {int8_error}")
    elif want_int8:
        console.print(f"int8: quantized in {graphs.quantization['seconds']:.0f} s")
    tag = {quant: variant_tag(config.prune, config.qat, quant) for quant in config.quant}

    parent = {
        "checkpoint": str(checkpoint.resolve()),
        "manifest_sha256": sha256_file(checkpoint / "manifest.json"),
        "weights_sha256": manifest["weights_sha256"],
    }
    versions = library_versions(EXPORT_LIBRARIES)
    artifacts: list[dict] = []
    with atomic_dir(out) as tmp:
        write_labels(tmp / "labels.txt", manifest["labels"])
        np.savez(tmp / TEST_INPUTS, x=x_test, y=y_test)
        np.savez(tmp / FLOAT_REFERENCE, logits=reference, labels=y_test)
        if pruning is not None:
            pruning["model_file"] = compress.save_pruned(pruned, tmp, pruning)
        for quant in config.quant:
            for fmt in config.formats:
                if quant == "int8" and int8_error:
                    artifacts.append({"file": artifact_name(manifest, quant, fmt, tag[quant]), "format": fmt,
                                      "quant": quant, "status": "failed", "error": f"quantization: {int8_error}"})
                    continue
                artifacts.append(_export_one(backend, graphs, manifest, quant, fmt, tmp, parent, versions, spec,
                                             tag[quant], pruning))
        record = verify_artifacts(tmp, [a for a in artifacts if a["status"] == "ok"], config.threads)
        record["float_top1_manifest"] = manifest["metrics"]["test"]["top1"]
        if pruning is not None:
            record["reference"] = f"pruned float model ({pruning['spec']})"
        for row in record["rows"]:
            _attach_verification(tmp, row)
        store(tmp, record)
        write_json(
            tmp / "manifest.json",
            {
                "kind": EXPORT_KIND,
                "schema_version": SCHEMA_VERSION,
                "created": now_utc(),
                "parent": parent,
                "model": manifest["model"],
                "labels": manifest["labels"],
                "preprocess": spec,
                "config": config.to_json(),
                "test_inputs": {"file": TEST_INPUTS, "images": int(len(y_test)), "layout": "NHWC",
                                "dtype": "float32", "skipped": skipped},
                "float_reference": {"file": FLOAT_REFERENCE, "top1": float_top1,
                                    "model": f"pruned ({pruning['method']})" if pruning else "checkpoint"},
                "quantization": graphs.quantization or None,
                "pruning": pruning,
                "artifacts": artifacts,
                "verification": record,
                "seconds": round(time.perf_counter() - started, 1),
                "versions": versions,
            },
        )
    print_record(record)
    if pruning is not None:
        console.print(compress.summary(pruning))
    failed = [a for a in artifacts if a["status"] != "ok"] + [r for r in record["rows"] if r["status"] != "ok"]
    console.print(f"export folder: {out}")
    if failed:
        names = ", ".join(sorted({f["file"] for f in failed}))
        raise ExportFailed(
            f"{len(failed)} export(s) failed: {names}; the others are in {str(out)!r} (see manifest.json)"
        )
    check_drop(record, config.max_drop)
    return out


class ExportFailed(UserError):
    """At least one format failed; the others were written."""

    exit_code = 1


def _check_training_data(listing: DatasetListing, option: str) -> None:
    """Pruning and QAT train on the checkpoint's training split: it must be listed and on disk."""
    train = listing.splits.get("train") or []
    if not train or not any((listing.root / rel).is_file() for rel, _ in train[:16]):
        raise UserError(f"{option} needs the checkpoint's training images, and none is reachable under "
                        f"{str(listing.root)!r} ({len(train)} listed); restore the data folder or drop {option}")


def _export_one(
    backend, graphs, manifest: dict, quant: str, fmt: str, folder: Path, parent: dict, versions: dict, spec: dict,
    tag: str = "", pruning: dict | None = None,
) -> dict:
    """One file and its sidecar manifest; any exception becomes a recorded failure, not a lost run."""
    name = artifact_name(manifest, quant, fmt, tag)
    entry = {"file": name, "format": fmt, "quant": quant, "status": "failed"}
    started = time.perf_counter()
    console.print(f"{name}: {'lowering to ExecuTorch (XNNPACK)' if fmt == 'pte' else 'converting with litert-torch'}…")
    try:
        module = graphs.int8 if quant == "int8" else graphs.float_model
        delegation = None
        with quiet_native():
            if fmt == "pte":
                payload, delegation = backend.lower_pte(module, graphs.example)
            else:
                payload = backend.convert_tflite(module, graphs.example, quantized=quant == "int8")
        atomic_write_bytes(folder / name, payload)
        seconds = round(time.perf_counter() - started, 1)
        sidecar = _sidecar(manifest, quant, fmt, name, folder, parent, versions, spec, graphs, delegation, seconds)
        sidecar["gzip_bytes"] = gzip_size(payload)
        if pruning is not None:
            sidecar["pruning"] = pruning
        write_json(folder / f"{name}.json", sidecar)
    except Exception as error:  # isolate this format: record why, keep going with the others
        (folder / name).unlink(missing_ok=True)  # a file without its manifest is not a finished artifact
        entry["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        console.print(f"[red]{name}: failed[/] — {entry['error']}")
        return entry
    entry.update(status="ok", bytes=sidecar["bytes"], gzip_bytes=sidecar["gzip_bytes"], sha256=sidecar["sha256"],
                 export_seconds=seconds, manifest=f"{name}.json")
    console.print(f"{name}: {sidecar['bytes'] / 1e6:.2f} MB (gzip {sidecar['gzip_bytes'] / 1e6:.2f} MB) "
                  f"in {seconds:.0f} s")
    if fmt == "tflite" and not sidecar["delegation"].get("whole_graph_delegated", True):
        console.print(f"[yellow]warning: {name}: LiteRT's XNNPACK delegate did not take the whole graph[/]")
    if delegation and delegation["compute_ops_outside"]:
        console.print(
            f"[yellow]warning: {name}: compute ops outside the XNNPACK delegate: "
            f"{', '.join(delegation['compute_ops_outside'])}[/] (they run on slower portable kernels)"
        )
    return entry


def _sidecar(manifest, quant, fmt, name, folder, parent, versions, spec, graphs, delegation, seconds) -> dict:
    """What an app, `edgetl bench` or a person needs to use this one file correctly."""
    path = folder / name
    size = manifest["model"]["image_size"]
    classes = manifest["model"]["num_classes"]
    if fmt == "tflite":
        io_info = _tflite_io(path)
        inputs, outputs = io_info["inputs"], io_info["outputs"]
        extra = {"ops": io_info["ops"], "delegation": io_info["delegation"]}
    else:
        internal = graphs.quantization.get("input_quantization") if quant == "int8" else None
        inputs = [{"name": "x", "dtype": "float32", "shape": [1, size, size, 3], "quantization": None,
                   "quantized_inside": internal}]
        outputs = [{"name": "logits", "dtype": "float32", "shape": [1, classes], "quantization": None}]
        extra = {"delegation": delegation}
    for tensor in inputs:
        tensor["layout"] = "NHWC"
    for tensor in outputs:
        tensor["meaning"] = "logits (apply softmax for probabilities), one per label in labels.txt"
    return {
        "kind": ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "created": now_utc(),
        "file": name,
        "format": fmt,
        "runtime": RUNTIMES[fmt],
        "quant": quant,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "labels_file": "labels.txt",
        "labels": manifest["labels"],
        "model": manifest["model"],
        "preprocess": spec,
        "input": inputs[0],
        "output": outputs[0],
        "quantization": graphs.quantization if quant == "int8" else None,
        "parent": parent,
        "export_seconds": seconds,
        **extra,
        "versions": versions,
    }


def gzip_size(payload: bytes) -> int:
    """Bytes after gzip -9: what zeroed weights save in a download (the file itself stays dense)."""
    import gzip

    return len(gzip.compress(payload, compresslevel=9, mtime=0))


def _tflite_io(path: Path) -> dict:
    from edgetl import runtimes

    return runtimes.describe(path, "tflite")


def _attach_verification(folder: Path, row: dict) -> None:
    """Copy a file's verification figures into its sidecar manifest."""
    sidecar = folder / f"{row['file']}.json"
    if not sidecar.is_file():
        return
    payload = json.loads(sidecar.read_text())
    payload["verification"] = {k: v for k, v in row.items() if k not in ("file", "format", "quant")}
    write_json(sidecar, payload)
