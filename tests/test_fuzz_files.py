"""Generated recipe TOML files and artifact sidecar JSON: whatever a file holds, edgetl reads it as its typed
config or record, or refuses it with one line (exit 2), never another exception.

A recipe is what `edgetl export --recipe` and `edgetl sweep --recipe` read first (`config.resolve`); a sidecar
(`<model>.tflite.json`, `<model>.pte.json`, written beside each exported file) is read by `contracts.read`,
`edgetl bench` (`bench.find_artifacts`) and `edgetl bundle` (`bundle.find_artifact`). Documents are generated
(valid TOML or JSON of random keys and values of random types), mutated from the shipped recipes and from
real sidecars, or random bytes. Each test takes a few seconds; EDGETL_FUZZ_SCALE=20 searches 20 times longer.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgetl import assets
from edgetl.config import (
    RECIPES,
    ExportConfig,
    SweepConfig,
    check_types,
    recipe_names,
    resolve,
    variant_keys,
)
from edgetl.contracts import ArtifactSidecar, read
from edgetl.errors import EXIT_USAGE, UserError, exit_status
from tests.conftest import mutate_json

SCALE = float(os.environ.get("EDGETL_FUZZ_SCALE", "1"))


def examples(count: int) -> int:
    """`count` examples in the default run (a few seconds), more with EDGETL_FUZZ_SCALE."""
    return max(1, int(count * SCALE))


# ------------------------------------------------------------------------------------------ recipe TOML

CONFIGS = {"export": ExportConfig, "sweep": SweepConfig}
FIELD_NAMES = sorted({f.name for kind in CONFIGS.values() for f in fields(kind)} | {"description", "variant"})
# texts a recipe holds, so that generated documents also reach the checks behind the type check
WORDS = ("tflite", "pte", "fp32", "int8", "fp16", "dynamic", "onnx", "host", "arm64-a76", "arm64-a99", "ssh:pi@pi5",
         "ssh:", "adb", "adb:-x", "channels:0.5", "magnitude:0.3", "channels:2", "0.5", "auto", "ptq", "qat",
         "1,2", "0", "fp32,int8", "int8-ptq", "pruned30-int8", "x", "", " ", "python3", "0-3", "-1")


def toml_text(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, bar DEL, which TOML wants escaped)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    """One value as TOML writes it inline (tables as inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_text(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_text(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


def toml_document(document: dict[str, Any]) -> str:
    return "".join(f"{toml_text(key)} = {toml_value(value)}\n" for key, value in document.items())


keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
scalars = (st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.sampled_from(WORDS)
           | st.datetimes(timezones=st.none() | st.just(datetime.UTC)) | st.dates() | st.times())
toml_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3), max_leaves=8)
variant_tables = st.dictionaries(st.sampled_from(("fp32", "mine", "x")) | st.text(max_size=4),
                                 st.dictionaries(st.sampled_from([*variant_keys(), "description"]) | keys,
                                                 toml_values, max_size=4), max_size=2)
documents = st.dictionaries(keys, toml_values, max_size=6)
sweep_documents = st.builds(
    lambda document, tables: document if tables is None else {**document, "variant": tables},
    documents, st.none() | variant_tables | toml_values)


def _recipe_folder(kind: str) -> Path:
    return assets.folder("export") / RECIPES[kind][0]


def _shipped(kind: str) -> list[dict[str, Any]]:
    return [tomllib.loads((_recipe_folder(kind) / f"{name}.toml").read_text()) for name in recipe_names(kind)]


SHIPPED = {kind: _shipped(kind) for kind in CONFIGS}


def _one_line(error: UserError) -> None:
    status, line = exit_status(error) or (None, "")
    assert status == EXIT_USAGE and "\n" not in str(error) and line, str(error)


def _resolve_or_one_line(kind: str, recipe: Path) -> None:
    """`recipe` gives a config of its kind whose every field is of its declared type, or one line."""
    try:
        config = resolve(kind, str(recipe))
    except UserError as error:
        _one_line(error)
        return
    assert isinstance(config, CONFIGS[kind])
    check_types(config)
    assert config.validate() == config  # what was resolved is what a later stage validates again
    json.dumps(config.to_json(), default=str)  # the manifest stores it
    if isinstance(config, SweepConfig):
        for name in config.variants:  # what the sweep will export, each checked alike
            try:
                exported = config.export_config(name).validate()
            except UserError as error:
                _one_line(error)
                continue
            json.dumps(exported.to_json(), allow_nan=False)


def _check_recipe(kind: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        recipe = Path(scratch) / "fuzzed.toml"
        recipe.write_bytes(content)
        _resolve_or_one_line(kind, recipe)




recipe_documents = (st.tuples(st.just("export"), documents) | st.tuples(st.just("sweep"), sweep_documents))


@settings(max_examples=examples(200), deadline=None)
@given(recipe=recipe_documents)
def test_generated_recipes_resolve_or_are_one_line(recipe: tuple[str, dict[str, Any]]) -> None:
    kind, document = recipe
    text = toml_document(document)
    tomllib.loads(text)  # the generator writes valid TOML: what is tested is what edgetl makes of the values
    _check_recipe(kind, text.encode())


@settings(max_examples=examples(200), deadline=None)
@given(kind=st.sampled_from(sorted(CONFIGS)), which=st.integers(0, 100), key=keys, value=toml_values,
       delete=st.booleans())
def test_shipped_recipes_with_one_key_changed_resolve_or_are_one_line(kind: str, which: int, key: str, value: Any,
                                                                     delete: bool) -> None:
    document = dict(SHIPPED[kind][which % len(SHIPPED[kind])])
    if delete:
        document.pop(key, None)
    else:
        document[key] = value
    _check_recipe(kind, toml_document(document).encode())


@st.composite
def damaged(draw: st.DrawFn, source: bytes) -> bytes:
    """`source` with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(source)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(("flip", "insert", "delete", "cut")))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del data[position:position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


SHIPPED_TEXTS = [(kind, (_recipe_folder(kind) / f"{name}.toml").read_bytes())
                 for kind in CONFIGS for name in recipe_names(kind)]


@settings(max_examples=examples(200), deadline=None)
@given(kind=st.sampled_from(sorted(CONFIGS)), content=st.binary(max_size=200)
       | st.sampled_from(SHIPPED_TEXTS).flatmap(lambda shipped: damaged(shipped[1])))
@example(kind="export", content=b"calib = " + b"9" * 5000)  # more digits than Python converts
@example(kind="sweep", content=b"targets = " + b"[" * 3000 + b"]" * 3000)  # nested past the recursion limit
@example(kind="export", content=b'formats = ["\xff"]')  # not UTF-8
@example(kind="export", content=b'\xef\xbb\xbfformats = ["pte"]')  # a byte-order mark
@example(kind="sweep", content=b"variant = 5")
@example(kind="sweep", content=b'[variant.x]\nquant = "int8"\nseed = -1\nvariants = ["x"]')
def test_any_bytes_as_a_recipe_resolve_or_are_one_line(kind: str, content: bytes) -> None:
    _check_recipe(kind, content)


# ---------------------------------------------------------------------------------------- sidecar JSON

# Two sidecars as `edgetl export` wrote them (a tiny MobileNetV2 on builtin:shapes; the learned-rounding list
# is shortened); the model file beside each in the tests holds stand-in bytes whose sha256 replaces the recorded one.
REAL_TFLITE_SIDECAR = {'kind': 'edgetl.artifact',
 'schema_version': 1,
 'file': 'mobilenet_v2-w0.35-32-int8.tflite',
 'format': 'tflite',
 'quant': 'int8',
 'runtime': 'LiteRT (ai-edge-litert Interpreter)',
 'bytes': 673624,
 'sha256': 'ca39b582d6b1a3bd26315106f49130b4ea4c53337cf8b88ad66ba5661384f3c1',
 'labels': ['circle', 'square', 'triangle'],
 'model': {'backbone': 'mobilenet_v2',
           'width': 0.35,
           'image_size': 32,
           'num_classes': 3,
           'feature_dim': 1280,
           'parameters': 399971},
 'preprocess': {'color': 'RGB',
                'resize': {'height': 32, 'width': 32, 'method': 'bilinear', 'keep_aspect': False},
                'scale': 0.00392156862745098,
                'mean': [0.485, 0.456, 0.406],
                'std': [0.229, 0.224, 0.225],
                'layout': 'NHWC',
                'dtype': 'float32'},
 'input': {'name': 'serving_default_args_0',
           'dtype': 'int8',
           'shape': [1, 32, 32, 3],
           'quantization': {'scale': 0.017784887924790382, 'zero_point': -21},
           'layout': 'NHWC'},
 'output': {'name': 'serving_default_output_0_output',
            'dtype': 'int8',
            'shape': [1, 3],
            'quantization': {'scale': 0.017972484230995178, 'zero_point': -3},
            'meaning': 'logits (apply softmax for probabilities), one per label in labels.txt'},
 'labels_file': 'labels.txt',
 'framework': 'torch',
 'converter': 'litert-torch',
 'created': '2026-12-06T10:39:22+00:00',
 'gzip_bytes': 447130,
 'export_seconds': 33.1,
 'quantization': {'method': 'pt2e-ptq',
                  'quantizer': 'XNNPACKQuantizer (executorch), ReLU6 outputs observed after the clamp',
                  'weights': 'int8, symmetric, per output channel (BatchNorm folded first)',
                  'activations': 'int8, per tensor, affine, HistogramObserver',
                  'calibration_images': 108,
                  'bias_correction': True,
                  'fuse_clamp': True,
                  'seconds': 10.4,
                  'input_quantization': {'scale': 0.017784887924790382, 'zero_point': -21}},
 'pruning': None,
 'parent': {'checkpoint': 'runs/shapes/checkpoint',
            'manifest_sha256': '66ee9d0e90c145471343261103ad07b71ae502d697087b32dddbbc7f58bbb958',
            'weights_sha256': '6203d9e6e3f973be754ff861977e7b6c4a4204d35fb273023ac39023b805f773'},
 'delegation': {'delegate': 'XNNPACK (LiteRT default CPU delegate)',
                'delegate_nodes': 1,
                'graph_ops': 69,
                'whole_graph_delegated': True},
 'ops': {'ADD': 10,
         'CONV_2D': 35,
         'DELEGATE': 1,
         'DEPTHWISE_CONV_2D': 17,
         'FULLY_CONNECTED': 1,
         'PAD': 5,
         'SUM': 1},
 'weight_sparsity': {'CONV_2D': {'weights': 358576, 'zeros': 3115, 'sparsity': 0.0087},
                     'DEPTHWISE_CONV_2D': {'weights': 23472, 'zeros': 149, 'sparsity': 0.0063},
                     'FULLY_CONNECTED': {'weights': 3840, 'zeros': 56, 'sparsity': 0.0146}},
 'verification': {'images': 12,
                  'top1': 0.16666666666666666,
                  'agreement': 0.3333333333333333,
                  'max_prob_diff': 0.24035069346427917,
                  'drop_points': 0.0,
                  'seconds': 0.0,
                  'status': 'ok',
                  'remedy': 'ptq'},
 'versions': {'edgetl': '0.1.0',
              'python': '3.11.7',
              'torch': '2.13.0+cpu',
              'torchao': '0.18.0',
              'executorch': '1.5.1',
              'litert-torch': '0.10.0',
              'ai-edge-litert': '2.3.0',
              'numpy': '2.4.6',
              'pillow': '13.0.0'}}

REAL_PTE_SIDECAR = {'kind': 'edgetl.artifact',
 'schema_version': 1,
 'file': 'mobilenet_v2-w0.35-32-int8.pte',
 'format': 'pte',
 'quant': 'int8',
 'runtime': 'ExecuTorch (XNNPACK delegate)',
 'bytes': 549388,
 'sha256': '2f27c2c1049767dcd424b86561692008250a42454d9fba2864cec298c0088777',
 'labels': ['circle', 'square', 'triangle'],
 'model': {'backbone': 'mobilenet_v2',
           'width': 0.35,
           'image_size': 32,
           'num_classes': 3,
           'feature_dim': 1280,
           'parameters': 399971},
 'preprocess': {'color': 'RGB',
                'resize': {'height': 32, 'width': 32, 'method': 'bilinear', 'keep_aspect': False},
                'scale': 0.00392156862745098,
                'mean': [0.485, 0.456, 0.406],
                'std': [0.229, 0.224, 0.225],
                'layout': 'NHWC',
                'dtype': 'float32'},
 'input': {'name': 'input 0',
           'dtype': 'float32',
           'shape': [1, 32, 32, 3],
           'quantization': None,
           'layout': 'NHWC',
           'quantized_inside': {'scale': 0.017784887924790382, 'zero_point': -21}},
 'output': {'name': 'output 0',
            'dtype': 'float32',
            'shape': [1, 3],
            'quantization': None,
            'meaning': 'logits (apply softmax for probabilities), one per label in labels.txt'},
 'labels_file': 'labels.txt',
 'framework': 'torch',
 'converter': 'ExecuTorch to_edge_transform_and_lower (XnnpackPartitioner)',
 'created': '2026-12-06T07:44:54+00:00',
 'gzip_bytes': 461712,
 'export_seconds': 21.4,
 'quantization': {'method': 'pt2e-ptq+adaround',
                  'quantizer': 'XNNPACKQuantizer (executorch), ReLU6 outputs observed after the clamp',
                  'weights': 'int8, symmetric, per output channel (BatchNorm folded first); learned rounding '
                             'on 8 layer(s)',
                  'activations': 'int8, per tensor, affine, HistogramObserver',
                  'calibration_images': 108,
                  'bias_correction': True,
                  'fuse_clamp': True,
                  'seconds': 23.6,
                  'input_quantization': {'scale': 0.017784887924790382, 'zero_point': -21},
                  'learned_rounding': {'method': 'AdaRound-style learned rounding (rectified sigmoid, annealed '
                                                 'regulariser), layer output reconstructed on unlabelled '
                                                 'calibration images; weights written back on the int8 grid',
                                       'layers': [{'layer': 'model.features.0.0',
                                                   'error_nearest': 0.00071065,
                                                   'error_learned': 0.00018497,
                                                   'kept': True,
                                                   'changed_share': 0.13194,
                                                   'seconds': 5.2},
                                                  {'layer': 'model.features.1.conv.0.0',
                                                   'error_nearest': 0.00087138,
                                                   'error_learned': 0.00050996,
                                                   'kept': True,
                                                   'changed_share': 0.11111,
                                                   'seconds': 1.5}],
                                       'iterations': 400,
                                       'images': 108,
                                       'seconds': 19.4}},
 'pruning': None,
 'parent': {'checkpoint': 'runs/shapes/checkpoint',
            'manifest_sha256': '60e6d42d8b2eb0d99745cc1d76a444710e14e8b380371e6c147669f1ed373388',
            'weights_sha256': '6203d9e6e3f973be754ff861977e7b6c4a4204d35fb273023ac39023b805f773'},
 'delegation': {'delegate': 'XnnpackBackend',
                'subgraphs': 2,
                'delegated_nodes': 299,
                'outside_nodes': 3,
                'compute_ops_outside': [],
                'by_operator': {'aten_add_tensor': {'delegated': 10, 'outside': 0},
                                'aten_as_strided_copy_default': {'delegated': 0, 'outside': 1},
                                'aten_convolution_default': {'delegated': 52, 'outside': 0},
                                'aten_hardtanh_default': {'delegated': 35, 'outside': 0},
                                'aten_linear_default': {'delegated': 1, 'outside': 0},
                                'aten_mean_dim': {'delegated': 1, 'outside': 0},
                                'aten_permute_copy_default': {'delegated': 1, 'outside': 0},
                                'aten_view_copy_default': {'delegated': 1, 'outside': 0},
                                'dim_order_ops__clone_dim_order_default': {'delegated': 1, 'outside': 0},
                                'getitem': {'delegated': 0, 'outside': 2},
                                'quantized_decomposed_dequantize_per_channel_default': {'delegated': 53,
                                                                                        'outside': 0},
                                'quantized_decomposed_dequantize_per_tensor_default': {'delegated': 77,
                                                                                       'outside': 0},
                                'quantized_decomposed_quantize_per_tensor_default': {'delegated': 67,
                                                                                     'outside': 0}}},
 'ops': None,
 'weight_sparsity': None,
 'verification': {'images': 12,
                  'top1': 0.16666666666666666,
                  'agreement': 0.5833333333333334,
                  'max_prob_diff': 0.2318507432937622,
                  'drop_points': 0.0,
                  'seconds': 0.0,
                  'status': 'ok',
                  'remedy': 'adaround'},
 'versions': {'edgetl': '0.1.0',
              'python': '3.11.7',
              'torch': '2.13.0+cpu',
              'torchao': '0.18.0',
              'executorch': '1.5.1',
              'litert-torch': '0.10.0',
              'ai-edge-litert': '2.3.0',
              'numpy': '2.4.6',
              'pillow': '13.0.0'}}
REAL_SIDECARS = (REAL_TFLITE_SIDECAR, REAL_PTE_SIDECAR)
MODEL_BYTES = b"stand-in model bytes"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(("int8", "float32", "tflite", "pte", "a" * 64, "NHWC", "RGB", "bilinear", "edgetl.artifact")),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document: object keys and list indices, at any depth."""
    found = [prefix] if prefix else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in children:
        found += _paths(item, (*prefix, key))
    return found




def _sidecar(real: dict) -> dict:
    return {**real, "sha256": hashlib.sha256(MODEL_BYTES).hexdigest()}


def _as_json(record: Any) -> str:
    return json.dumps(record.to_json() if isinstance(record, ArtifactSidecar) else record, sort_keys=True)


def _read_or_one_line(content: bytes, name: str) -> None:
    """The sidecar `content` beside a model file `name`, read as contracts, bench and bundle read it: each gives
    the typed record (bench and bundle the same one) or a UserError of one line; a refusal by contracts names
    the file."""
    from edgetl.bench import check_unmodified, find_artifacts
    from edgetl.bundle import find_artifact

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "export"
        folder.mkdir()
        (folder / name).write_bytes(MODEL_BYTES)
        path = folder / f"{name}.json"
        path.write_bytes(content)
        try:
            record = read(path, ArtifactSidecar)
        except UserError as error:
            _one_line(error)
            assert str(path) in str(error), str(error)
            record = None
        else:  # every field a reader relies on is there and of its kind, and it writes back what it read
            assert isinstance(record.bytes, int) and record.bytes >= 1 and len(record.sha256) == 64
            assert record.labels and all(isinstance(label, str) for label in record.labels)
            assert isinstance(record.model.image_size, int) and record.model.image_size >= 8
            assert all(isinstance(side, int) for side in (*record.input.shape, *record.output.shape))
            assert len(record.preprocess.std) == 3 and all(s > 0 for s in record.preprocess.std)
            assert _as_json(ArtifactSidecar.from_json(json.loads(_as_json(record)))) == _as_json(record)
        try:
            artifacts = find_artifacts(folder)
            check_unmodified(artifacts, allow_modified=False)
        except UserError as error:
            _one_line(error)
        else:
            assert record is not None and _as_json(artifacts[0].sidecar) == _as_json(record)
        try:
            _, bundled = find_artifact(folder, None)
        except UserError as error:
            _one_line(error)
        else:
            assert record is not None and _as_json(bundled) == _as_json(record)


def test_the_real_sidecars_are_read_by_every_reader() -> None:
    for real in REAL_SIDECARS:
        sidecar = _sidecar(real)
        record = ArtifactSidecar.from_json(sidecar)
        assert record.file == real["file"] and record.input.shape == (1, 32, 32, 3)
        _read_or_one_line(json.dumps(sidecar).encode(), real["file"])


@settings(max_examples=examples(300), deadline=None)
@given(data=st.data(), replacement=json_values, delete=st.booleans())
def test_real_sidecars_with_one_value_changed_are_read_or_one_line(data: st.DataObject, replacement: object,
                                                                  delete: bool) -> None:
    real = _sidecar(data.draw(st.sampled_from(REAL_SIDECARS)))
    path = data.draw(st.sampled_from(_paths(real)))
    damaged_sidecar = mutate_json(real, path, replacement, delete)
    _read_or_one_line(json.dumps(damaged_sidecar).encode(), real["file"])


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(REAL_SIDECARS), content=st.data())
@example(which=REAL_TFLITE_SIDECAR, content=None)
def test_any_bytes_or_json_as_a_sidecar_are_read_or_one_line(which: dict, content: st.DataObject | None) -> None:
    real = json.dumps(_sidecar(which), indent=2).encode()
    if content is None:  # a number of more digits than Python converts
        raw = real.replace(b'"bytes": ', b'"bytes": ' + b"9" * 5000 + b", \"was\": ")
    else:
        raw = content.draw(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
                           | damaged(real))
    _read_or_one_line(raw, which["file"])
