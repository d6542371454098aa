"""edgetl bundle: the files and their contents, generated constants against the manifest, TFLite metadata
read back, MediaPipe Tasks' ImageClassifier on the bundled .tflite, the generated Kotlin compiled (and its
preprocessing run on the JVM), the golden self-test script, bad input and all-or-nothing writes."""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "kotlin_stubs"
KOTLIN_DIR = "android/edgetl-classifier/src/main/kotlin/ai/edgetl/classifier"
SWIFT_DIR = "ios/EdgeTLClassifier/Sources/EdgeTLClassifier"


def _tool_venv(name: str = "mediapipe-1.2.2") -> Path:
    """Tool venvs are kept between runs (each takes a minute or two to install, once per machine)."""
    base = Path(os.environ.get("EDGETL_TEST_CACHE") or Path.home() / ".cache" / "edgetl-tests")
    return base / name


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real export (fp32 + int8 .tflite, per-channel ImageNet mean/std), built in a subprocess so this
    process stays free of torch."""
    folder = tmp_path_factory.mktemp("export")
    code = "import sys; from pathlib import Path; from tests.bundle_fixture import build_export; " \
           "build_export(Path(sys.argv[1]), ('int8', 'fp32'))"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def bundles(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same export bundled four ways, in-process (the bundle stage needs ai-edge-litert, not torch)."""
    from edgetl.bundle import BundleOptions, run_bundle

    os.environ["EDGETL_MEDIAPIPE_VENV"] = str(_tool_venv())
    root = tmp_path_factory.mktemp("bundles")
    variants = {
        "int8": BundleOptions(artifact="tiny-32-int8.tflite"),
        "fp32": BundleOptions(artifact="tiny-32-fp32", platforms=("android",)),
        "int8io": BundleOptions(artifact="tiny-32-int8.tflite", int8_io=True, golden=3),
        "plain": BundleOptions(artifact="tiny-32-int8.tflite", metadata=False, platforms=("ios",)),
    }
    made = {}
    for name, options in variants.items():
        made[name] = run_bundle(export_dir, BundleOptions(**{**options.__dict__, "out": root / name}))
    return made


def _sidecar(export_dir: Path, name: str) -> dict:
    return json.loads((export_dir / f"{name}.json").read_text())


def _kotlin_constants(path: Path) -> dict[str, object]:
    text = path.read_text()
    found: dict[str, object] = {}
    for name, value in re.findall(r"const val (\w+) = (.+)", text):
        found[name] = value.strip('"') if value.startswith('"') else float(value.rstrip("f"))
    for name, values in re.findall(r"val (\w+) = floatArrayOf\((.*)\)", text):
        found[name] = [float(v.strip().rstrip("f")) for v in values.split(",")]
    return found


def _swift_constants(path: Path) -> dict[str, object]:
    text = path.read_text()
    found: dict[str, object] = {}
    for name, value in re.findall(r"static let (\w+)(?:: \w+)? = ([^\[\n]+)$", text, flags=re.M):
        found[name] = value.strip('"') if value.startswith('"') else float(value)
    for name, values in re.findall(r"static let (\w+): \[Float\] = \[(.*)\]", text):
        found[name] = [float(v) for v in values.split(",")]
    return found


# ------------------------------------------------------------------------------------------- contents


def test_bundle_holds_everything_an_app_needs(bundles: dict[str, Path], export_dir: Path) -> None:
    root = bundles["int8"]
    record = json.loads((root / "bundle.json").read_text())
    model = record["model"]["file"]
    assert model == "tiny-32-int8.tflite"
    android = root / "android/edgetl-classifier"
    ios = root / "ios/EdgeTLClassifier"
    for path in [android / "build.gradle.kts", android / "src/main/AndroidManifest.xml",
                 android / "src/main/assets" / model, android / "src/main/assets/labels.txt",
                 android / "src/main/assets/preprocess.json", root / KOTLIN_DIR / "ImageClassifier.kt",
                 root / KOTLIN_DIR / "ModelSpec.kt", root / KOTLIN_DIR / "Preprocessing.kt",
                 android / "src/androidTest/kotlin/ai/edgetl/classifier/GoldenImageTest.kt",
                 android / "src/androidTest/assets/golden/expected.json",
                 ios / "EdgeTLClassifier.podspec", root / SWIFT_DIR / "ImageClassifier.swift",
                 root / SWIFT_DIR / "Resources" / model, root / SWIFT_DIR / "Resources/labels.txt",
                 ios / "Tests/EdgeTLClassifierTests/GoldenImageTests.swift",
                 ios / "Tests/EdgeTLClassifierTests/golden/expected.json",
                 root / "device_bench/device_bench.py", root / "device_bench/requirements.txt",
                 root / "device_bench/golden_check.py", root / "device_bench" / model, root / "README.md"]:
        assert path.is_file(), path
    assert not (ios / "Package.swift").exists()  # TensorFlowLiteSwift is CocoaPods-only
    bundled = (android / "src/main/assets" / model).read_bytes()
    assert bundled == (root / SWIFT_DIR / "Resources" / model).read_bytes()
    assert bundled == (root / "device_bench" / model).read_bytes()
    assert record["model"]["sha256"] != _sidecar(export_dir, model)["sha256"]  # metadata was added
    assert (android / "src/main/assets/labels.txt").read_text() == (export_dir / "labels.txt").read_text()
    gradle = (android / "build.gradle.kts").read_text()
    assert 'implementation("com.google.ai.edge.litert:litert:' in gradle
    assert 'noCompress += listOf("tflite")' in gradle
    for text_file in [*root.rglob("*.kt"), *root.rglob("*.swift"), *root.rglob("*.kts"), *root.rglob("*.podspec")]:
        text = text_file.read_text()
        assert "{{" not in text and "}}" not in text, text_file  # every placeholder filled
        assert text.count("{") == text.count("}") and text.count("(") == text.count(")"), text_file
    kotlin = (root / KOTLIN_DIR / "ImageClassifier.kt").read_text()
    assert "org.tensorflow.lite.Interpreter" in kotlin and "executorch" not in kotlin
    assert "import TensorFlowLite" in (root / SWIFT_DIR / "ImageClassifier.swift").read_text()
    assert "TensorFlowLiteSwift" in (ios / "EdgeTLClassifier.podspec").read_text()
    expected = json.loads((root / "golden/expected.json").read_text())
    assert len(expected["images"]) == 5 and expected["tolerance"] == 0.05
    for image in expected["images"]:
        picture = Image.open(root / "golden" / image["file"])
        assert picture.size == (32, 32) and picture.mode == "RGB"
        assert len(image["top_k"]) == 3
        scores = [e["score"] for e in image["top_k"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert not list(root.parent.glob(".int8.tmp-*")) and not (root / ".work").exists()


def test_readme_has_five_steps_or_fewer_per_platform(bundles: dict[str, Path]) -> None:
    text = (bundles["int8"] / "README.md").read_text()
    for heading in ("## Android", "## iOS"):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        steps = re.findall(r"^(\d+)\. ", section, flags=re.M)
        assert 1 <= len(steps) <= 5, (heading, steps)
    assert "CocoaPods" in text and "Termux" in text and "adb" in text and "golden_check.py" in text
    assert "device_bench.py tiny-32-int8.tflite --inputs golden.npz" in text


# ------------------------------------------------------------------------- constants against the manifest


def _manifest_input(export_dir: Path, name: str, pictures: np.ndarray) -> np.ndarray:
    pre = _sidecar(export_dir, name)["preprocess"]
    x = pictures.astype(np.float32) * np.float32(pre["scale"])
    return (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)


def _golden_pictures(root: Path) -> np.ndarray:
    expected = json.loads((root / "golden/expected.json").read_text())
    return np.stack([np.asarray(Image.open(root / "golden" / im["file"])) for im in expected["images"]])


def test_kotlin_constants_quantize_exactly_as_the_manifest_says(bundles: dict[str, Path], export_dir: Path) -> None:
    """--int8-io keeps the exported int8 input: the generated code normalises and quantizes itself."""
    root = bundles["int8io"]
    sidecar = _sidecar(export_dir, "tiny-32-int8.tflite")
    spec = _kotlin_constants(root / KOTLIN_DIR / "ModelSpec.kt")
    assert spec["INPUT_WIDTH"] == spec["INPUT_HEIGHT"] == sidecar["model"]["image_size"]
    assert spec["NUM_CLASSES"] == len(sidecar["labels"])
    assert spec["INPUT_DTYPE"] == "int8" and spec["OUTPUT_DTYPE"] == "int8" and spec["OUTPUT_KIND"] == "logits"
    assert spec["INPUT_SCALE"] == pytest.approx(sidecar["input"]["quantization"]["scale"], rel=1e-7)
    assert spec["INPUT_ZERO_POINT"] == sidecar["input"]["quantization"]["zero_point"]
    assert spec["OUTPUT_ZERO_POINT"] == sidecar["output"]["quantization"]["zero_point"]
    pictures = _golden_pictures(root)
    implied = (pictures - np.asarray(spec["PIXEL_MEAN"])) / np.asarray(spec["PIXEL_STD"])
    manifest = _manifest_input(export_dir, "tiny-32-int8.tflite", pictures)
    assert np.abs(implied - manifest).max() < 1e-5
    # Kotlin's roundToInt rounds half up; edgetl's verification rounds half to even: equal but at exact halves.
    kotlin_q = np.clip(np.floor(implied / spec["INPUT_SCALE"] + 0.5) + spec["INPUT_ZERO_POINT"], -128, 127)
    host_q = np.clip(np.round(manifest / sidecar["input"]["quantization"]["scale"])
                     + sidecar["input"]["quantization"]["zero_point"], -128, 127)
    assert np.abs(kotlin_q - host_q).max() <= 1 and (kotlin_q == host_q).mean() > 0.999
    swift = _swift_constants(root / SWIFT_DIR / "ModelSpec.swift")
    assert swift["pixelMean"] == pytest.approx(spec["PIXEL_MEAN"]) and swift["pixelStd"] == pytest.approx(
        spec["PIXEL_STD"])
    assert swift["inputScale"] == pytest.approx(spec["INPUT_SCALE"])
    assert swift["inputZeroPoint"] == spec["INPUT_ZERO_POINT"]


def test_constants_and_bundled_graph_together_equal_the_manifest(bundles: dict[str, Path], export_dir: Path) -> None:
    """Per-channel mean/std move into the graph (MediaPipe rejects them as metadata): what the generated
    code feeds, through the bundled model, must give what the exported artifact gives on manifest inputs."""
    from edgetl.formats import run, softmax

    for variant, name in (("int8", "tiny-32-int8.tflite"), ("fp32", "tiny-32-fp32.tflite")):
        root = bundles[variant]
        spec = _kotlin_constants(root / KOTLIN_DIR / "ModelSpec.kt")
        assert spec["INPUT_DTYPE"] == "float32" and spec["PIXEL_MEAN"] == [0.0] * 3 and spec["PIXEL_STD"] == [1.0] * 3
        pictures = _golden_pictures(root)
        implied = ((pictures - np.asarray(spec["PIXEL_MEAN"])) / np.asarray(spec["PIXEL_STD"])).astype(np.float32)
        assert spec["OUTPUT_KIND"] == "probabilities"  # SOFTMAX appended to the bundled graph
        bundled = run(root / "device_bench" / name, implied)
        assert np.allclose(bundled.sum(axis=1), 1.0, atol=1e-5)
        source = softmax(run(export_dir / name, _manifest_input(export_dir, name, pictures)))
        assert (bundled.argmax(1) == source.argmax(1)).all()
        assert np.abs(bundled - source).max() < (0.02 if variant == "int8" else 1e-4)
        record = json.loads((root / "bundle.json").read_text())
        affine = record["model"]["tflite_metadata"]["normalization_in_graph"]
        pre = _sidecar(export_dir, name)["preprocess"]
        want_mul = [pre["scale"] / s for s in pre["std"]]
        assert affine["multiplier"] == pytest.approx(want_mul, rel=1e-6)
        assert affine["offset"] == pytest.approx([-m / s for m, s in zip(pre["mean"], pre["std"], strict=True)])


# ------------------------------------------------------------------------------- metadata and MediaPipe


def test_tflite_metadata_reads_back(bundles: dict[str, Path], export_dir: Path) -> None:
    from edgetl.tflite_metadata import read_metadata

    view = read_metadata(bundles["int8"] / "device_bench/tiny-32-int8.tflite")
    meta = view["metadata"]
    assert meta["labels_file"] == "labels.txt" and meta["labels_type"] == 2  # TENSOR_AXIS_LABELS
    assert meta["color_space"] == 1 and meta["mean"] == [0.0] and meta["std"] == [1.0]
    assert view["associated_files"]["labels.txt"] == (export_dir / "labels.txt").read_text()
    assert view["input"]["dtype"] == "float32" and view["output"]["dtype"] == "float32"
    plain = read_metadata(bundles["plain"] / "device_bench/tiny-32-int8.tflite")
    assert plain["metadata"] is None and plain["input"]["dtype"] == "int8"


def test_mediapipe_image_classifier_takes_the_bundled_tflite(bundles: dict[str, Path], export_dir: Path) -> None:
    """MediaPipe Tasks (its own venv) gives the same top-1 as edgetl's verification runtime on the artifact."""
    from edgetl.formats import run
    from edgetl.tflite_metadata import mediapipe_classify

    for variant, name in (("int8", "tiny-32-int8.tflite"), ("fp32", "tiny-32-fp32.tflite")):
        root = bundles[variant]
        expected = json.loads((root / "golden/expected.json").read_text())
        files = [root / "golden" / im["file"] for im in expected["images"]]
        results = mediapipe_classify(root / "device_bench" / name, files, top_k=3)
        pictures = _golden_pictures(root)
        host = run(export_dir / name, _manifest_input(export_dir, name, pictures)).argmax(1)
        labels = (export_dir / "labels.txt").read_text().split()
        assert [r[0]["index"] for r in results] == host.tolist()
        assert [r[0]["label"] for r in results] == [labels[i] for i in host]
        top = [r[0]["score"] for r in results]  # probabilities: the bundled graph ends in SOFTMAX
        assert top == pytest.approx([im["top_k"][0]["score"] for im in expected["images"]], abs=1e-3)
        record = json.loads((root / "bundle.json").read_text())
        assert record["model"]["tflite_metadata"]["mediapipe"]["top1_agree"] == len(files)


@pytest.mark.slow
@pytest.mark.skipif(ctypes.util.find_library("usb-1.0") is None,
                    reason="tflite-support imports libusb-1.0 (Debian: apt-get install libusb-1.0-0)")
def test_tflite_task_library_takes_the_bundled_tflite(
    bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TFLite Task Library (tflite-support, a venv of its own: protobuf<4) reads the same metadata."""
    from edgetl.tflite_metadata import task_library_classify

    monkeypatch.setenv("EDGETL_TFLITE_SUPPORT_VENV", str(_tool_venv("tflite-support-0.4.4")))
    for variant, name in (("int8", "tiny-32-int8.tflite"), ("fp32", "tiny-32-fp32.tflite")):
        root = bundles[variant]
        expected = json.loads((root / "golden/expected.json").read_text())
        results = task_library_classify(root / "device_bench" / name,
                                        [root / "golden" / im["file"] for im in expected["images"]], top_k=3)
        assert [r[0]["index"] for r in results] == [im["top_k"][0]["index"] for im in expected["images"]]
        assert [r[0]["score"] for r in results] == pytest.approx(
            [im["top_k"][0]["score"] for im in expected["images"]], abs=1e-3)


# -------------------------------------------------------------------------------------- Kotlin compiled

HARNESS = """
import ai.edgetl.classifier.ModelSpec
import ai.edgetl.classifier.Preprocessing
import java.io.File
import javax.imageio.ImageIO

fun main(args: Array<String>) {
    for (path in args) {
        val image = ImageIO.read(File(path))
        val argb = image.getRGB(0, 0, image.width, image.height, null, 0, image.width)
        val x = Preprocessing.normalize(argb)
        val line = if (ModelSpec.INPUT_DTYPE == "int8") Preprocessing.quantize(x, -128, 127).joinToString(" ")
                   else x.joinToString(" ")
        println(line)
    }
}
"""


def _compile_kotlin(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """javac the API stand-ins, then kotlinc the bundle's module (main + androidTest) and the JVM harness."""
    classes = tmp_path / "stubs"
    java = sorted(str(p) for p in STUBS.rglob("*.java"))
    subprocess.run(["javac", "-nowarn", "-d", str(classes), *java], check=True, capture_output=True)
    (tmp_path / "Harness.kt").write_text(HARNESS)
    sources = sorted(str(p) for p in (root / "android").rglob("*.kt"))
    jar = tmp_path / "module.jar"
    done = subprocess.run(["kotlinc", "-cp", str(classes), "-include-runtime", "-d", str(jar), *sources,
                           str(tmp_path / "Harness.kt")], capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 0 and not errors, done.stderr[-3000:]
    return jar, classes


NO_KOTLINC = "kotlinc missing (Debian: apt-get install kotlin)"


@pytest.mark.skipif(shutil.which("kotlinc") is None, reason=NO_KOTLINC)
@pytest.mark.parametrize("variant", ["int8", "int8io"])
def test_generated_kotlin_compiles_and_preprocesses_like_the_host(
    bundles: dict[str, Path], variant: str, tmp_path: Path
) -> None:
    """Compile the module (main + androidTest) against API stand-ins, then run its preprocessing on the JVM
    over the golden PNGs: it must produce the very tensor the host stored in golden.npz."""
    root = bundles[variant]
    jar, classes = _compile_kotlin(root, tmp_path)
    expected = json.loads((root / "golden/expected.json").read_text())
    files = [str(root / "golden" / im["file"]) for im in expected["images"]]
    run = subprocess.run(["java", "-cp", f"{jar}{os.pathsep}{classes}", "HarnessKt", *files], capture_output=True,
                         text=True, check=True, env={**os.environ, "JAVA_TOOL_OPTIONS": "-Djava.awt.headless=true"})
    rows = [np.asarray(line.split(), dtype=np.float64) for line in run.stdout.strip().splitlines()]
    host = np.load(root / "golden/golden.npz")["x"].reshape(len(rows), -1)
    if variant == "int8io":
        record = json.loads((root / "bundle.json").read_text())["model"]["input"]["quantization"]
        host = np.clip(np.round(host / record["scale"]) + record["zero_point"], -128, 127)
        assert np.abs(np.stack(rows) - host).max() <= 1 and (np.stack(rows) == host).mean() > 0.999
    else:
        assert np.abs(np.stack(rows) - host).max() < 1e-4


# ------------------------------------------------------------------------- the on-device self-test script


def test_golden_check_passes_on_the_host_and_fails_on_a_wrong_expectation(bundles: dict[str, Path]) -> None:
    folder = bundles["int8io"] / "device_bench"
    ok = subprocess.run([sys.executable, "golden_check.py", "tiny-32-int8.tflite"], cwd=folder, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "3 passed, 0 failed" in ok.stdout
    expected = json.loads((folder / "expected.json").read_text())
    first = expected["images"][0]["top_k"]
    first[0]["index"], first[1]["index"] = first[1]["index"], first[0]["index"]
    (folder.parent / "wrong").mkdir()
    (folder.parent / "wrong/expected.json").write_text(json.dumps(expected))
    shutil.copy2(folder / "golden.npz", folder.parent / "wrong/golden.npz")
    bad = subprocess.run([sys.executable, "golden_check.py", "tiny-32-int8.tflite", "--golden", "../wrong"],
                         cwd=folder, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    # device_bench runs the same check (golden.npz's labels are the host's top-1), unchanged.
    bench = subprocess.run([sys.executable, "device_bench.py", "tiny-32-int8.tflite", "--inputs", "golden.npz",
                            "--iters", "2", "--warmup", "1", "--out", str(folder.parent / "result.json")],
                           cwd=folder, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    assert json.loads((folder.parent / "result.json").read_text())["accuracy"]["top1"] == 1.0


# ----------------------------------------------------------------------------------- bad input, atomicity


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "a-32-int8.tflite").write_bytes(b"TFL3")
    (folder / "b-32-fp32.pte").write_bytes(b"PTE")
    _one_line_error(run_cli("bundle", str(folder), "--artifact", "nope.tflite"),
                    "nope.tflite", "a-32-int8.tflite", "b-32-fp32.pte")
    _one_line_error(run_cli("bundle", str(folder), "--artifact", "a-32-int8.tflite", "--platform", "windows"),
                    "windows", "android", "ios")
    _one_line_error(run_cli("bundle", str(folder), "--artifact", "a-32-int8.tflite"),
                    "a-32-int8.tflite", "no manifest", "a-32-int8.tflite.json")
    _one_line_error(run_cli("bundle", str(folder)), "--artifact", "a-32-int8.tflite")
    _one_line_error(run_cli("bundle", str(tmp_path / "missing")), "does not exist")
    assert not (tmp_path / "bundle").exists()


def test_a_failure_midway_leaves_no_bundle(export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl import bundle

    out = tmp_path / "b"
    monkeypatch.setattr(bundle, "_ios", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        bundle.run_bundle(export_dir, bundle.BundleOptions(artifact="tiny-32-fp32.tflite", metadata=False, out=out))
    assert not out.exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- .pte


@pytest.mark.slow
def test_pte_bundle_uses_executorch_on_both_platforms(tmp_path: Path) -> None:
    """A tiny .pte (XNNPACK) bundled through the CLI: ExecuTorch AAR, ExecuTorch SwiftPM package, golden set."""
    code = """
import json, sys, numpy as np, torch
from pathlib import Path
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
from edgetl.data import preprocess_spec
from edgetl.manifest import sha256_file
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
torch.manual_seed(0)
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean(dim=(2, 3)))
net = Net().eval()
x = np.random.default_rng(0).normal(size=(20, 16, 16, 3)).astype(np.float32)
program = to_edge_transform_and_lower(torch.export.export(net, (torch.from_numpy(x[:1]),)),
                                      partitioner=[XnnpackPartitioner()]).to_executorch()
(folder / "t-16-fp32.pte").write_bytes(program.buffer)
np.savez(folder / "test_inputs.npz", x=x, y=np.arange(20) % 3)
(folder / "labels.txt").write_text("a\\nb\\nc\\n")
sidecar = {"kind": "edgetl.artifact", "schema_version": 1, "file": "t-16-fp32.pte", "format": "pte",
           "quant": "fp32", "runtime": "ExecuTorch (XNNPACK delegate)",
           "bytes": (folder / "t-16-fp32.pte").stat().st_size, "sha256": sha256_file(folder / "t-16-fp32.pte"),
           "labels": ["a", "b", "c"], "model": {"backbone": "t", "width": 1.0, "image_size": 16, "num_classes": 3},
           "preprocess": preprocess_spec(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), layout="NHWC"),
           "input": {"name": "x", "dtype": "float32", "shape": [1, 16, 16, 3], "quantization": None},
           "output": {"name": "logits", "dtype": "float32", "shape": [1, 3], "quantization": None},
           "versions": {"executorch": "1.5.1"}}
(folder / "t-16-fp32.pte.json").write_text(json.dumps(sidecar))
"""
    folder = tmp_path / "export"
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, check=True, capture_output=True, timeout=600)
    result = run_cli("bundle", str(folder), "--artifact", "t-16-fp32.pte", "--out", str(tmp_path / "b"),
                     "--golden", "3")
    assert result.returncode == 0, result.stderr
    root = tmp_path / "b"
    gradle = (root / "android/edgetl-classifier/build.gradle.kts").read_text()
    assert 'implementation("org.pytorch:executorch-android:1.5.1")' in gradle and '"pte"' in gradle
    assert "org.pytorch.executorch.Module" in (root / KOTLIN_DIR / "ImageClassifier.kt").read_text()
    package = (root / "ios/EdgeTLClassifier/Package.swift").read_text()
    assert 'branch: "swiftpm-1.5.1"' in package and "backend_xnnpack" in package
    assert "import ExecuTorch" in (root / SWIFT_DIR / "ImageClassifier.swift").read_text()
    spec = _kotlin_constants(root / KOTLIN_DIR / "ModelSpec.kt")
    assert spec["PIXEL_MEAN"] == [127.5] * 3 and spec["PIXEL_STD"] == [63.75] * 3
    record = json.loads((root / "bundle.json").read_text())
    assert record["model"]["changed"] is False and record["model"]["tflite_metadata"] is None
    assert len(record["golden"]["images"]) == 3
    if shutil.which("kotlinc"):
        _compile_kotlin(root, tmp_path / "kotlin")


@pytest.mark.slow
def test_real_export_bundles_and_mediapipe_agrees_with_edgetl_verification(tmp_path: Path) -> None:
    """End to end on the real stages: fine-tune (builtin:shapes, 32 px), export an int8 .tflite, bundle it;
    MediaPipe Tasks on the bundled file gives the top-1 that edgetl's verification runtime gives on the
    exported artifact for every golden image."""
    from edgetl import formats
    from edgetl.tflite_metadata import mediapipe_classify

    run = tmp_path / "run"
    steps = [["finetune", "--data", "builtin:shapes", "--image-size", "32", "--epochs-finetune", "0",
              "--batch-size", "32", "--out", str(run)],
             ["export", str(run / "checkpoint"), "--formats", "tflite", "--quant", "int8", "--calib", "32",
              "--max-drop", "100"],
             ["bundle", str(run / "export"), "--platform", "android"]]
    for step in steps:
        done = run_cli(*step, env={"EDGETL_MEDIAPIPE_VENV": str(_tool_venv())})
        assert done.returncode == 0, f"{step[0]}: {done.stderr[-2000:]}"
    artifact = run / "export" / "efficientnet_lite0-32-int8.tflite"
    root = run / "bundle" / artifact.stem
    record = json.loads((root / "bundle.json").read_text())
    expected = record["golden"]
    sidecar = json.loads(artifact.with_name(artifact.name + ".json").read_text())
    pictures = _golden_pictures(root)
    host = formats.run(artifact, np.stack([_pixels_to_x(p, sidecar["preprocess"]) for p in pictures]))
    os.environ["EDGETL_MEDIAPIPE_VENV"] = str(_tool_venv())
    results = mediapipe_classify(root / "device_bench" / artifact.name,
                                 [root / "golden" / im["file"] for im in expected["images"]])
    # MediaPipe's top-1 has the host's highest score: either class of an int8 tie (two classes rounded to the same
    # output value) counts, since runtimes break ties differently
    chosen = [r[0]["index"] for r in results]
    assert all(host[i, c] == host[i].max() for i, c in enumerate(chosen)), (chosen, host.tolist())
    assert record["model"]["tflite_metadata"]["mediapipe"]["top1_agree"] == len(results)


def _pixels_to_x(picture: np.ndarray, pre: dict) -> np.ndarray:
    """The manifest's preprocessing, as edgetl's data pipeline applies it, on a picture at input size."""
    from edgetl.data import to_array

    return to_array(Image.fromarray(picture), dict(pre, layout="NHWC"))


def test_bundle_replaces_only_a_bundle_and_never_its_input(export_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import tree_digest

    before = tree_digest(export_dir)
    args = ["bundle", str(export_dir), "--artifact", "tiny-32-fp32.tflite", "--no-metadata", "--golden", "2"]
    _one_line_error(run_cli(*args, "--out", str(export_dir)), "is this stage's input")
    _one_line_error(run_cli(*args, "--out", str(export_dir.parent)), "holds this stage's input")
    mine = tmp_path / "MyApp"
    mine.mkdir()
    (mine / "MainActivity.kt").write_text("the user's app")
    _one_line_error(run_cli(*args, "--out", str(mine)), str(mine), "did not make")
    assert (mine / "MainActivity.kt").read_text() == "the user's app"
    assert tree_digest(export_dir) == before
    for _ in range(2):  # a bundle folder edgetl made is replaced, in one step
        done = run_cli(*args, "--out", str(tmp_path / "bundle"))
        assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MyApp", "bundle"]


# ------------------------------------------------------------------- hostile names never become code

HOSTILE = 'm"+evil()+"#{`id`}$x\\(y)\n fun pwned() {}'


def _hostile_copy(export_dir: Path, tmp_path: Path, name: str = "tiny-32-fp32.tflite", **changes) -> Path:
    """A copy of the export whose fp32 artifact is renamed to `name` and whose sidecar gets `changes` (an object
    is merged into the sidecar's one, so the rest of it still reads as a sidecar)."""
    folder = tmp_path / "export"
    folder.mkdir()
    for item in ("labels.txt", "test_inputs.npz"):
        shutil.copy2(export_dir / item, folder / item)
    shutil.copy2(export_dir / "tiny-32-fp32.tflite", folder / name)
    sidecar = {**_sidecar(export_dir, "tiny-32-fp32.tflite"), "file": name}
    for key, value in changes.items():
        merge = isinstance(value, dict) and isinstance(sidecar.get(key), dict)
        sidecar[key] = {**sidecar[key], **value} if merge else value
    (folder / f"{name}.json").write_text(json.dumps(sidecar))
    return folder


@pytest.mark.parametrize(
    ("name", "changes", "needles"),
    [
        ('m"+evil()+"#{`id`}.tflite', {}, ["artifact file name", "letters, digits"]),
        ("tiny-32-fp32.tflite", {"file": "tiny.tflite\nfun evil() {}"}, ["describes", "not this file's manifest"]),
        ("tiny-32-fp32.tflite", {"labels": ["circle", "../../evil", "triangle"]}, ["'../../evil'", "path separator"]),
        ("tiny-32-fp32.tflite", {"labels": ["circle", "sq\nuare", "triangle"]}, ["control character"]),
        ("tiny-32-fp32.tflite", {"quant": 'fp32", evil="'}, ["quant", "not a plain name"]),
        ("tiny-32-fp32.tflite", {"versions": {"executorch": '1.5.1"), .package(url: "evil'}},
         ["versions.executorch", "not a version"]),
        ("tiny-32-fp32.tflite", {"input": {"dtype": "float32\";evil()"}}, ["input dtype"]),
    ],
)
def test_hostile_names_and_labels_are_refused_with_one_line(export_dir: Path, tmp_path: Path, name: str,
                                                            changes: dict, needles: list[str]) -> None:
    folder = _hostile_copy(export_dir, tmp_path, name, **changes)
    result = run_cli("bundle", str(folder), "--artifact", name, "--no-metadata", "--out", str(tmp_path / "b"))
    _one_line_error(result, *needles)
    assert not (tmp_path / "b").exists()


def _decode_literal(text: str, language: str) -> str:
    """Read one escaped string literal body back as the language's compiler would; fails on an unescaped
    quote, newline or interpolation (what would end the string or run code)."""
    out, i = [], 0
    simple = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t", "$": "$", "#": "#", "0": "\0"}
    while i < len(text):
        char = text[i]
        assert char not in '"\n\r', (language, text)
        assert not (language == "kotlin" and char == "$"), text
        assert not (language == "ruby" and text.startswith("#{", i)), text
        if char != "\\":
            out.append(char)
            i += 1
            continue
        follow = text[i + 1]
        if follow == "u" and text[i + 2] == "{":
            end = text.index("}", i)
            out.append(chr(int(text[i + 3:end], 16)))
            i = end + 1
        elif follow == "u":
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        else:
            out.append(simple[follow])
            i += 2
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16")


def test_every_value_is_escaped_for_its_language() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgetl.bundle import escape

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.just(HOSTILE))
    def check(value: str) -> None:
        for language in ("kotlin", "swift", "ruby"):
            escaped = escape(value, language)
            assert _decode_literal(escaped, language) == value, (language, value, escaped)
        xml = escape(value, "xml")
        assert not any(c in xml for c in '<>"\'') and "&" not in xml.replace("&amp;", "").replace(
            "&lt;", "").replace("&gt;", "").replace("&quot;", "").replace("&apos;", "")

    check()


def test_generated_sources_hold_each_value_as_one_escaped_literal(export_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With the name check switched off, the escaping alone keeps a hostile file name a plain string in
    ModelSpec.kt, ModelSpec.swift, the podspec and build.gradle.kts (defence in depth)."""
    from edgetl import bundle

    name = HOSTILE.replace("\n", " ") + ".tflite"
    folder = _hostile_copy(export_dir, tmp_path, name, runtime="LiteRT <script>alert(1)</script> *bold*")
    monkeypatch.setattr(bundle, "check_code_values", lambda *args: None)
    out = bundle.run_bundle(folder, bundle.BundleOptions(artifact=name, metadata=False, golden=2,
                                                         out=tmp_path / "b"))
    kotlin = (out / KOTLIN_DIR / "ModelSpec.kt").read_text()
    (literal,) = re.findall(r'^    const val MODEL_FILE = "(.*)"$', kotlin, flags=re.M)
    assert _decode_literal(literal, "kotlin") == name
    assert "fun pwned" not in kotlin.replace(literal, "")
    swift = (out / SWIFT_DIR / "ModelSpec.swift").read_text()
    (literal,) = re.findall(r'^    public static let modelName = "(.*)"$', swift, flags=re.M)
    assert _decode_literal(literal, "swift") == Path(name).stem
    podspec = (out / "ios/EdgeTLClassifier/EdgeTLClassifier.podspec").read_text()
    (literal,) = re.findall(r'^  s.summary      = "(.*)"$', podspec, flags=re.M)
    assert _decode_literal(literal, "ruby") == f"Image classifier exported by edgetl ({name})."
    templates = REPO / "export"
    for made, template in [
        (out / KOTLIN_DIR / "ModelSpec.kt", templates / "android/src/main/kotlin/ai/edgetl/classifier/ModelSpec.kt"),
        (out / SWIFT_DIR / "ModelSpec.swift", templates / "ios/Sources/EdgeTLClassifier/ModelSpec.swift"),
        (out / "ios/EdgeTLClassifier/EdgeTLClassifier.podspec", templates / "ios/EdgeTLClassifier.podspec"),
        (out / "android/edgetl-classifier/build.gradle.kts", templates / "android/build.gradle.kts"),
    ]:  # no value added a line (a newline in a name would start a new declaration)
        assert len(made.read_text().splitlines()) == len(template.read_text().splitlines()), made
    readme = (out / "README.md").read_text()
    assert "<script>" not in readme and "&lt;script&gt;" in readme and "\\*bold\\*" in readme
    expected = json.loads((out / "golden/expected.json").read_text())
    assert all(re.fullmatch(r"golden_\d\d_[A-Za-z0-9_-]+\.png", im["file"]) for im in expected["images"])


# -------------------------------------------------------------- the sweep's recommendation as the default


def _run_with_sweep(export_dir: Path, root: Path, arm_pick: str = "int8-ptq") -> Path:
    """RUN/export and RUN/sweep as the README's steps leave them: the sweep's variants/NAME/export folders hold
    the files it measured, and its sweep.json the recommendations that edgetl.report.analyse makes from the
    measured rows. fp32 is cheapest on the host; on the emulated A76 `arm_pick` is (int8-ptq: the int8 file
    that RUN/export holds too; pruned30-int8: a file only the sweep made)."""
    from edgetl.contracts import SCHEMA_VERSION, SWEEP_KIND
    from edgetl.report import analyse

    run = root / "run"
    shutil.copytree(export_dir, run / "export")
    files = {"fp32": "tiny-32-fp32.tflite", "int8-ptq": "tiny-32-int8.tflite",
             "pruned30-int8": "tiny-32-int8-ch30.tflite"}
    for variant, name in files.items():
        folder = run / "sweep" / "variants" / variant / "export"
        folder.mkdir(parents=True)
        shutil.copy2(export_dir / ("tiny-32-fp32.tflite" if variant == "fp32" else "tiny-32-int8.tflite"),
                     folder / name)
        if (export_dir / f"{name}.json").is_file():
            shutil.copy2(export_dir / f"{name}.json", folder)
    rows = []
    for variant, name in files.items():
        arm = 1e6 if variant == arm_pick else 3e6
        for target, emulated, figure in (("host", False, {"p50_ms": 1.0 if variant == "fp32" else 2.0}),
                                         ("arm64-a76", True, {"instructions_per_invoke": arm})):
            rows.append({"id": f"{variant}/{name}", "variant": variant, "artifact": name, "format": "tflite",
                         "quant": "fp32" if variant == "fp32" else "int8", "prune": None, "qat": False,
                         "size_bytes": 1000, "top1": 0.9, "target": target, "emulated": emulated, "threads": 1,
                         "p50_ms": None, "instructions_per_invoke": None, **figure})
    document = {"kind": SWEEP_KIND, "schema_version": SCHEMA_VERSION, "rows": rows,
                "variants": [{"name": v, "export": str(run / "sweep" / "variants" / v / "export")} for v in files],
                "analysis": analyse(rows, 1.0, 0.9, [1])}
    assert {r["target"]: r["variant"] for r in document["analysis"]["recommendations"]} == \
        {"host": "fp32", "arm64-a76": arm_pick}
    (run / "sweep" / "sweep.json").write_text(json.dumps(document))
    return run


def test_the_readme_usage_line_bundles_the_file_the_sweep_recommends_for_a_phone(export_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """`edgetl bundle runs/plants/export --platform android,ios` on an export of several files: the file
    the run's sweep recommends for the emulated phone CPU (not the host's pick), and it says so."""
    run = _run_with_sweep(export_dir, tmp_path)
    done = run_cli("bundle", str(run / "export"), "--platform", "android", "--no-metadata", "--golden", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    said = " ".join((done.stdout + done.stderr).split())
    assert "taking tiny-32-int8.tflite" in said and "int8-ptq/tiny-32-int8.tflite for arm64-a76" in said, said
    assert "fewest guest instructions per invoke" in said  # the sweep's own reason
    record = json.loads((run / "bundle" / "tiny-32-int8" / "bundle.json").read_text())
    assert record["source"]["artifact"] == "tiny-32-int8.tflite"


def test_a_recommended_file_that_is_not_in_the_folder_is_one_line_saying_where_it_is(export_dir: Path,
                                                                                    tmp_path: Path) -> None:
    from edgetl.bundle import find_artifact, recommended_artifact
    from edgetl.errors import UserError

    run = _run_with_sweep(export_dir, tmp_path / "a", arm_pick="pruned30-int8")
    elsewhere = run / "sweep" / "variants" / "pruned30-int8" / "export"
    with pytest.raises(UserError, match="recommends pruned30-int8/tiny-32-int8-ch30.tflite for arm64-a76, which is "
                                        "not in this folder") as caught:
        find_artifact(run / "export", None)
    assert f"bundle {str(elsewhere)!r} to take it" in str(caught.value)
    assert "tiny-32-fp32.tflite, tiny-32-int8.tflite" in str(caught.value)
    variant = run / "sweep" / "variants" / "fp32" / "export"  # a sweep's own variant folder, of two files
    for name in ("tiny-32-int8.tflite", "tiny-32-int8.tflite.json"):
        shutil.copy2(export_dir / name, variant)
    with pytest.raises(UserError, match="for arm64-a76, which is not in this folder"):
        find_artifact(variant, None)
    shutil.copytree(variant, elsewhere, dirs_exist_ok=True)  # the recommended file among others: taken
    present = sorted(p.name for p in elsewhere.glob("*.tflite"))
    assert len(present) == 3 and recommended_artifact(elsewhere, present) == "tiny-32-int8-ch30.tflite"

    run = _run_with_sweep(export_dir, tmp_path / "b")
    (run / "sweep" / "variants" / "int8-ptq" / "export" / "tiny-32-int8.tflite").write_bytes(b"exported again")
    with pytest.raises(UserError, match="the file of that name here is another one"):
        find_artifact(run / "export", None)

    (run / "sweep" / "sweep.json").write_text("{not json")  # no readable sweep: today's error
    with pytest.raises(UserError, match="holds 2 artifacts; choose one with --artifact: tiny-32-fp32.tflite"):
        find_artifact(run / "export", None)


def test_a_tie_at_the_top_of_an_int8_output_counts_either_class_as_the_top1() -> None:
    from edgetl.bundle import _tied_top

    tied = [{"index": 0, "score": 0.333632}, {"index": 2, "score": 0.333632}, {"index": 1, "score": 0.332737}]
    assert _tied_top(tied) == {0, 2}
    assert _tied_top([{"index": 1, "score": 0.9}, {"index": 0, "score": 0.1}]) == {1}
    assert _tied_top([]) == set()
