"""Standard TFLite model metadata (labels, NormalizationOptions, ImageProperties) for bundled .tflite files.

Why this route: the generated flatbuffer schemas for TFLite models and their metadata ship inside the
mediapipe wheel, and mediapipe cannot share edgetl's environment (absl-py conflict with tfmot), while
tflite-support cannot share one with TensorFlow. So the writing happens in `edgetl/_metadata_tool.py`,
run as a subprocess in a small venv of its own (mediapipe + numpy, cached under the edgetl cache), and
no third-party generated code is kept in this repository. The same venv runs MediaPipe Tasks'
ImageClassifier, which checks that the result is taken as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgetl.errors import UserError
from edgetl.paths import cache_dir

MEDIAPIPE_VERSION = "1.2.2"
TFLITE_SUPPORT_VERSION = "0.4.4"
TOOL = Path(__file__).resolve().parent / "_metadata_tool.py"
# name → (override variable, pip requirements). tflite-support needs protobuf<4 (and libusb-1.0 at import),
# so the TFLite Task Library gets a venv of its own as well.
ENVS = {
    "mediapipe": ("EDGETL_MEDIAPIPE_VENV", [f"mediapipe=={MEDIAPIPE_VERSION}", "numpy"]),
    "tflite-support": ("EDGETL_TFLITE_SUPPORT_VENV", [f"tflite-support=={TFLITE_SUPPORT_VERSION}", "numpy<2"]),
}


def tool_env(name: str = "mediapipe") -> Path:
    """$EDGETL_MEDIAPIPE_VENV (or the tool's own variable), else the cached venv, else make it (once)."""
    variable, requirements = ENVS[name]
    override = os.environ.get(variable)
    version = requirements[0].split("==")[1]
    root = Path(override) if override else cache_dir() / "tools" / f"{name}-{version}"
    python = root / "bin" / "python"
    if python.exists():
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        # A venv finds its packages relative to its own python, so it can be built aside and renamed in.
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        done = subprocess.run(
            [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *requirements],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise UserError(f"could not install {requirements[0]} ({tail[0]}); set {variable} to a venv that "
                            f"has it" + (", or bundle with --no-metadata" if name == "mediapipe" else ""))
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return python


def run_tool(command: str, request: dict, env: str = "mediapipe") -> dict:
    """One call of `_metadata_tool.py` in a tool venv; its JSON answer, or a UserError line."""
    python = tool_env(env)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(request, handle)
    try:
        done = subprocess.run([str(python), str(TOOL), command, handle.name], capture_output=True, text=True,
                              timeout=600)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no message"]
        raise UserError(f"TFLite metadata tool ({command}) failed: {lines[-1]}")
    return json.loads(done.stdout)


def normalization(preprocess: dict) -> tuple[list[float], list[float]]:
    """mean/std in pixel units (0..255), as NormalizationOptions want: (p*scale - m)/s == (p - m/scale)/(s/scale)."""
    scale = float(preprocess["scale"])
    return ([float(m) / scale for m in preprocess["mean"]], [float(s) / scale for s in preprocess["std"]])


def uniform(values: list[float]) -> bool:
    return max(values) - min(values) <= 1e-6 * max(1.0, abs(max(values)))


def write_metadata(model_in: Path, model_out: Path, sidecar: dict, labels_file: Path, float_io: bool) -> dict:
    """Write `model_out` = `model_in` + metadata (+ float32 I/O around int8 when asked); returns `read`'s view
    plus `normalization_in_graph` when per-channel mean/std had to move into the graph."""
    mean, std = normalization(sidecar["preprocess"])
    takes_float = float_io or sidecar["input"].get("dtype") == "float32"
    softmax = float_io or sidecar["output"].get("dtype") == "float32"
    in_graph = not (uniform(mean) and uniform(std)) and takes_float
    affine = None
    if in_graph:
        # MediaPipe rejects per-channel NormalizationOptions; the model then takes float pixels (0..255)
        # and applies x = pixel * (1/std) + (-mean/std) per channel itself (MUL, ADD at its input).
        affine = [[1.0 / s for s in std], [-m / s for m, s in zip(mean, std, strict=True)]]
        meta_mean, meta_std = [0.0], [1.0]
    else:
        meta_mean, meta_std = mean, std
    low = [(0.0 - m) / s for m, s in zip(meta_mean, meta_std, strict=True)]
    high = [(255.0 - m) / s for m, s in zip(meta_mean, meta_std, strict=True)]
    model = sidecar["model"]
    request = {
        "model_in": str(model_in), "model_out": str(model_out), "labels_file": str(labels_file),
        "float_io": float_io, "pixel_affine": affine, "softmax": softmax,
        "output_name": "probabilities" if softmax else "logits", "mean": meta_mean, "std": meta_std,
        "input_min": low, "input_max": high,
        "name": f"{model['backbone']} image classifier ({sidecar['quant']}, {model['image_size']} px)",
        "description": f"Classifies an RGB image into {model['num_classes']} classes; fine-tuned and exported by "
                       f"edgetl from {sidecar['file']} (sha256 {sidecar['sha256'][:12]}).",
        "version": str(sidecar["sha256"][:12]), "author": "edgetl", "license": None,
        "input_description": f"RGB image, {model['image_size']}x{model['image_size']}, resized bilinear, "
                             f"normalised as NormalizationOptions say"
                             + (" (per-channel mean/std are applied inside the model)." if in_graph else "."),
        "output_description": "Probabilities (softmax inside the model), one per label." if softmax
                              else "Logits, one per label (apply softmax for probabilities).",
    }
    view = run_tool("write", request)
    view["normalization_in_graph"] = {"multiplier": affine[0], "offset": affine[1]} if affine else None
    view["softmax_in_graph"] = softmax
    return view


def read_metadata(model: Path) -> dict:
    return run_tool("read", {"model": str(model)})


def mediapipe_classify(model: Path, images: list[Path], top_k: int = 3) -> list[list[dict]]:
    """Top-k per image from MediaPipe Tasks' ImageClassifier, loading the model exactly as an app would."""
    answer = run_tool("classify", {"model": str(model), "images": [str(p) for p in images], "top_k": top_k})
    return answer["results"]


def task_library_classify(model: Path, images: list[Path], top_k: int = 3) -> list[list[dict]]:
    """Top-k per image from the TFLite Task Library's ImageClassifier (tflite-support, its own venv)."""
    answer = run_tool("task_classify", {"model": str(model), "images": [str(p) for p in images], "top_k": top_k},
                      env="tflite-support")
    return answer["results"]
