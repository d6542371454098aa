"""device_bench: JSON results for a tiny .tflite and .pte on the host, framework-free .tflite runs, and one-line
errors (exit 2) for bad models, bad inputs and a missing runtime."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "device_bench" / "device_bench.py"
FORBIDDEN = ("edgetl", "torch", "tensorflow", "tf_keras", "executorch", "litert_torch", "jax")

# Built in a subprocess so this test process stays free of torch and the converters.
_MAKE_TINY = textwrap.dedent("""
    import sys, torch, numpy as np
    out = sys.argv[1]
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            x = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(x.mean((2, 3)))

    model = Tiny().eval()
    example = (torch.randn(1, 3, 32, 32),)
    import litert_torch
    litert_torch.convert(model, example).export(f"{out}/tiny.tflite")
    from executorch.exir import to_edge_transform_and_lower
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    program = to_edge_transform_and_lower(torch.export.export(model, example),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    open(f"{out}/tiny.pte", "wb").write(program.buffer)
    torch.onnx.export(model, example, dynamo=True, verbose=False).save(f"{out}/tiny.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    y[:3] = (y[:3] + 1) % 4  # three wrong labels: top-1 must be exactly 9/12
    np.savez(f"{out}/test_inputs.npz", x=x, y=y.astype(np.int64))
""")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny.tflite, tiny.pte, tiny.onnx (same conv net, NCHW 1x3x32x32 → 4 classes) and
    test_inputs.npz."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("executorch")
    # Other test modules import this fixture, which makes each its own session fixture: a fixed folder
    # under the session's temp root lets them share one build.
    folder = tmp_path_factory.getbasetemp() / "tiny-export"
    if (folder / "test_inputs.npz").is_file():
        return folder
    folder.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _MAKE_TINY, str(folder)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def run_bench(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_schema(result: dict) -> None:
    assert result["schema_version"] == 1
    assert result["tool"]["name"] == "device_bench"
    model = result["model"]
    assert model["size_bytes"] > 0 and len(model["sha256"]) == 64
    assert model["input"]["shape"] == [1, 3, 32, 32] and model["input"]["dtype"] == "float32"
    assert model["output"]["shape"] == [1, 4]
    assert result["runtime"]["name"] and result["runtime"]["version"]
    timing = result["timing_ms"]
    for key in ("load", "p50", "p90", "p99", "mean", "std", "min", "max"):
        assert isinstance(timing[key], float) and timing[key] >= 0, key
    assert timing["min"] <= timing["p50"] <= timing["p90"] <= timing["p99"] <= timing["max"]
    assert timing["n"] == len(result["times_ms"]) == result["conditions"]["iters"]
    assert result["memory"]["peak_rss_kb"] > 0
    assert result["platform"]["cpu"]["machine"]
    assert result["accuracy"] == {"top1": 0.75, "correct": 9, "samples": 12}


def test_tflite_on_host_writes_the_schema_and_imports_no_framework(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    probe = textwrap.dedent(f"""
        import runpy, sys, json
        sys.argv = ["device_bench.py", {str(tiny_models / 'tiny.tflite')!r}, "--inputs",
                    {str(tiny_models / 'test_inputs.npz')!r}, "--threads", "2", "--iters", "7", "--out", {str(out)!r}]
        try:
            runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        except SystemExit as done:
            assert done.code == 0, done.code
        print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "ai_edge_litert" in loaded
    assert not loaded.intersection(FORBIDDEN), sorted(loaded.intersection(FORBIDDEN))
    result = json.loads(out.read_text())
    check_schema(result)
    assert result["runtime"]["name"] == "ai-edge-litert"
    assert result["conditions"]["threads"] == 2
    # conv 3→8 at 16x16 (3x3), conv 8→16 at 8x8 (3x3), linear 16→4
    assert result["model"]["macs"] == 16 * 16 * 8 * 27 + 8 * 8 * 16 * 72 + 4 * 16


def test_pte_on_host_with_the_executorch_runtime(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = run_bench(tiny_models / "tiny.pte", "--inputs", tiny_models / "test_inputs.npz", "--iters", "5",
                     "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    check_schema(result)
    assert result["runtime"]["name"] == "executorch"


def test_onnx_on_host_with_onnx_runtime(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = run_bench(tiny_models / "tiny.onnx", "--inputs", tiny_models / "test_inputs.npz", "--iters", "5",
                     "--out", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    check_schema(result)
    assert result["runtime"]["name"] == "onnxruntime" and result["model"]["format"] == "onnx"
    assert result["accuracy"]["top1"] == 0.75  # the same net as tiny.tflite: 9 of 12
    assert result["model"]["input"]["shape"] == [1, 3, 32, 32] and result["model"]["input"]["dtype"] == "float32"
    inspected = json.loads(run_bench(tiny_models / "tiny.onnx", "--inspect").stdout)
    assert inspected["model"]["format"] == "onnx" and inspected["model"]["output"]["shape"] == [1, 4]
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07 not a graph")
    _one_line_exit_2(run_bench(damaged), "not a valid .onnx model")


def test_without_inputs_it_times_synthetic_data_and_scores_nothing(tiny_models: Path) -> None:
    done = run_bench(tiny_models / "tiny.tflite", "--iters", "3", "--warmup", "0")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accuracy"] is None
    assert result["conditions"]["inputs"].startswith("synthetic")


def test_help_explains_phones() -> None:
    done = run_bench("--help")
    assert done.returncode == 0
    assert "Termux" in done.stdout and "adb push" in done.stdout


def _one_line_exit_2(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.startswith("device_bench: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["garbage.tflite", "truncated.tflite", "truncated.pte", "model.onnx", "missing.pte"])
def test_bad_model_files(tiny_models: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "garbage.tflite":
        path.write_bytes(b"\x00" * 4 + b"TFL3" + b"not a flatbuffer at all" * 10)
    elif kind.startswith("truncated"):
        source = (tiny_models / f"tiny{path.suffix}").read_bytes()
        path.write_bytes(source[: len(source) // 2])
    elif kind == "model.onnx":
        path.write_bytes(b"onnx")
    _one_line_exit_2(run_bench(path, "--iters", "2"), str(path))


def _damaged_tflite(source: bytes, kind: str) -> bytes:
    """tiny.tflite with one byte changed where its flatbuffer schema says, so that LiteRT loads the file and
    fails later: at allocation, reading the tensors or running it.

    Found through the schema, not at a fixed offset, so the damage stays the same whatever converter wrote
    the fixture. "weights-lack-data" is what 3 of 600 random flips hit: a weight tensor pointed at an empty
    buffer, which LiteRT only notices at invoke ("Input tensor N lacks data").
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(source, 0)
    graph = model.Subgraphs(0)
    data = bytearray(source)
    if kind == "weights-lack-data":
        empty = [j for j in range(model.BuffersLength()) if model.Buffers(j).DataLength() == 0]
        for op in (graph.Operators(i) for i in range(graph.OperatorsLength())):
            for index in (op.Inputs(k) for k in range(op.InputsLength())):
                tensor = graph.Tensors(index) if index >= 0 else None
                if tensor is None or model.Buffers(tensor.Buffer()).DataLength() == 0:
                    continue
                near = [j for j in empty if j ^ tensor.Buffer() < 256]  # one byte away from its own buffer
                if near:
                    data[tensor._tab.Pos + tensor._tab.Offset(8)] ^= tensor.Buffer() ^ near[0]  # field `buffer`
                    return bytes(data)
        raise AssertionError("no weight tensor one byte away from an empty buffer")
    if kind == "name-not-utf8":
        tensor = graph.Tensors(graph.Inputs(0))
        name = tensor._tab.Vector(tensor._tab.Offset(10))  # field `name`: its first byte
        data[name] ^= 0x80
    elif kind == "batch-of-3":
        tensor = graph.Tensors(graph.Inputs(0))
        data[tensor._tab.Vector(tensor._tab.Offset(4))] ^= 0x2  # field `shape`: dimension 0, 1 -> 3
    elif kind == "no-outputs":
        data[graph._tab.Vector(graph._tab.Offset(8)) - 4] ^= 0x1  # field `outputs`: its length, 1 -> 0
    return bytes(data)


@pytest.mark.parametrize(("kind", "needle"), [("weights-lack-data", "the runtime failed while running it"),
                                              ("name-not-utf8", "the runtime failed while reading its tensors"),
                                              ("batch-of-3", "runs batch-1 models"),
                                              ("no-outputs", "has no outputs")])
def test_a_damaged_tflite_that_loads_and_fails_later_is_one_line(tiny_models: Path, tmp_path: Path, kind: str,
                                                                 needle: str) -> None:
    """Each of these gave a traceback and exit 1: the runtime raised past the load, at invoke or reading the
    tensors' names and shapes."""
    source = (tiny_models / "tiny.tflite").read_bytes()
    path = tmp_path / f"{kind}.tflite"
    path.write_bytes(_damaged_tflite(source, kind))
    assert sum(a != b for a, b in zip(source, path.read_bytes(), strict=True)) == 1
    out = tmp_path / "result.json"
    _one_line_exit_2(run_bench(path, "--iters", "1", "--warmup", "0", "--inputs", tiny_models / "test_inputs.npz",
                               "--out", out), needle, *([] if kind == "batch-of-3" else [str(path)]))
    assert not out.exists()
    if kind in ("name-not-utf8", "no-outputs"):  # --inspect reads the tensors too
        _one_line_exit_2(run_bench(path, "--inspect"), str(path), needle)


def test_what_a_runtime_raises_on_a_damaged_model_becomes_one_line(tmp_path: Path) -> None:
    """ExecuTorch says IndexError for a damaged .pte's tensor meta; a bug of device_bench's own keeps its type."""
    bench = load_script()
    model = tmp_path / "m.pte"
    for error in (IndexError("Cannot get input tensor meta at 0"), RuntimeError("Input tensor 4 lacks data\nmore"),
                  UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), MemoryError()):
        with pytest.raises(bench.BenchError, match="m.pte"), bench.runtime_call(model, "running it"):
            raise error
    with pytest.raises(KeyError), bench.runtime_call(model, "running it"):
        raise KeyError("a bug of device_bench's own")


def test_inputs_that_do_not_match_the_model(tiny_models: Path, tmp_path: Path) -> None:
    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, x=np.zeros((2, 32, 32, 3), np.float32), y=np.zeros(2, np.int64))
    _one_line_exit_2(run_bench(tiny_models / "tiny.tflite", "--inputs", nhwc), "(2, 32, 32, 3)", "(N, 3, 32, 32)")
    wrong_dtype = tmp_path / "int.npz"
    np.savez(wrong_dtype, x=np.zeros((2, 3, 32, 32), np.int32))
    _one_line_exit_2(run_bench(tiny_models / "tiny.tflite", "--inputs", wrong_dtype), "int32", "float32")
    bad_labels = tmp_path / "labels.npz"
    np.savez(bad_labels, x=np.zeros((2, 3, 32, 32), np.float32), y=np.zeros(3, np.float32))
    _one_line_exit_2(run_bench(tiny_models / "tiny.tflite", "--inputs", bad_labels), "y has shape")
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("hello")
    _one_line_exit_2(run_bench(tiny_models / "tiny.tflite", "--inputs", not_npz), "not a readable .npz")


def test_missing_runtime_is_one_line(tiny_models: Path, tmp_path: Path) -> None:
    for name in ("ai_edge_litert", "tflite_runtime"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    _one_line_exit_2(run_bench(tiny_models / "tiny.tflite", env=env), "no TFLite runtime", "pip install ai-edge-litert")


def test_float_inputs_are_quantized_with_the_models_own_scale(tmp_path: Path) -> None:
    bench = load_script()
    spec = bench.TensorSpec("x", [1, 2, 2, 1], "int8", scale=0.5, zero_point=-3)
    npz = tmp_path / "q.npz"
    np.savez(npz, x=np.array([[[[0.0], [1.0]], [[-100.0], [100.0]]]], np.float32), y=np.array([1]))
    x, y, source = bench.load_inputs(npz, spec, None)
    assert x.dtype == np.int8 and x.reshape(-1).tolist() == [-3, -1, -128, 127]
    assert y.tolist() == [1] and "scale 0.5" in source
    uint8 = bench.TensorSpec("x", [1, 2, 2, 1], "uint8", scale=0.5, zero_point=128)
    x, _, _ = bench.load_inputs(npz, uint8, 1)
    assert x.dtype == np.uint8 and x.reshape(-1).tolist() == [128, 130, 0, 255]


def test_statistics_are_the_usual_ones() -> None:
    bench = load_script()
    stats = bench.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["p50"] == 3.0 and stats["min"] == 1.0 and stats["max"] == 100.0 and stats["n"] == 5
    assert stats["mean"] == pytest.approx(22.0) and stats["std"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))


def test_usage_mistakes_are_one_line() -> None:
    _one_line_exit_2(run_bench("model.tflite", "--threads", "0"), "--threads must be >= 1, got 0")
    _one_line_exit_2(run_bench(), "the following arguments are required: model")


_BIG_PARENT = textwrap.dedent("""
    import json, resource, subprocess, sys
    ballast = bytearray(1 << 30)  # 1 GiB, touched page by page so it is resident
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    child = [sys.executable, "-c", "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"]
    inherited = int(subprocess.run(child, capture_output=True, text=True, check=True).stdout)
    done = subprocess.run([sys.executable, *sys.argv[1:]], capture_output=True, text=True)
    print(json.dumps({"returncode": done.returncode, "stderr": done.stderr[-2000:], "inherited_kb": inherited}))
""")


def test_peak_memory_is_the_benchmarked_process_own_not_its_parents(tiny_models: Path, tmp_path: Path) -> None:
    """Started from a parent holding 1 GiB, device_bench must report its own peak (tens of MB for a tiny
    model), where getrusage's ru_maxrss reports the parent's 1 GiB on Linux."""
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-c", _BIG_PARENT, str(SCRIPT), str(tiny_models / "tiny.tflite"),
                           "--inputs", str(tiny_models / "test_inputs.npz"), "--iters", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["returncode"] == 0, report["stderr"]
    if sys.platform.startswith("linux"):
        assert report["inherited_kb"] > 1_000_000  # the trap is real here: ru_maxrss carries the parent's peak
    memory = json.loads(out.read_text())["memory"]
    assert memory["source"] == "VmHWM in /proc/self/status"
    assert 10_000 < memory["peak_rss_kb"] < 400_000, memory
    assert memory["peak_rss_before_inputs_kb"] <= memory["peak_rss_kb"]
