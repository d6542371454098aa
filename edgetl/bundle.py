"""The bundle stage: one exported, verified artifact in, an Android library module and an iOS package out.

Why it looks like this: the preprocessing the model was trained with must reach the app unchanged, so
every constant in the generated Kotlin/Swift comes from the artifact's sidecar manifest (and is written
again to preprocess.json); the bundled .tflite carries standard TFLite metadata so MediaPipe Tasks and
the TFLite Task Library take it as it is; and a golden set (images at the model's input size, with the
top-k the bundled model gives on the host) lets the app's own test, `golden_check.py` and `device_bench`
prove on a device that nothing was lost on the way. Framework-free until a runtime is needed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import unicodedata
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import numpy as np

from edgetl import assets, formats
from edgetl.config import BundleOptions
from edgetl.contracts import BUNDLE_KIND, SCHEMA_VERSION, SWEEP_KIND, ArtifactSidecar, read
from edgetl.errors import UserError, one_of
from edgetl.labels import check_labels, shown
from edgetl.manifest import now_utc, sha256_file, write_json
from edgetl.paths import atomic_dir, claim_output, ensure_writable_dir
from edgetl.ui import console

TEMPLATES = assets.folder("export")  # android/, ios/ and golden_check.py, shipped inside the package
ANDROID_MODULE = "edgetl-classifier"
IOS_PACKAGE = "EdgeTLClassifier"
KOTLIN_PACKAGE = Path("ai/edgetl/classifier")
# Device kernels (ARM XNNPACK) sum in another order than the host's; int8 requantization can move an
# output by one step. Softmax probabilities stay within these of the host's (top-1 must match exactly).
TOLERANCE = {"fp32": 0.01, "int8": 0.05}


def find_artifact(export_dir: Path, name: str | None) -> tuple[Path, dict]:
    """The artifact file and its sidecar manifest; every miss is one line naming what is there."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"export folder {str(export_dir)!r} does not exist; give the folder `edgetl export` wrote")
    present = sorted(p.name for p in export_dir.iterdir() if p.suffix in formats.SUFFIXES and p.is_file())
    if not present:
        raise UserError(f"{str(export_dir)!r} holds no {' or '.join(formats.SUFFIXES)} file; run `edgetl export` first")
    if name is None:
        name = present[0] if len(present) == 1 else recommended_artifact(export_dir, present)
    matches = [p for p in present if p == name or Path(p).stem == name]
    if len(matches) != 1:
        raise UserError(f"artifact {name!r} is not in {str(export_dir)!r}; available: {', '.join(present)}")
    path = export_dir / matches[0]
    sidecar_path = export_dir / f"{path.name}.json"
    if not sidecar_path.is_file():
        raise UserError(f"artifact {path.name!r} has no manifest ({sidecar_path.name} is missing in "
                        f"{str(export_dir)!r}); re-export it with `edgetl export`")
    sidecar = read(sidecar_path, ArtifactSidecar).to_json()  # every field checked, each problem one line
    check_code_values(path, sidecar, sidecar_path)
    if sha256_file(path) != sidecar["sha256"]:
        raise UserError(f"{path.name!r} does not match its manifest's sha256; the file changed after export")
    return path, sidecar


# A phone bundle takes the file recommended for the target most like a phone: a real device (ssh:, adb),
# then an emulated ARM64 CPU, then the host.
def _phone_rank(target: str, emulated: dict[str, bool]) -> int:
    if target == "host":
        return 2
    return 1 if emulated.get(target, target.startswith("arm64-")) else 0


def _sweep_file(export_dir: Path) -> Path | None:
    """sweep.json of the sweep this export belongs to: the one it is a variant of (SWEEP/variants/NAME/export),
    or RUN/sweep beside RUN/export (where `edgetl sweep RUN/checkpoint` writes by default)."""
    from edgetl.report import SWEEP_JSON

    folder = export_dir.resolve()
    candidates = [folder.parent / "sweep" / SWEEP_JSON]
    if folder.parent.parent.name == "variants":
        candidates.insert(0, folder.parent.parent.parent / SWEEP_JSON)
    return next((path for path in candidates if path.is_file()), None)


def _recommendations(sweep_json: Path) -> tuple[list[dict], dict[str, bool]] | None:
    """The sweep's recommendations that name a plain variant and file, and which targets were emulated; None
    when the file is not a sweep's."""
    try:
        document = json.loads(sweep_json.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("kind") != SWEEP_KIND:
        return None
    analysis = document.get("analysis") if isinstance(document.get("analysis"), dict) else {}
    found = analysis.get("recommendations") if isinstance(analysis.get("recommendations"), list) else []
    plain = [rec for rec in found if isinstance(rec, dict)
             and all(isinstance(rec.get(key), str) and rec[key] for key in ("target", "variant", "artifact"))
             and SAFE_NAME.match(rec["variant"]) and SAFE_NAME.match(rec["artifact"])]
    rows = document.get("rows") if isinstance(document.get("rows"), list) else []
    emulated = {row["target"]: bool(row.get("emulated")) for row in rows
                if isinstance(row, dict) and isinstance(row.get("target"), str)}
    return plain, emulated


def recommended_artifact(export_dir: Path, present: list[str]) -> str:
    """The file to bundle when --artifact is not given and the folder holds several: the one the run's sweep
    recommends for a phone, when it is in this folder (the very bytes the sweep measured); otherwise one line
    that says where the recommended file is, or that --artifact is needed."""
    choose = f"choose one with --artifact: {', '.join(present)}"
    many = f"{str(export_dir)!r} holds {len(present)} artifacts"
    sweep_json = _sweep_file(export_dir)
    read_back = _recommendations(sweep_json) if sweep_json is not None else None
    if not read_back or not read_back[0]:
        raise UserError(f"{many}; {choose} (no sweep of this run recommends one: `edgetl sweep RUN/checkpoint` "
                        "does)")
    recommendations, emulated = read_back
    rec = min(recommendations, key=lambda r: _phone_rank(r["target"], emulated))
    measured = sweep_json.parent / "variants" / rec["variant"] / "export" / rec["artifact"]
    here = Path(export_dir) / rec["artifact"]
    said = f"the sweep {str(sweep_json)!r} recommends {rec['variant']}/{rec['artifact']} for {rec['target']}"
    if rec["artifact"] not in present:
        why = "which is not in this folder"
    elif not measured.is_file():
        why = f"but the file it measured ({str(measured)!r}) is gone, so this one cannot be matched to it"
    elif measured.resolve() != here.resolve() and sha256_file(measured) != sha256_file(here):
        why = "but the file of that name here is another one (its sha256 differs from the file the sweep measured)"
    else:
        from rich.markup import escape as plain

        reason = "".join(c for c in " ".join(str(rec.get("reason") or "").split()) if c.isprintable())
        console.print(plain(f"bundle: {many}; taking {rec['artifact']}: {said}"
                            + (f" ({reason})" if reason else "") + "; another one with --artifact"))
        return rec["artifact"]
    where = f"bundle {str(measured.parent)!r} to take it, or " if measured.is_file() else ""
    raise UserError(f"{many}; {said}, {why}: {where}{choose}")


# ------------------------------------------------------------------ values that enter generated source code

# File names that go into Kotlin, Swift, Ruby and Gradle: edgetl's own names always fit; anything else is refused.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SAFE_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,3}([.+-][A-Za-z0-9]+){0,3}$")
SAFE_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DTYPES = ("float32", "int8", "uint8")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_code_values(path: Path, sidecar: dict, sidecar_path: Path) -> None:
    """Every sidecar value that the generated Kotlin, Swift, podspec, Gradle file or README uses, checked
    before anything is written against a conservative character set (that numbers are finite numbers and
    the sha256 64 hex digits, contracts.ArtifactSidecar has checked already). They are escaped for each
    language as well (`escape`); this makes a hostile file fail with one line."""
    where = f"manifest {str(sidecar_path)!r}"
    if not SAFE_NAME.match(path.name):
        raise UserError(f"artifact file name {shown(path.name)} has characters that edgetl does not put into app "
                        "code; valid: letters, digits, '.', '_' and '-' (rename the file, its .json and the 'file' "
                        "value inside it)")
    if sidecar.get("file") != path.name:
        raise UserError(f"{where} describes {shown(str(sidecar.get('file')))}, not {path.name!r}: it is not this "
                        "file's manifest; re-export it with `edgetl export`")
    if sidecar["format"] != formats.SUFFIXES.get(path.suffix):
        raise UserError(f"{where} says format {sidecar['format']!r} for a {path.suffix} file")
    if formats.get(sidecar["format"]).bundle is None:
        shipped = ", ".join(f.suffix for f in formats.FORMATS.values() if f.bundle is not None)
        raise UserError(f"{path.name}: edgetl bundle has no app templates for {path.suffix} files yet; valid: "
                        f"{shipped} (export one with --formats)")
    check_labels(sidecar["labels"], where, "export again from a checkpoint with usable labels")
    words = {"quant": sidecar["quant"], "model.backbone": sidecar["model"]["backbone"]}
    for key, value in words.items():
        if not SAFE_WORD.match(value):
            raise UserError(f"{where}: {key} {shown(value)} is not a plain name (letters, digits, . _ -)")
    if sidecar["model"]["image_size"] > 4096:
        raise UserError(f"{where}: model.image_size {sidecar['model']['image_size']} is not a size in pixels "
                        "(valid: 8 to 4096)")
    for side in ("input", "output"):
        if sidecar[side]["dtype"] not in DTYPES:
            raise UserError(f"{where}: {side} dtype {shown(sidecar[side]['dtype'])} is not one of {', '.join(DTYPES)}")
    version = (sidecar.get("versions") or {}).get("executorch")
    if version is not None and not (isinstance(version, str) and SAFE_VERSION.match(version)):
        raise UserError(f"{where}: versions.executorch {shown(str(version))} is not a version number")


def _escape_c_like(value: str, extra: dict[str, str], unicode_escape) -> str:
    table = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", **extra}
    out = []
    for char in value:
        if char in table:
            out.append(table[char])
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            out.append(unicode_escape(char))
        else:
            out.append(char)
    return "".join(out)


def escape(value: str, language: str) -> str:
    """`value` made safe inside a double-quoted string literal (and so inside a comment) of `language`.

    kotlin (also Gradle's Kotlin DSL): backslash, quote, `$` (templates), control characters;
    swift: backslash (so no `\\(...)` interpolation), quote, control characters; ruby: backslash, quote,
    `#` (no `#{...}` interpolation), control characters; xml: the five entities.
    """
    if language in ("kotlin", "gradle"):
        return _escape_c_like(value, {"$": "\\$"}, _utf16_escape)
    if language == "swift":
        return _escape_c_like(value, {"\0": "\\0"}, lambda c: f"\\u{{{ord(c):x}}}")
    if language == "ruby":
        return _escape_c_like(value, {"#": "\\#"}, lambda c: f"\\u{{{ord(c):x}}}")
    if language == "xml":
        return xml_escape(value, {'"': "&quot;", "'": "&apos;"})
    raise ValueError(f"no escaping for {language!r}")


def _utf16_escape(char: str) -> str:
    """Kotlin's \\uXXXX escapes are UTF-16 code units: characters beyond the BMP take two."""
    units = char.encode("utf-16-be", "surrogatepass")
    return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))


LANGUAGES = {".kt": "kotlin", ".kts": "gradle", ".swift": "swift", ".podspec": "ruby", ".xml": "xml"}


def markdown(value: object) -> str:
    """A value from a file as literal Markdown text: one line, no markup, no HTML."""
    text = " ".join(str(value).split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]#|!~])", r"\\\1", text)


def run_bundle(export_dir: Path, options: BundleOptions) -> Path:
    """Build the bundle folder (all or nothing) and return it."""
    export_dir = Path(export_dir)
    options = options.validate()
    platforms = options.platforms
    if not (TEMPLATES / "android").is_dir() or not (TEMPLATES / "ios").is_dir():
        raise UserError(f"the app templates are missing ({TEMPLATES}/android, ios) from this installation; "
                        f"reinstall edgetl")
    artifact, sidecar = find_artifact(export_dir, options.artifact)
    if not 1 <= options.top_k <= len(sidecar["labels"]):
        raise UserError(f"--top-k {options.top_k} is not usable; valid: 1 to {len(sidecar['labels'])}")
    inputs = export_dir / "test_inputs.npz"
    if not inputs.is_file():
        raise UserError(f"{str(export_dir)!r} has no test_inputs.npz; the golden images are drawn from it")
    out = Path(options.out) if options.out else export_dir.parent / "bundle" / artifact.stem
    claim_output(out, BUNDLE_KIND, [export_dir, artifact], manifest="bundle.json")
    ensure_writable_dir(out.parent, "output folder")
    started = time.perf_counter()
    console.print(f"bundle: {artifact} → {out} ({', '.join(platforms)})")
    with atomic_dir(out) as tmp:
        work = tmp / ".work"
        work.mkdir()
        labels_file = work / "labels.txt"
        labels_file.write_text("".join(f"{label}\n" for label in sidecar["labels"]))
        model, io, metadata = _bundled_model(artifact, sidecar, labels_file, work, options)
        spec = preprocess_json(sidecar, model.name, io, (metadata or {}).get("normalization_in_graph"),
                               bool((metadata or {}).get("softmax_in_graph")))
        golden = _golden(export_dir, artifact, sidecar, model, spec, tmp / "golden", options)
        if metadata is not None and io["input"]["dtype"] == "float32":
            metadata["mediapipe"] = _mediapipe_check(model, sidecar["format"], tmp / "golden", golden)
            if metadata["mediapipe"].get("top1_agree", len(golden["images"])) != len(golden["images"]):
                console.print(f"[yellow]warning: MediaPipe's top-1 differs from the host's on "
                              f"{len(golden['images']) - metadata['mediapipe']['top1_agree']} golden image(s)[/]")
        elif metadata is not None:
            metadata["mediapipe"] = {"skipped": f"{io['input']['dtype']} input tensor (--int8-io); MediaPipe takes "
                                                "float32, or uint8 holding raw pixels"}
        files = {"model": model, "labels": labels_file, "spec": spec}
        if "android" in platforms:
            _android(tmp / "android" / ANDROID_MODULE, sidecar, files, tmp / "golden")
        if "ios" in platforms:
            _ios(tmp / "ios" / IOS_PACKAGE, sidecar, files, tmp / "golden")
        assets.copy_folder("device_bench", tmp / "device_bench")
        shutil.copy2(model, tmp / "device_bench" / model.name)
        shutil.copy2(assets.file("export", "golden_check.py"), tmp / "device_bench" / "golden_check.py")
        shutil.copy2(tmp / "golden" / "golden.npz", tmp / "device_bench" / "golden.npz")
        shutil.copy2(tmp / "golden" / "expected.json", tmp / "device_bench" / "expected.json")
        record = {
            "kind": BUNDLE_KIND, "schema_version": SCHEMA_VERSION, "created": now_utc(),
            "source": {"export_dir": str(export_dir.resolve()), "artifact": artifact.name,
                       "sha256": sidecar["sha256"], "verification": sidecar.get("verification")},
            "model": {"file": model.name, "bytes": model.stat().st_size, "sha256": sha256_file(model),
                      "changed": model.read_bytes() != artifact.read_bytes(), "input": io["input"],
                      "output": io["output"], "tflite_metadata": metadata},
            "platforms": list(platforms), "preprocess": spec, "golden": golden,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / "README.md").write_text(_readme(record, sidecar))
        write_json(tmp / "bundle.json", record)
        shutil.rmtree(work)
    console.print(f"bundle folder: {out}  (golden: {len(golden['images'])} images, top-1 as on the host"
                  + (f"; MediaPipe agrees on {metadata['mediapipe']['top1_agree']}/{len(golden['images'])}"
                     if metadata and "top1_agree" in metadata["mediapipe"] else "") + ")")
    return out


# ------------------------------------------------------------------------------------------ the model


def _bundled_model(artifact: Path, sidecar: dict, labels_file: Path, work: Path,
                   options: BundleOptions) -> tuple[Path, dict, dict | None]:
    """The file that ships: with the metadata its format carries for apps (a .tflite's: labels, normalisation;
    float32 I/O around int8 unless --int8-io), or as exported."""
    target = work / artifact.name
    write = formats.app_hook(sidecar["format"], "app_metadata")
    if write is None or not options.metadata:
        shutil.copy2(artifact, target)
        io = _io(target, sidecar, rewritten=False)
        return target, io, None
    float_io = not options.int8_io
    with console.status(f"{artifact.name}: writing metadata for apps (labels, normalisation)"):
        view = write(artifact, target, sidecar, labels_file, float_io)
    metadata = dict(view["metadata"] or {})
    metadata["associated_files"] = sorted(view["associated_files"])
    metadata["float_io_wrapper"] = float_io and sidecar["input"].get("dtype") in ("int8", "uint8")
    metadata["normalization_in_graph"] = view["normalization_in_graph"]
    metadata["softmax_in_graph"] = view["softmax_in_graph"]
    return target, _io(target, sidecar, rewritten=True), metadata


def _io(model: Path, sidecar: dict, rewritten: bool) -> dict:
    """Input/output tensors of the bundled file (its own, after any wrapper), in the sidecar's format."""
    if rewritten:
        described = formats.describe(model, sidecar["format"])
        return {"input": described["inputs"][0], "output": described["outputs"][0]}
    keep = ("name", "dtype", "shape", "quantization")
    return {"input": {k: sidecar["input"].get(k) for k in keep}, "output": {k: sidecar["output"].get(k) for k in keep}}


def preprocess_json(sidecar: dict, model_file: str, io: dict, in_graph: dict | None = None,
                    softmax: bool = False) -> dict:
    """What an app needs to turn a picture into the bundled model's input, and its output into labels.
    With `in_graph` the model normalises per channel itself, so the app feeds plain pixel values."""
    pre = sidecar["preprocess"]
    scale = float(pre["scale"])
    channels = len(pre["mean"])
    return {
        "schema_version": SCHEMA_VERSION,
        "model_file": model_file,
        "labels_file": "labels.txt",
        "format": sidecar["format"],
        "color": pre["color"],
        "resize": pre["resize"],
        "layout": "NHWC",
        "scale": scale,
        "mean": pre["mean"],
        "std": pre["std"],
        "pixel_mean": [0.0] * channels if in_graph else [float(m) / scale for m in pre["mean"]],
        "pixel_std": [1.0] * channels if in_graph else [float(s) / scale for s in pre["std"]],
        "normalization_in_graph": in_graph,
        "formula": "x[c] = (pixel[c] * scale - mean[c]) / std[c]; the app feeds (pixel[c] - pixel_mean[c]) / "
                   "pixel_std[c]" + (" and the model applies pixel * multiplier + offset itself" if in_graph else "")
                   + "; int8/uint8 input: q = clamp(round(x / input.scale) + input.zero_point)",
        "input": {k: io["input"].get(k) for k in ("dtype", "shape", "quantization")},
        "output": {**{k: io["output"].get(k) for k in ("dtype", "shape", "quantization")},
                   "meaning": "probabilities (softmax inside the model), one per line of labels.txt" if softmax
                   else "logits, one per line of labels.txt; softmax gives probabilities",
                   "kind": "probabilities" if softmax else "logits"},
        "num_classes": len(sidecar["labels"]),
    }


# ----------------------------------------------------------------------------------------- the golden set


def _pixels(x: np.ndarray, pre: dict) -> np.ndarray:
    """Undo normalisation: the uint8 RGB picture (at the model's size) that preprocesses back to `x`."""
    mean, std = np.asarray(pre["mean"], np.float64), np.asarray(pre["std"], np.float64)
    return np.clip(np.round((x.astype(np.float64) * std + mean) / float(pre["scale"])), 0, 255).astype(np.uint8)


def _golden(export_dir: Path, artifact: Path, sidecar: dict, model: Path, spec: dict, folder: Path,
            options: BundleOptions) -> dict:
    """A few test images, one per class where possible, with a clear top-1 margin, and what the bundled
    model gives for them on the host (checked against the exported artifact itself)."""
    from PIL import Image

    from edgetl.data import to_array
    data = np.load(export_dir / "test_inputs.npz")
    pre = dict(sidecar["preprocess"], layout="NHWC")
    # Candidates: the first few test images of every class (test splits are often sorted by class).
    all_truth = data["y"]
    per_class = max(2, 200 // max(1, len(sidecar["labels"])))
    picked = np.sort(np.concatenate([np.flatnonzero(all_truth == label)[:per_class]
                                     for label in range(len(sidecar["labels"]))]))[:400]
    candidates, truth = data["x"][picked], all_truth[picked]
    pictures = [_pixels(x, pre) for x in candidates]
    xs = np.stack([to_array(Image.fromarray(p), pre) for p in pictures]).astype(np.float32)
    # What the app feeds the bundled model: the same pictures through preprocess.json's constants.
    app = np.stack(pictures).astype(np.float32)
    app = ((app - np.asarray(spec["pixel_mean"], np.float32)) / np.asarray(spec["pixel_std"], np.float32))
    fmt = sidecar["format"]
    raw = formats.run(model, app, fmt=fmt)
    probs = raw if spec["output"]["kind"] == "probabilities" else formats.softmax(raw)
    tolerance = TOLERANCE.get(sidecar["quant"], 0.05)
    ordered = np.sort(probs, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    chosen: list[int] = []
    for label in range(len(sidecar["labels"])):  # one per class first, each with a clear margin
        clear = [int(i) for i in np.flatnonzero(truth == label)
                 if margin[i] > 4 * tolerance and probs[i].argmax() == label]
        if clear and len(chosen) < options.golden:
            chosen.append(clear[0])
    for i in np.argsort(-margin):  # then the clearest of the rest
        if len(chosen) < options.golden and int(i) not in chosen:
            chosen.append(int(i))
    source = formats.softmax(formats.run(artifact, xs[chosen], fmt=fmt))
    mismatch = [i for i, j in enumerate(chosen) if source[i].argmax() != probs[j].argmax()]
    if mismatch:
        raise UserError(f"the bundled model disagrees with {artifact.name} on golden image(s) {mismatch}; "
                        f"bundle with --no-metadata to ship the file unchanged")
    folder.mkdir(parents=True)
    images = []
    labels = sidecar["labels"]
    for n, i in enumerate(chosen):
        name = f"golden_{n:02d}_{_file_label(labels[int(truth[i])])}.png"
        Image.fromarray(pictures[i]).save(folder / name)
        top = np.argsort(-probs[i])[: options.top_k]
        images.append({"file": name, "true_label": labels[int(truth[i])], "true_index": int(truth[i]),
                       "top_k": [{"index": int(k), "label": labels[int(k)], "score": round(float(probs[i][k]), 6)}
                                 for k in top]})
    expected = {
        "schema_version": SCHEMA_VERSION, "model_file": model.name, "tolerance": tolerance, "top_k": options.top_k,
        "scores": "softmax probabilities of the bundled model on the host (ai-edge-litert / ExecuTorch)",
        "model_output": spec["output"]["kind"],
        "max_prob_diff_vs_artifact": round(float(np.abs(source - probs[chosen]).max()), 6),
        "images": images,
    }
    write_json(folder / "expected.json", expected)
    np.savez(folder / "golden.npz", x=app[chosen], y=np.asarray([im["top_k"][0]["index"] for im in images]))
    return expected


def _file_label(label: str) -> str:
    """A label as part of a file name: letters, digits, '_' and '-' only (the label itself is in expected.json)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:40] or "label"


def _mediapipe_check(model: Path, fmt: str, folder: Path, golden: dict) -> dict:
    """The format's task library (a .tflite: MediaPipe Tasks' ImageClassifier) on the golden images: does it take
    the file as it is, metadata and all?"""
    classify = formats.app_hook(fmt, "app_classify")
    if classify is None:
        return {"skipped": f"no task library reads .{fmt} metadata"}
    with console.status("MediaPipe Tasks ImageClassifier on the golden images"):
        results = classify(model, [folder / im["file"] for im in golden["images"]], golden["top_k"])
    top1 = [row[0]["index"] if row else None for row in results]
    best = [_tied_top(im["top_k"]) for im in golden["images"]]
    agree = sum(int(t in tied) for t, tied in zip(top1, best, strict=True))
    return {"top1": top1, "top1_agree": agree, "images": len(top1), "tied_top1": sum(int(len(t) > 1) for t in best)}


def _tied_top(top_k: list[dict]) -> set[int]:
    """The classes that share the highest score: an int8 output can round two classes to the same value, and
    then either is the top-1 (runtimes break the tie differently), so a task library naming either agrees."""
    return {entry["index"] for entry in top_k if entry["score"] >= top_k[0]["score"]} if top_k else set()


# ----------------------------------------------------------------------------------------- the platforms


def _constants(sidecar: dict, files: dict) -> dict[str, str]:
    spec = files["spec"]
    size = spec["resize"]
    q_in = spec["input"]["quantization"] or {"scale": 1.0, "zero_point": 0}
    q_out = spec["output"]["quantization"] or {"scale": 1.0, "zero_point": 0}
    model = files["model"]
    mean = [_float_literal(v) for v in spec["pixel_mean"]]
    std = [_float_literal(v) for v in spec["pixel_std"]]
    return {
        "ARTIFACT": sidecar["file"], "ARTIFACT_SHA": sidecar["sha256"], "MODEL_FILE": model.name,
        "MODEL_STEM": model.stem, "MODEL_EXT": model.suffix[1:],
        "INPUT_WIDTH": str(int(size["width"])), "INPUT_HEIGHT": str(int(size["height"])),
        "NUM_CLASSES": str(int(spec["num_classes"])),
        "PIXEL_MEAN": ", ".join(f"{v}f" for v in mean), "PIXEL_STD": ", ".join(f"{v}f" for v in std),
        "PIXEL_MEAN_SWIFT": ", ".join(mean), "PIXEL_STD_SWIFT": ", ".join(std),
        "INPUT_DTYPE": _one_of(spec["input"]["dtype"], DTYPES), "INPUT_SCALE": _float_literal(q_in["scale"]),
        "INPUT_ZERO_POINT": str(int(q_in["zero_point"])),
        "OUTPUT_DTYPE": _one_of(spec["output"]["dtype"], DTYPES), "OUTPUT_SCALE": _float_literal(q_out["scale"]),
        "OUTPUT_ZERO_POINT": str(int(q_out["zero_point"])),
        "OUTPUT_KIND": _one_of(spec["output"]["kind"], ("logits", "probabilities")),
        "EXECUTORCH_VERSION": str(sidecar.get("versions", {}).get("executorch") or "1.5.1"),
    }


def _float_literal(value: object) -> str:
    """A finite number as a literal every target language reads the same (1.0, 0.0078125, 1e-05)."""
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise UserError(f"a preprocessing or quantization constant is {number}; the app code needs finite numbers")
    return repr(number)


def _one_of(value: object, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise UserError(one_of(value, valid, "value for the generated code"))
    return str(value)


def _fill(template: Path, target: Path, values: dict[str, str]) -> None:
    """Fill `{{KEY}}` placeholders, each value escaped for the template's language."""
    language = LANGUAGES[template.suffix]
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", escape(value, language))
    if "{{" in text:
        raise RuntimeError(f"template {template} has an unfilled placeholder")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _android(root: Path, sidecar: dict, files: dict, golden: Path) -> None:
    """Gradle library module: assets, Kotlin classifier for the artifact's runtime, instrumented golden test."""
    fmt = sidecar["format"]
    values = _constants(sidecar, files)
    apps = _apps(sidecar)
    values.update(RUNTIME_DEPENDENCY=_filled(apps.android_dependency, sidecar), MIN_SDK="24",
                  RUNTIME_NOTE=_filled(apps.android_note, sidecar))
    source = TEMPLATES / "android"
    kotlin = root / "src/main/kotlin" / KOTLIN_PACKAGE
    _fill(source / "build.gradle.kts", root / "build.gradle.kts", values)
    _fill(source / "src/main/AndroidManifest.xml", root / "src/main/AndroidManifest.xml", values)
    template_kotlin = source / "src/main/kotlin" / KOTLIN_PACKAGE
    _fill(template_kotlin / "ModelSpec.kt", kotlin / "ModelSpec.kt", values)
    _fill(template_kotlin / "Preprocessing.kt", kotlin / "Preprocessing.kt", values)
    _fill(template_kotlin / f"ImageClassifier.{fmt}.kt", kotlin / "ImageClassifier.kt", values)
    test = KOTLIN_PACKAGE / "GoldenImageTest.kt"
    _fill(source / "src/androidTest/kotlin" / test, root / "src/androidTest/kotlin" / test, values)
    assets = root / "src/main/assets"
    assets.mkdir(parents=True)
    shutil.copy2(files["model"], assets / files["model"].name)
    shutil.copy2(files["labels"], assets / "labels.txt")
    write_json(assets / "preprocess.json", files["spec"])
    shutil.copytree(golden, root / "src/androidTest/assets/golden", ignore=shutil.ignore_patterns("*.npz"))


def _ios(root: Path, sidecar: dict, files: dict, golden: Path) -> None:
    """Swift package (ExecuTorch, SwiftPM) or development pod (TensorFlowLiteSwift, CocoaPods only)."""
    fmt = sidecar["format"]
    values = _constants(sidecar, files)
    source = TEMPLATES / "ios"
    manifest = _filled(_apps(sidecar).ios_manifest, sidecar)
    _fill(source / manifest, root / manifest, values)
    swift = Path("Sources") / IOS_PACKAGE
    for name in ("ModelSpec.swift", "Preprocessing.swift", "Resources.swift"):
        _fill(source / swift / name, root / swift / name, values)
    _fill(source / swift / f"ImageClassifier.{fmt}.swift", root / swift / "ImageClassifier.swift", values)
    tests = Path("Tests") / f"{IOS_PACKAGE}Tests"
    _fill(source / tests / "GoldenImageTests.swift", root / tests / "GoldenImageTests.swift", values)
    resources = root / swift / "Resources"
    resources.mkdir(parents=True)
    shutil.copy2(files["model"], resources / files["model"].name)
    shutil.copy2(files["labels"], resources / "labels.txt")
    write_json(resources / "preprocess.json", files["spec"])
    shutil.copytree(golden, root / tests / "golden", ignore=shutil.ignore_patterns("*.npz"))


# ----------------------------------------------------------------------------------------------- README


def _readme(record: dict, sidecar: dict) -> str:
    model = record["model"]
    golden = record["golden"]
    platforms = record["platforms"]
    meta = model["tflite_metadata"]
    lines = [
        f"# {model['file']} — app bundle made by edgetl",
        "",
        f"Model: {sidecar['model']['backbone']} ({sidecar['quant']}, {sidecar['model']['image_size']} px, "
        f"{len(sidecar['labels'])} classes), from `{sidecar['file']}` (sha256 `{sidecar['sha256'][:16]}…`).",
    ]
    verification = sidecar.get("verification") or {}
    if _finite(verification.get("top1")):
        lines.append(f"Verified by edgetl on {markdown(verification.get('images'))} held-out images: top-1 "
                     f"{100 * verification['top1']:.1f}% in {markdown(sidecar['runtime'])}.")
    lines += [
        "",
        "Preprocessing (also in `preprocess.json` and as constants in `ModelSpec`): RGB, bilinear resize to "
        f"{record['preprocess']['resize']['width']}×{record['preprocess']['resize']['height']} (no aspect kept), "
        f"x = (pixel × {record['preprocess']['scale']:.6g} − mean {_list(record['preprocess']['mean'])}) / std "
        f"{_list(record['preprocess']['std'])} per channel (pixel 0–255), NHWC; "
        + ("the bundled model applies this itself, so apps feed pixel values as float32"
           if record["preprocess"]["normalization_in_graph"] else
           f"apps compute (pixel − {_list(record['preprocess']['pixel_mean'])}) / "
           f"{_list(record['preprocess']['pixel_std'])}")
        + f"; input tensor {model['input']['dtype']}"
        + (f" (scale {model['input']['quantization']['scale']:.6g}, zero point "
           f"{model['input']['quantization']['zero_point']})" if model["input"].get("quantization") else "")
        + (". The output is probabilities (softmax inside the model)." if record["preprocess"]["output"]["kind"]
           == "probabilities" else ". The output is logits; the classifiers apply softmax."),
        "",
    ]
    if meta:
        lines += [
            f"The .tflite carries standard TFLite metadata: labels (`{meta.get('labels_file')}`, associated file), "
            f"NormalizationOptions mean {_list(meta['mean'])} std {_list(meta['std'])}, RGB ImageProperties; "
            "MediaPipe Tasks' ImageClassifier and the TFLite Task Library take it as it is."
            + (" Its int8 graph is wrapped in float32 input/output (QUANTIZE/DEQUANTIZE), because MediaPipe "
               "accepts only float32 or uint8 input tensors." if meta.get("float_io_wrapper") else ""),
            (f"MediaPipe check on the host: top-1 as expected on {meta['mediapipe']['top1_agree']}/"
             f"{meta['mediapipe']['images']} golden images." if "top1_agree" in meta["mediapipe"]
             else f"MediaPipe check skipped: {meta['mediapipe']['skipped']}."),
            "",
        ]
        if meta.get("normalization_in_graph"):
            lines[-2:-2] = ["The per-channel mean/std are applied inside the model (MUL, ADD at its input), "
                            "because MediaPipe rejects per-channel NormalizationOptions: apps feed RGB pixel "
                            "values 0–255 as float32."]
    apps = _apps(sidecar)
    if "android" in platforms:
        dependency = _filled(apps.android_dependency, sidecar)
        lines += [
            "## Android (Gradle library module `android/edgetl-classifier`)",
            "",
            f"1. Copy `android/{ANDROID_MODULE}/` into your project, next to `app/`.",
            f"2. In `settings.gradle.kts`: `include(\":{ANDROID_MODULE}\")` (the module uses the `com.android.library` "
            "and `org.jetbrains.kotlin.android` plugins; declare them in the root build file if you have not).",
            f"3. In `app/build.gradle.kts`: `implementation(project(\":{ANDROID_MODULE}\"))` — it brings "
            f"`{dependency}` and keeps `.{Path(model['file']).suffix[1:]}` uncompressed (`noCompress`).",
            "4. In code: `ImageClassifier(context).use { it.classify(bitmap, k = 3) }` → list of "
            "`Category(index, label, score)`, best first (Android's bilinear scaling does not antialias: for "
            "photos much larger than the input, scale down in steps first, as training's resize averaged).",
            f"5. On a phone or emulator: `./gradlew :{ANDROID_MODULE}:connectedAndroidTest` runs the golden-image "
            "self-test.",
            "",
        ]
    if "ios" in platforms:
        lines += [_filled(line, sidecar) for line in apps.ios_readme]
    lines += [
        "## Golden self-test",
        "",
        f"`golden/` holds {len(golden['images'])} images at the model's input size, and `expected.json` the top-"
        f"{golden['top_k']} the bundled model gives for them on the host (softmax probabilities). A device passes "
        f"when every top-1 matches and every listed probability is within {golden['tolerance']} "
        "(device kernels sum in another order; int8 requantization can move an output by one step).",
        "",
        "## On a phone, without an app: `device_bench/`",
        "",
        "`device_bench/` is edgetl's standalone benchmark (standard library, numpy and one runtime), with the "
        f"bundled `{model['file']}`, `golden.npz`, `expected.json` and `golden_check.py`.",
        "",
        "- Termux: `pkg install proot-distro && proot-distro install debian && proot-distro login debian`, then "
        "`apt update && apt install python3-venv && python3 -m venv v && . v/bin/activate && "
        "pip install -r requirements.txt` (the runtimes' wheels are manylinux, hence the Debian userland).",
        "- adb shell: `adb push device_bench /data/local/tmp/` and run the same commands in a shell that has such a "
        "Python (for example the Termux one above).",
        f"- Self-test: `python golden_check.py {model['file']}` (exit 0 when the device matches the host).",
        f"- Same check with timing: `python device_bench.py {model['file']} --inputs golden.npz --threads 4 "
        "--out result.json` — its `accuracy.top1` must be 1.0, because `golden.npz`'s labels are the host's top-1.",
    ]
    lines += [_filled(line, sidecar) for line in apps.device_bench_readme]
    return "\n".join(lines) + "\n"


def _apps(sidecar: dict) -> formats.AppTemplates:
    """The app templates of the file's format (`bundle` refuses a format without them before any work)."""
    return formats.get(sidecar["format"]).bundle


def _filled(text: str, sidecar: dict) -> str:
    """A template text of the format's record with the iOS library's name and the ExecuTorch version filled in."""
    return text.format(package=IOS_PACKAGE, executorch=sidecar.get("versions", {}).get("executorch") or "1.5.1")


def _list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
