"""The typed files between stages: every record reads back what it writes, keeps fields it does not know, and
turns a damaged file into one UserError line that names the file and every damaged field (what it holds, what
would be valid); the stages read their inputs through them (a damaged sidecar or export manifest stops bench,
bundle, verify with one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgetl import contracts
from edgetl.contracts import (
    SCHEMA_VERSION,
    ArtifactEntry,
    ArtifactSidecar,
    BenchManifest,
    BenchRow,
    CheckpointManifest,
    ExportManifest,
    PreprocessSpec,
)
from edgetl.data import preprocess_spec
from edgetl.errors import UserError
from tests.conftest import run_cli
from tests.test_cli import _assert_one_line_error
from tests.test_export import make_checkpoint

SHA = "ab" * 32
MODEL = {"backbone": "mobilenet_v2", "width": 0.35, "image_size": 32, "num_classes": 3, "parameters": 400_000}
TENSOR = {"name": "x", "dtype": "int8", "shape": [1, 32, 32, 3], "quantization": {"scale": 0.02, "zero_point": -1},
          "layout": "NHWC"}


def sidecar_json() -> dict:
    return {"kind": "edgetl.artifact", "schema_version": SCHEMA_VERSION, "file": "m-32-int8.tflite",
            "format": "tflite", "quant": "int8", "runtime": "LiteRT", "bytes": 1234, "sha256": SHA,
            "labels": ["a", "b", "c"], "model": MODEL,
            "preprocess": preprocess_spec(32, (0.5,) * 3, (0.25,) * 3, "NHWC"),
            "input": TENSOR, "output": {**TENSOR, "shape": [1, 3], "meaning": "logits"}, "gzip_bytes": 1000,
            "versions": {"edgetl": "0.1.0"}, "made_by_a_newer_edgetl": {"kept": True}}


def test_every_record_reads_back_what_it_writes(tmp_path: Path) -> None:
    raw = json.loads((make_checkpoint(tmp_path) / "manifest.json").read_text())
    checkpoint = CheckpointManifest.from_json(raw)
    assert checkpoint.model.image_size == 32 and checkpoint.model.extra == {"feature_dim": 576, "parameters": 1}
    assert checkpoint.preprocess.resize.height == 32 and checkpoint.test_top1 == 0.5
    assert CheckpointManifest.from_json(checkpoint.to_json()) == checkpoint
    sidecar = ArtifactSidecar.from_json(sidecar_json())
    assert sidecar.input.quantization == {"scale": 0.02, "zero_point": -1} and sidecar.input.extra == {"layout": "NHWC"}
    again = sidecar.to_json()
    assert again["made_by_a_newer_edgetl"] == {"kept": True} and again["kind"] == "edgetl.artifact"
    assert ArtifactSidecar.from_json(again) == sidecar
    entries = (ArtifactEntry(file="m.pte", format="pte", quant="fp32", status="ok", bytes=9, sha256=SHA),
               ArtifactEntry(file="m.tflite", format="tflite", quant="fp32", status="failed", error="RuntimeError: x"))
    export = ExportManifest(model=checkpoint.model, labels=checkpoint.labels, preprocess=checkpoint.preprocess,
                            artifacts=entries, verification={"rows": [{"file": "m.pte", "status": "ok"}]})
    assert ExportManifest.from_json(export.to_json()) == export
    assert export.made() == ["m.pte"] and list(export.verified()) == ["m.pte"]
    rows = (BenchRow(artifact="m.pte", target="host", threads=1, emulated=False, p50_ms=1.5, top1=0.75),
            BenchRow(artifact="m.pte", target="arm64-a76", threads=1, failed="crashed (signal 11)"))
    bench = BenchManifest(rows=rows)
    assert BenchManifest.from_json(bench.to_json()) == bench
    assert bench.to_json()["rows"][1] == {"artifact": "m.pte", "target": "arm64-a76", "threads": 1,
                                          "failed": "crashed (signal 11)"}
    assert PreprocessSpec.from_json(sidecar_json()["preprocess"]).with_layout("NCHW")["layout"] == "NCHW"


@pytest.mark.parametrize(("change", "needle"), [
    ({"bytes": "12"}, 'bytes is "12" (valid: a whole number of 1 or more)'),
    ({"sha256": "abc"}, 'sha256 is "abc" (valid: 64 hexadecimal digits'),
    ({"labels": "a,b"}, 'labels is "a,b" (valid: a list of one or more texts)'),
    ({"model": {**MODEL, "image_size": 0}}, "model.image_size is 0 (valid: a whole number of pixels, 8 or more)"),
    ({"input": {**TENSOR, "quantization": {"scale": "big"}}}, 'input.quantization is {"scale": "big"}'),
    ({"preprocess": {**preprocess_spec(32, (0.5,) * 3, (0.25,) * 3), "layout": "CHW"}},
     'preprocess.layout is "CHW" (valid: NCHW, NHWC)'),
    ({"preprocess": {**preprocess_spec(32, (0.5,) * 3, (0.25,) * 3), "resize": {"height": 32}}},
     "preprocess.resize.width is missing (valid: a whole number of 1 or more)"),
    ({"format": "npy"}, 'format is "npy" (valid: tflite, pte, onnx)'),
    ({"kind": "edgetl.export"}, "holds a 'edgetl.export' file, not an 'edgetl.artifact' one"),
    ({"schema_version": 7}, "schema_version 7 is not supported"),
])
def test_a_damaged_field_is_one_line_naming_the_file_and_the_field(change: dict, needle: str) -> None:
    with pytest.raises(UserError) as caught:
        ArtifactSidecar.from_json({**sidecar_json(), **change}, "'/x/m.tflite.json'")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("'/x/m.tflite.json'") and needle in message, message


def test_every_damaged_field_is_named_in_the_one_line() -> None:
    payload = {**sidecar_json(), "bytes": -1, "format": "npy", "model": {**MODEL, "width": "wide"}, "input": None}
    with pytest.raises(UserError) as caught:
        ArtifactSidecar.from_json(payload, "'/x/m.tflite.json'")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("'/x/m.tflite.json' is damaged: "), message
    for needle in ("bytes is -1", 'format is "npy"', 'model.width is "wide"', "input is null"):
        assert needle in message, message


def test_a_checkpoint_manifest_names_every_damaged_field_and_its_own_rules(tmp_path: Path) -> None:
    raw = json.loads((make_checkpoint(tmp_path) / "manifest.json").read_text())
    damaged = {**raw, "model": {**raw["model"], "backbone": "resnet50", "image_size": "32"}, "metrics": {}}
    with pytest.raises(UserError) as caught:
        CheckpointManifest.from_json(damaged, "'/x/manifest.json'")
    message = str(caught.value)
    for needle in ('model.image_size is "32"', "metrics.test.top1 is missing", 'model.backbone is "resnet50"'):
        assert needle in message, message
    with pytest.raises(UserError, match="labels lists 3 labels but the model has 2 outputs"):
        CheckpointManifest.from_json({**raw, "labels": ["a", "b", "c"]})
    sidecar = ArtifactSidecar.from_json({**sidecar_json(), "model": {**MODEL, "backbone": "tiny"}})
    assert sidecar.model.backbone == "tiny"  # a sidecar may describe any network


def test_a_missing_field_and_a_file_that_is_not_json(tmp_path: Path) -> None:
    payload = sidecar_json()
    del payload["output"]
    with pytest.raises(UserError, match=r"output is missing \(valid: a TensorInfo object\)"):
        ArtifactSidecar.from_json(payload)
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        contracts.read(path, ExportManifest)
    with pytest.raises(UserError, match="is missing"):
        contracts.read(tmp_path / "nothing.json", ExportManifest)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON list, not an object"):
        contracts.read(path, ExportManifest)
    with pytest.raises(UserError, match=r"the whole file is \[1, 2\] \(valid: a JSON object"):
        ExportManifest.from_json([1, 2])


def test_one_schema_version_and_the_kinds_stages_write() -> None:
    from edgetl import manifest

    assert manifest.SCHEMA_VERSION is contracts.SCHEMA_VERSION
    assert {CheckpointManifest.KIND, ArtifactSidecar.KIND, ExportManifest.KIND, BenchManifest.KIND} == {
        "edgetl.checkpoint", "edgetl.artifact", "edgetl.export", "edgetl.bench"}
    names = subprocess.run(["grep", "-rln", "SCHEMA_VERSION = ", str(Path(contracts.__file__).parent)],
                           capture_output=True, text=True).stdout.split()
    assert [Path(n).name for n in names] == ["contracts.py"]


def test_stages_read_their_inputs_through_the_contracts(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "m-32-int8.tflite").write_bytes(b"\x00\x00\x00\x00TFL3")
    (folder / "m-32-int8.tflite.json").write_text(json.dumps({**sidecar_json(), "input": {"name": "x"}}))
    for verb in (["bundle", str(folder)], ["bench", str(folder)]):
        _assert_one_line_error(run_cli(*verb), "m-32-int8.tflite.json", "input.dtype is missing")
    (folder / "manifest.json").write_text(json.dumps({"kind": "edgetl.export", "schema_version": 1}))
    from edgetl.verify import verify_export

    with pytest.raises(UserError, match="manifest.json.*model is missing"):
        verify_export(folder)
