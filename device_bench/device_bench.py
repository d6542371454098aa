#!/usr/bin/env python3
"""device_bench: time one .tflite, .pte or .onnx model on the machine it runs on and write one JSON result.

Standalone on purpose: standard library, numpy and one runtime (ai-edge-litert, or tflite_runtime, for
.tflite; the ExecuTorch runtime for .pte; onnxruntime for .onnx), so it can be copied to a phone, a board or an
emulated ARM64 userland. It never imports edgetl.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
TOOL_VERSION = "1.0.0"

# The marker syscall brackets each timed invoke when --markers is given.  Its number is one no kernel
# uses, so a real kernel answers ENOSYS; under qemu the edgetl instruction-count plugin sees it.  Never on
# by default: Android's seccomp filter kills apps that make unknown syscalls.
MARKER_SYSCALL = 0x0E7B
MARKER_MAGIC = 0x6564676574
MARK_START, MARK_STOP = 1, 2
X86_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # what the kernels use
EMPTY_BRACKETS = 5  # after the timed invokes, with --markers: brackets around nothing (overhead)

# ExecuTorch ScalarType codes (c10 numbering) for the dtypes an image classifier takes or gives.
ET_DTYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 6: "float32"}
# ONNX Runtime's names of the same dtypes
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int64)": "int64"}
# each format: its file name's ending and the bytes that identify it (offset, bytes); ONNX is a bare protobuf
IDENTIFIERS = {".tflite": (4, b"TFL3"), ".pte": (4, b"ET"), ".onnx": (None, b"")}

EPILOG = """\
Run it on a phone or a board:
  Android:  install Termux, then a glibc userland inside it (the runtimes' wheels are manylinux):
              pkg install proot-distro && proot-distro install debian && proot-distro login debian
              apt update && apt install python3-venv && python3 -m venv v && . v/bin/activate
              pip install -r requirements.txt          # numpy + ai-edge-litert
            copy the files over (adb push device_bench.py model.tflite inputs.npz /sdcard/Download/), then
              python device_bench.py model.tflite --inputs inputs.npz --threads 4 --out result.json
  Linux board (Raspberry Pi OS 64-bit, Debian arm64): the same pip install, the same command.
  .pte away from a host with torch: pass --runner PATH to the native runner that
            `edgetl bench --setup arm64` builds (cache/arm64/pte/edgetl_pte_runner, with its lib/ folder).
  Close other apps and keep the phone cool and plugged in; compare runs of one device only.
Exit status: 0 done, 2 bad input (model, inputs, missing runtime), with one line on stderr.
"""


class BenchError(Exception):
    """Bad input or a missing runtime: reported as one line and exit status 2."""


# What LiteRT and ExecuTorch raise when a damaged model fails to load, allocate or run: ValueError (a
# tensor name that is not UTF-8 is a UnicodeDecodeError, one of them), RuntimeError ("Input tensor 4 lacks
# data", a kernel's failed check), IndexError (ExecuTorch's "Cannot get input tensor meta at 0") and
# MemoryError (a damaged shape that asks for gigabytes).
RUNTIME_ERRORS = (ValueError, RuntimeError, IndexError, MemoryError)


@contextlib.contextmanager
def runtime_call(model: Path, doing: str) -> Iterator[None]:
    """Turn what the runtime raises on a damaged model into a BenchError (one line, exit 2).

    Put around the runtime's own calls only, so that a mistake in device_bench itself keeps its traceback.
    """
    try:
        yield
    except MemoryError:
        raise BenchError(f"{model}: out of memory while {doing}; the model asks for more than this machine has "
                         "(a damaged file?)") from None
    except RUNTIME_ERRORS as error:
        raise BenchError(f"{model}: the runtime failed while {doing} ({error}); the file is damaged (export it "
                         "again) or needs an operator this runtime lacks") from None


def check_batch1(spec: TensorSpec) -> None:
    """A batch-1 input with a positive size in every dimension: what device_bench can feed."""
    if not spec.shape or spec.shape[0] != 1 or any(d < 1 for d in spec.shape):
        raise BenchError(f"model input {spec.name!r} has shape {spec.shape}; device_bench runs batch-1 models "
                         "(shape [1, ...], every dimension >= 1)")


@dataclass
class TensorSpec:
    """What a model's input or output tensor is, as its runtime reports it."""

    name: str
    shape: list[int]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    def as_json(self) -> dict[str, Any]:
        quantization = {"scale": self.scale, "zero_point": self.zero_point} if self.scale else None
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype, "quantization": quantization}


@dataclass
class Measured:
    """What a runtime back end hands back: timings in ms, outputs of every sample, its own details."""

    load_ms: float
    first_invoke_ms: float | None
    times_ms: list[float]
    outputs: list[Any]
    peak_rss_kb: int | None
    rss_of: str
    extra: dict[str, Any] = field(default_factory=dict)
    rss_before_inputs_kb: int | None = None  # peak after load and first invoke, before the .npz is read


# --------------------------------------------------------------------------------------------- inputs


def _np():  # numpy is imported late so that `--help` works without it.
    import numpy

    return numpy


def load_inputs(path: Path | None, spec: TensorSpec, samples: int | None) -> tuple[Any, Any | None, str]:
    """The samples to run, already in the model's dtype; labels if the .npz has them.

    The host prepares the .npz (arrays `x`, `y`); a float `x` for an int8/uint8 model is quantized here
    with the input tensor's own scale/zero-point, read from the model, so the two can never disagree.
    """
    np = _np()
    want = tuple(spec.shape)
    check_batch1(spec)
    if path is None:
        rng = np.random.default_rng(0)
        if spec.dtype == "float32":
            x = rng.standard_normal(want).astype(np.float32)
        else:
            info = np.iinfo(spec.dtype)
            x = rng.integers(info.min, info.max, size=want, endpoint=True).astype(spec.dtype)
        return x, None, "synthetic (seeded random, timing only)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise BenchError(f"inputs {path}: no array 'x' (found {', '.join(data.files) or 'none'}); "
                                 "valid: x (samples, then the model's input shape) and optional y (labels)")
            x = data["x"]
            y = data["y"] if "y" in data.files else None
    except (OSError, ValueError, EOFError) as error:
        raise BenchError(f"inputs {path}: not a readable .npz ({error})") from None
    per_sample = x.shape[1:] if x.ndim == len(want) else None
    if per_sample != want[1:]:
        raise BenchError(f"inputs {path}: x has shape {tuple(x.shape)} {x.dtype}; the model wants "
                         f"(N, {', '.join(str(d) for d in want[1:])}) {spec.dtype}"
                         + (" or float32 to quantize" if spec.dtype in ("int8", "uint8") else ""))
    if samples is not None:
        x = x[:samples]
        y = None if y is None else y[:samples]
    if len(x) == 0:
        raise BenchError(f"inputs {path}: x holds no samples")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise BenchError(f"inputs {path}: y has shape {tuple(y.shape)} {y.dtype}; valid: ({len(x)},) integer labels")
    if spec.dtype in ("int8", "uint8") and np.issubdtype(x.dtype, np.floating):
        if not spec.scale:
            raise BenchError(f"model input {spec.name!r} is {spec.dtype} without a scale; give x as {spec.dtype}")
        info = np.iinfo(spec.dtype)
        q = x.astype(np.float32)  # one float32 working copy, rounded and clipped in place
        q /= np.float32(spec.scale)
        q += np.float32(spec.zero_point)
        np.clip(np.rint(q, out=q), info.min, info.max, out=q)
        x = q.astype(spec.dtype)
        return x, y, f"npz (float32 quantized here with scale {spec.scale:.6g}, zero-point {spec.zero_point})"
    if str(x.dtype) != spec.dtype:
        raise BenchError(f"inputs {path}: x is {x.dtype}; the model's input {spec.name!r} is {spec.dtype}")
    return np.ascontiguousarray(x), y, "npz"


# ------------------------------------------------------------------------------------------ runtimes


def _mark(enabled: bool) -> Callable[[int], None]:
    """A function issuing the marker syscall, or doing nothing."""
    if not enabled:
        return lambda _phase: None
    import ctypes

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_long)
    syscall.restype = ctypes.c_long
    # Arguments are bound once so that a bracket costs the same few hundred guest instructions every time.
    calls = {phase: (MARKER_SYSCALL, MARKER_MAGIC, phase) for phase in (MARK_START, MARK_STOP)}
    return lambda phase: syscall(*calls[phase])


def timed(call: Callable[[], Any], iters: int, mark: Callable[[int], None]) -> list[float]:
    """Milliseconds of each of `iters` calls, each bracketed by the marker syscall when markers are on."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        mark(MARK_START)
        call()
        mark(MARK_STOP)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


def _empty_brackets(mark: Callable[[int], None], count: int) -> None:
    """Brackets around nothing, after the timed ones: their count is the bracket's own overhead."""
    def nothing() -> None:
        return None

    for _ in range(count):
        mark(MARK_START)
        nothing()
        mark(MARK_STOP)


def _rss_kb() -> int | None:
    """This process's own peak resident memory, in kB (see RSS_SOURCE for where it comes from).

    VmHWM from /proc/self/status (Linux, Android; under qemu-user, the emulator's own). Not getrusage's
    ru_maxrss there: it survives fork and exec, so a device_bench started by a 3 GB parent reported 3 GB.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)


RSS_SOURCE = ("VmHWM in /proc/self/status" if os.path.exists("/proc/self/status")
              else "getrusage ru_maxrss (no /proc here)")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _litert_interpreter() -> tuple[Any, Any, str, str | None]:
    """Interpreter class, OpResolverType enum (or None), runtime name and version."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        return Interpreter, OpResolverType, "ai-edge-litert", _version("ai-edge-litert")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # the retired package, still on some boards

        resolver = getattr(__import__("tflite_runtime.interpreter", fromlist=["x"]), "OpResolverType", None)
        return Interpreter, resolver, "tflite_runtime", _version("tflite-runtime")
    except ImportError:
        raise BenchError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime on old boards)") from None


def _litert_dtype(dtype: Any) -> str:
    return _np().dtype(dtype).name


def tflite_macs(model: Path) -> tuple[int | None, dict[str, int]]:
    """Multiply-accumulates of one invoke: convolutions, depthwise convolutions and matrix products.

    Read from the graph before any delegate rewrites it, so the figure is the model's, not the runtime's.
    """
    interpreter_cls, resolver, _, _ = _litert_interpreter()
    kwargs = {}
    if resolver is not None and hasattr(resolver, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interpreter = interpreter_cls(model_path=str(model), **kwargs)
        interpreter.allocate_tensors()
        shapes = {t["index"]: [int(d) for d in t["shape"]] for t in interpreter.get_tensor_details()}
        ops = interpreter._get_ops_details()
    except Exception:  # an op without a kernel here; MACs are a courtesy figure
        return None, {}
    by_op: dict[str, int] = {}
    for op in ops:
        name, ins, outs = op["op_name"], list(op["inputs"]), list(op["outputs"])
        if not outs or outs[0] not in shapes or len(ins) < 2 or ins[1] not in shapes:
            continue
        out_elems = math.prod(shapes[outs[0]])
        weights = shapes[ins[1]]
        if name == "CONV_2D" and len(weights) == 4:  # [Cout, kh, kw, Cin]
            macs = out_elems * weights[1] * weights[2] * weights[3]
        elif name == "DEPTHWISE_CONV_2D" and len(weights) == 4:  # [1, kh, kw, Cout]
            macs = out_elems * weights[1] * weights[2]
        elif name == "FULLY_CONNECTED" and len(weights) == 2:  # [Cout, Cin]
            macs = out_elems * weights[1]
        elif name == "BATCH_MATMUL" and ins[0] in shapes:
            macs = out_elems * shapes[ins[0]][-1]
        else:
            continue
        by_op[name] = by_op.get(name, 0) + macs
    return sum(by_op.values()), by_op


def inspect_tflite(model: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensors of a .tflite, without timing anything."""
    interpreter_cls, _, _, _ = _litert_interpreter()
    try:
        interpreter = interpreter_cls(model_path=str(model))
    except ValueError as error:
        raise BenchError(f"{model}: not a valid .tflite model ({error})") from None
    with runtime_call(model, "reading its tensors"):
        details = interpreter.get_input_details(), interpreter.get_output_details()
    inputs, outputs = _specs(details[0]), _specs(details[1])
    check_single_io(model, inputs, outputs)
    return inputs, outputs


def check_single_io(model: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """One input and at least one output: the image classifiers device_bench runs."""
    if len(inputs) != 1:
        raise BenchError(f"{model}: has {len(inputs)} inputs; device_bench runs single-input classifiers")
    if not outputs:
        raise BenchError(f"{model}: has no outputs; device_bench runs classifiers with one output")


def _specs(details: list[dict[str, Any]]) -> list[TensorSpec]:
    specs = []
    for d in details:
        scale, zero_point = d.get("quantization", (0.0, 0))
        specs.append(TensorSpec(d["name"], [int(s) for s in d["shape"]], _litert_dtype(d["dtype"]),
                                float(scale), int(zero_point)))
    return specs


def run_tflite(model: Path, args: argparse.Namespace) -> tuple[TensorSpec, TensorSpec, Measured, dict[str, Any]]:
    """Time a .tflite with the LiteRT interpreter (its default XNNPACK delegate on)."""
    np = _np()
    interpreter_cls, _, runtime, version = _litert_interpreter()
    t0 = time.perf_counter()
    try:
        interpreter = interpreter_cls(model_path=str(model), num_threads=args.threads)
        interpreter.allocate_tensors()
    except RUNTIME_ERRORS as error:
        raise BenchError(f"{model}: not a valid .tflite model ({error})") from None
    load_ms = (time.perf_counter() - t0) * 1e3
    with runtime_call(model, "reading its tensors"):
        details = interpreter.get_input_details(), interpreter.get_output_details()
    inputs, outputs = _specs(details[0]), _specs(details[1])
    check_single_io(model, inputs, outputs)
    check_batch1(inputs[0])
    in_index, out_index = details[0][0]["index"], details[1][0]["index"]

    def invoke(sample: Any) -> None:
        interpreter.set_tensor(in_index, sample[None])
        interpreter.invoke()

    mark = _mark(args.markers)
    # The first invoke (where XNNPACK packs its weights) runs on zeros, before the inputs are read, so the
    # memory figure of the model is not hidden under the data set's.
    t0 = time.perf_counter()
    with runtime_call(model, "running it"):  # a damaged file often loads and fails only here
        invoke(np.zeros(inputs[0].shape[1:], dtype=inputs[0].dtype))
    first_ms = (time.perf_counter() - t0) * 1e3
    model_rss = _rss_kb()
    x, y, source = load_inputs(args.inputs, inputs[0], args.samples)
    first = x[0]
    with runtime_call(model, "running it"):
        for _ in range(args.warmup):
            invoke(first)
        interpreter.set_tensor(in_index, first[None])
        times = timed(interpreter.invoke, args.iters, mark)
    if args.markers:
        _empty_brackets(mark, EMPTY_BRACKETS)
    outs = []
    if y is not None:
        with runtime_call(model, "scoring the inputs"):
            for sample in x:
                invoke(sample)
                outs.append(np.array(interpreter.get_tensor(out_index)))
    measured = Measured(load_ms, first_ms, times, outs, _rss_kb(), "this process", rss_before_inputs_kb=model_rss)
    runtime_info = {"name": runtime, "version": version, "delegate": "XNNPACK (LiteRT default CPU delegate)"}
    return inputs[0], outputs[0], measured, {"runtime": runtime_info, "labels": y, "input_source": source}


def inspect_pte_python(model: Path) -> tuple[Any, TensorSpec, TensorSpec]:
    """Load a .pte with the ExecuTorch Python runtime; its method and tensor specs."""
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise BenchError("no ExecuTorch runtime for .pte: pip install executorch (it needs torch), "
                         "or pass --runner PATH to the native runner built by `edgetl bench --setup arm64`") from None
    runtime = Runtime.get()
    try:
        program = runtime.load_program(str(model))
        meta = program.metadata("forward")
    except RUNTIME_ERRORS as error:
        raise BenchError(f"{model}: not a valid ExecuTorch program ({error})") from None
    if meta.num_inputs() != 1:
        raise BenchError(f"{model}: has {meta.num_inputs()} inputs; device_bench runs single-input classifiers")

    def spec(info: Any, name: str) -> TensorSpec:
        code = int(info.dtype())
        if code not in ET_DTYPES:
            raise BenchError(f"{model}: {name} has ExecuTorch dtype code {code}; valid: {sorted(ET_DTYPES.values())}")
        return TensorSpec(name, [int(s) for s in info.sizes()], ET_DTYPES[code])

    with runtime_call(model, "reading its tensors"):
        if meta.num_outputs() < 1:
            raise BenchError(f"{model}: has no outputs; device_bench runs classifiers with one output")
        described = meta.input_tensor_meta(0), meta.output_tensor_meta(0)
        return program, spec(described[0], "input 0"), spec(described[1], "output 0")


def run_pte_python(model: Path, args: argparse.Namespace) -> tuple[TensorSpec, TensorSpec, Measured, dict[str, Any]]:
    """Time a .pte with the ExecuTorch Python runtime (XNNPACK delegate as lowered at export)."""
    np = _np()
    with contextlib.suppress(ImportError):
        import executorch.runtime  # noqa: F401  (import cost is not load time)
    t0 = time.perf_counter()
    program, in_spec, out_spec = inspect_pte_python(model)
    try:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(args.threads)
    except (ImportError, AttributeError):
        pass
    try:
        method = program.load_method("forward")
    except RUNTIME_ERRORS as error:
        raise BenchError(f"{model}: cannot load method 'forward' ({error})") from None
    load_ms = (time.perf_counter() - t0) * 1e3
    import torch  # the ExecuTorch Python runtime takes torch tensors; only on this path

    mark = _mark(args.markers)
    check_batch1(in_spec)
    t0 = time.perf_counter()
    with runtime_call(model, "running it"):
        method.execute([torch.from_numpy(np.zeros(in_spec.shape, dtype=in_spec.dtype))])
    first_ms = (time.perf_counter() - t0) * 1e3
    model_rss = _rss_kb()
    x, y, source = load_inputs(args.inputs, in_spec, args.samples)
    tensors = [torch.from_numpy(np.ascontiguousarray(sample[None])) for sample in x]
    with runtime_call(model, "running it"):
        for _ in range(args.warmup):
            method.execute([tensors[0]])
        times = timed(lambda: method.execute([tensors[0]]), args.iters, mark)
    if args.markers:
        _empty_brackets(mark, EMPTY_BRACKETS)
    outs = []
    if y is not None:
        with runtime_call(model, "scoring the inputs"):
            outs = [method.execute([t])[0].numpy() for t in tensors]
    runtime_info = {"name": "executorch", "version": _version("executorch"),
                    "delegate": "as lowered at export (XNNPACK partitions)"}
    measured = Measured(load_ms, first_ms, times, outs, _rss_kb(),
                        "this process (with the torch the ExecuTorch Python runtime imports)",
                        rss_before_inputs_kb=model_rss)
    return in_spec, out_spec, measured, {"runtime": runtime_info, "labels": y, "input_source": source}


def run_pte_runner(model: Path, args: argparse.Namespace) -> tuple[TensorSpec, TensorSpec, Measured, dict[str, Any]]:
    """Time a .pte with the native runner (ExecuTorch C++ libraries), e.g. under qemu or on a board.

    A first call with the model alone reads the input spec; the timed run follows with the prepared inputs.
    """
    np = _np()
    prefix = shlex.split(args.runner_prefix) if args.runner_prefix else []

    def call(*runner_args: str) -> dict[str, Any]:
        cmd = [*prefix, str(args.runner), str(model), *runner_args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as error:
            raise BenchError(f"cannot start the runner {args.runner}: {error}") from None
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if "edgetl_pte_runner:" in ln]
            why = (lines or done.stderr.strip().splitlines() or ["no message"])[-1]
            raise BenchError(f"{model}: the runner failed (exit {done.returncode}): {why}")
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise BenchError(f"{model}: the runner printed no result ({done.stdout[-200:]!r})") from None

    described = call()  # with the model only, the runner loads it and describes its input
    spec = TensorSpec("input 0", described["input"]["shape"], described["input"]["dtype"])
    if spec.dtype not in ET_DTYPES.values():
        raise BenchError(f"{model}: input dtype {spec.dtype}; valid: {sorted(ET_DTYPES.values())}")
    with tempfile.TemporaryDirectory(prefix="device_bench-") as tmp:
        x, y, source = load_inputs(args.inputs, spec, args.samples)
        n = len(x) if y is not None else 1
        inputs = Path(tmp, "inputs.bin")
        np.ascontiguousarray(x[:n]).tofile(inputs)
        t0 = time.perf_counter()
        result = call(str(inputs), str(n), str(args.warmup), str(args.iters), str(args.threads),
                      "1" if args.markers else "0", str(Path(tmp, "outputs.bin")))
        wall_s = time.perf_counter() - t0
        out_spec = TensorSpec("output 0", result["output"]["shape"], result["output"]["dtype"])
        flat = np.fromfile(Path(tmp, "outputs.bin"), dtype=np.float32)
        outs = list(flat.reshape(n, -1)) if y is not None else []
    measured = Measured(result["load_ms"], result.get("first_invoke_ms"), result["times_ms"], outs,
                        result.get("max_rss_kb"),
                        "runner process" + (" (the emulator's own RSS under qemu)" if prefix else ""),
                        {"runner_wall_s": round(wall_s, 3), "hwcap": result.get("hwcap"),
                         "hwcap2": result.get("hwcap2")})
    runtime_info = {"name": "edgetl_pte_runner", "version": result.get("executorch_version") or args.runner_version,
                    "delegate": "as lowered at export (XNNPACK partitions)", "runner": str(args.runner)}
    return spec, out_spec, measured, {"runtime": runtime_info, "labels": y, "input_source": source}


# ------------------------------------------------------------------------------------------- results


def _ort_session(model: Path, threads: int) -> tuple[Any, TensorSpec, TensorSpec]:
    """An ONNX Runtime session on the CPU execution provider, and the graph's input and output."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BenchError("no ONNX runtime for .onnx: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types for a damaged or unsupported graph
        raise BenchError(f"{model}: not a valid .onnx model ({error})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise BenchError(f"{model}: expected one input and one output, found {len(inputs)} and {len(outputs)}")

    def spec(info: Any) -> TensorSpec:
        return TensorSpec(info.name, [int(d) if isinstance(d, int) else 1 for d in info.shape],
                          ORT_DTYPES.get(info.type, info.type))

    return session, spec(inputs[0]), spec(outputs[0])


def run_onnx(model: Path, args: argparse.Namespace) -> tuple[TensorSpec, TensorSpec, Measured, dict[str, Any]]:
    """Time a .onnx with ONNX Runtime (CPU execution provider, its default graph optimisations)."""
    np = _np()
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401  (import cost is not load time)
    t0 = time.perf_counter()
    session, in_spec, out_spec = _ort_session(model, args.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    check_batch1(in_spec)
    names = [out_spec.name]

    def invoke(sample: Any) -> Any:
        return session.run(names, {in_spec.name: sample[None]})[0]

    mark = _mark(args.markers)
    t0 = time.perf_counter()
    with runtime_call(model, "running it"):
        invoke(np.zeros(in_spec.shape[1:], dtype=in_spec.dtype))
    first_ms = (time.perf_counter() - t0) * 1e3
    model_rss = _rss_kb()
    x, y, source = load_inputs(args.inputs, in_spec, args.samples)
    first = np.ascontiguousarray(x[0])
    with runtime_call(model, "running it"):
        for _ in range(args.warmup):
            invoke(first)
        feed = {in_spec.name: first[None]}
        times = timed(lambda: session.run(names, feed), args.iters, mark)
    if args.markers:
        _empty_brackets(mark, EMPTY_BRACKETS)
    outs = []
    if y is not None:
        with runtime_call(model, "scoring the inputs"):
            outs = [np.array(invoke(np.ascontiguousarray(sample))) for sample in x]
    runtime_info = {"name": "onnxruntime", "version": _version("onnxruntime"),
                    "delegate": "CPUExecutionProvider (int8 kernels where the graph has Q/DQ pairs)"}
    measured = Measured(load_ms, first_ms, times, outs, _rss_kb(), "this process", rss_before_inputs_kb=model_rss)
    return in_spec, out_spec, measured, {"runtime": runtime_info, "labels": y, "input_source": source}


def summarize(times_ms: list[float]) -> dict[str, float | int]:
    """Percentiles, mean and standard deviation of the timed invokes."""
    np = _np()
    t = np.asarray(times_ms, dtype=np.float64)
    return {"n": int(t.size), "p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
            "p99": float(np.percentile(t, 99)), "mean": float(t.mean()),
            "std": float(t.std(ddof=1)) if t.size > 1 else 0.0, "min": float(t.min()), "max": float(t.max())}


def cpu_info() -> dict[str, Any]:
    """What the CPU says it is (as this process sees it: under qemu, the guest's /proc/cpuinfo)."""
    info: dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    first = text.split("\n\n")[0]
    for line in first.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Hardware", "CPU implementer", "CPU part", "CPU variant", "CPU architecture"):
            info[key.lower().replace(" ", "_")] = value
        elif key in ("Features", "flags"):
            info["features"] = value if key == "Features" else " ".join(f for f in value.split() if f in X86_FLAGS)
    if sys.platform == "darwin":
        with contextlib.suppress(OSError):
            info["model_name"] = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                                text=True, check=False).stdout.strip()
    return info


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(model: Path) -> str:
    """The format, after checking the file is there and carries its format's identifier."""
    if not model.is_file():
        raise BenchError(f"model {model}: no such file")
    suffix = model.suffix.lower()
    if suffix not in IDENTIFIERS:
        raise BenchError(f"model {model}: unknown format {suffix or '(none)'}; valid: {', '.join(IDENTIFIERS)}")
    with model.open("rb") as f:
        head = f.read(8)
    offset, identifier = IDENTIFIERS[suffix]
    if offset is not None and head[offset:offset + len(identifier)] != identifier:
        raise BenchError(f"model {model}: not a {suffix} file (no {identifier.decode()} identifier)")
    return suffix[1:]


def top1(outputs: list[Any], labels: Any) -> dict[str, Any] | None:
    if labels is None or not outputs:
        return None
    np = _np()
    predicted = np.array([int(np.argmax(np.asarray(o).reshape(-1))) for o in outputs])
    correct = int((predicted == np.asarray(labels)).sum())
    return {"top1": correct / len(predicted), "correct": correct, "samples": int(len(predicted))}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurement and build the result document."""
    started = time.time()
    model: Path = args.model
    fmt = check_model_file(model)
    if args.inputs is not None and not args.inputs.is_file():
        raise BenchError(f"inputs {args.inputs}: no such file")
    if fmt == "tflite":
        in_spec, out_spec, measured, info = run_tflite(model, args)
        macs, macs_by_op = (None, {}) if args.no_macs else tflite_macs(model)
    elif fmt == "onnx":
        in_spec, out_spec, measured, info = run_onnx(model, args)
        macs, macs_by_op = None, {}
    elif args.runner is not None:
        in_spec, out_spec, measured, info = run_pte_runner(model, args)
        macs, macs_by_op = None, {}
    else:
        in_spec, out_spec, measured, info = run_pte_python(model, args)
        macs, macs_by_op = None, {}
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "device_bench", "version": TOOL_VERSION},
        "label": args.label,
        "model": {"path": str(model), "file": model.name, "format": fmt, "size_bytes": model.stat().st_size,
                  "sha256": sha256(model), "macs": macs, "macs_by_op": macs_by_op or None,
                  "input": in_spec.as_json(), "output": out_spec.as_json()},
        "runtime": info["runtime"],
        "conditions": {"threads": args.threads, "warmup": args.warmup, "iters": args.iters,
                       "markers": bool(args.markers),
                       "empty_brackets": EMPTY_BRACKETS if args.markers else 0, "inputs": info["input_source"],
                       "runner_prefix": args.runner_prefix or None},
        "timing_ms": {"load": measured.load_ms, "first_invoke": measured.first_invoke_ms,
                      **summarize(measured.times_ms)},
        "times_ms": measured.times_ms,
        "memory": {"peak_rss_kb": measured.peak_rss_kb, "peak_rss_before_inputs_kb": measured.rss_before_inputs_kb,
                   "of": measured.rss_of,
                   "source": "the runner's VmHWM (/proc/self/status)" if args.runner is not None and fmt == "pte"
                   else RSS_SOURCE},
        "accuracy": top1(measured.outputs, info["labels"]),
        "platform": {"system": platform.system(), "release": platform.release(),
                     "python": platform.python_version(), "numpy": _np().__version__, "cpu": cpu_info(),
                     **measured.extra},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
    }


def write_json(document: dict[str, Any], out: Path | None) -> None:
    """Print the JSON, or write it to a temp name beside OUT and rename it (no half-written results)."""
    text = json.dumps(document, indent=2, default=float) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"device_bench: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="device_bench.py",
        description="Time a .tflite, .pte or .onnx model on this machine (load, warm-up, N invokes: p50/p90/p99, mean, "
                    "std), record peak RSS, file size, runtime version and CPU, optionally score top-1 over an "
                    "inputs .npz, and write one JSON result.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the .tflite, .pte or .onnx file")
    parser.add_argument("--inputs", type=Path, help=".npz with x (samples in the model's input layout; float32, "
                        "quantized here for int8/uint8 inputs) and optional y (int labels, for top-1)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed invokes after the first (default 5)")
    parser.add_argument("--iters", type=int, default=50, help="timed invokes (default 50)")
    parser.add_argument("--samples", type=int, help="score top-1 on the first N samples only (default all)")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--label", help="free text stored in the result (e.g. the device name)")
    parser.add_argument("--runner", type=Path, help=".pte only: the native edgetl_pte_runner to use instead of "
                        "the ExecuTorch Python runtime")
    parser.add_argument("--runner-prefix", help="command line put before the runner (e.g. a qemu invocation)")
    parser.add_argument("--runner-version", help="ExecuTorch version the runner was built from, for the record")
    parser.add_argument("--markers", action="store_true", help="bracket each timed invoke with the marker syscall "
                        "counted by edgetl's qemu plugin (never on a phone: seccomp may kill the app)")
    parser.add_argument("--no-macs", action="store_true", help="skip counting the .tflite's multiply-accumulates")
    parser.add_argument("--inspect", action="store_true", help="print the model's tensors and MACs, time nothing")
    args = parser.parse_args(argv)
    for name in ("threads", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or (args.samples is not None and args.samples < 1):
        parser.error("--warmup must be >= 0 and --samples >= 1")
    return args


def inspect(model: Path) -> dict[str, Any]:
    """Tensors and MACs of a model, without timing (edgetl uses it on the host before emulated runs)."""
    fmt = check_model_file(model)
    if fmt == "tflite":
        inputs, outputs = inspect_tflite(model)
        macs, by_op = tflite_macs(model)
        in_spec, out_spec = inputs[0], outputs[0]
    elif fmt == "onnx":
        _, in_spec, out_spec = _ort_session(model, 1)
        macs, by_op = None, {}
    else:
        _, in_spec, out_spec = inspect_pte_python(model)
        macs, by_op = None, {}
    return {"schema_version": SCHEMA_VERSION, "model": {"path": str(model), "format": fmt, "macs": macs,
            "macs_by_op": by_op or None, "input": in_spec.as_json(), "output": out_spec.as_json()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        document = inspect(args.model) if args.inspect else bench(args)
        write_json(document, args.out)
    except BenchError as error:  # one line, whatever the runtime's message held
        print(f"device_bench: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("device_bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
