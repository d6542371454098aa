"""int8 by policy: `--int8 auto|ptq|qat` and its bad input, the per-layer sensitivity table, learned rounding that
both converters keep to the integer, and one real `--int8 auto` export at 32 px with its remedy recorded."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetl.config import VARIANTS, ExportConfig
from edgetl.errors import UserError
from tests.conftest import run_cli
from tests.test_cli import _assert_one_line_error as _one_line_error
from tests.test_export import make_checkpoint

# ------------------------------------------------------------------------------------ the options


def test_int8_modes_validate_and_qat_is_the_same_as_int8_qat() -> None:
    assert ExportConfig.of().validate().policy.int8 == "auto" and not ExportConfig.of().validate().policy.qat
    assert ExportConfig.of(qat=True).validate().policy.int8 == "qat"
    assert ExportConfig.of(int8="QAT").validate().policy.qat  # --int8 qat trains from the start, as --qat does
    assert ExportConfig.of(int8="ptq", no_qat=True).validate().policy.int8 == "ptq"
    for options, needles in (({"int8": "foo"}, ("'foo'", "auto, ptq, qat")),
                             ({"int8": "qat", "no_qat": True}, ("--no-qat", "--int8 is qat", "valid:")),
                             ({"qat": True, "no_qat": True}, ("--no-qat", "valid:")),
                             ({"qat": True, "int8": "ptq"}, ("--qat", "--int8 is ptq", "valid:")),
                             ({"rounding_layers": -1}, ("--rounding-layers -1", "valid: 0")),
                             ({"int8": "qat", "quant": ("fp32",)}, ("add int8 to --quant",)),
                             ({"int8": "ptq", "float_layers": "a.b"}, ("--float-layers a.b", "--int8 auto", "valid:")),
                             ({"float_layers": "a.b", "quant": ("fp32",)}, ("--float-layers a.b", "add int8"))):
        with pytest.raises(UserError) as caught:
            ExportConfig.of(**options).validate()
        for needle in needles:
            assert needle in str(caught.value)
    with pytest.raises(UserError, match="--rounding-layers 4: torch-only"):
        ExportConfig.of(rounding_layers=4).for_backend("keras")
    with pytest.raises(UserError, match="--float-layers: torch-only"):
        ExportConfig.of(float_layers="model.stem").for_backend("keras")
    assert ExportConfig.of(int8="auto", no_qat=True).for_backend("keras").policy.no_qat  # keras' auto: PTQ, then QAT


def test_float_layers_keep_their_case_and_order_without_repeats() -> None:
    config = ExportConfig.of(float_layers=" model._conv_stem, model.Head ,model._conv_stem").validate()
    assert config.policy.float_layers == ("model._conv_stem", "model.Head")
    assert config.to_json()["policy"]["float_layers"] == ["model._conv_stem", "model.Head"]


def test_sweep_variants_say_their_int8_method() -> None:
    assert ExportConfig.of(**VARIANTS["int8-ptq"].overrides).validate().policy.int8 == "ptq"
    assert ExportConfig.of(**VARIANTS["int8-auto"].overrides).validate().policy.int8 == "auto"
    assert ExportConfig.of(**VARIANTS["int8-qat"].overrides).validate().policy.int8 == "qat"


def test_bad_int8_options_on_the_command_line_exit_2_before_any_work(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path)
    out = tmp_path / "export"
    _one_line_error(run_cli("export", str(checkpoint), "--int8", "foo", "--out", str(out)),
                    "--int8 mode 'foo'", "auto, ptq, qat")
    _one_line_error(run_cli("export", str(checkpoint), "--int8", "qat", "--no-qat", "--out", str(out)),
                    "--no-qat", "--int8 is qat")
    assert not out.exists()


@pytest.mark.torch
def test_an_unknown_float_layer_exits_2_listing_the_layer_names_before_any_work(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    checkpoint = make_checkpoint(tmp_path)  # placeholder weights: the names come from the architecture alone
    out = tmp_path / "export"
    result = run_cli("export", str(checkpoint), "--float-layers", "model.features.0.0,model.stem", "--out", str(out))
    _one_line_error(result, "--float-layers", "'model.stem' is not a quantized layer of this mobilenet_v3_small",
                    "valid: model.features.0.0, ", "model.classifier.")
    assert "'model.features.0.0'" not in result.stderr  # a real layer is not reported
    assert not out.exists()


def test_auto_with_qat_allowed_needs_the_training_images_and_says_so(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path)
    for image in (tmp_path / "data").glob("*/train-*.png"):
        image.unlink()
    result = run_cli("export", str(checkpoint), "--out", str(tmp_path / "export"))
    _one_line_error(result, "--int8 auto", "--no-qat", "training images", str(tmp_path / "data"))
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------------- sensitivity and rounding (torch)

torch = pytest.importorskip("torch")
nn = torch.nn


class Tiny(nn.Module):
    """NHWC in, conv → ReLU6 → depthwise → ReLU6 → 1x1 → pool → linear (BN already folded)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = nn.functional.relu6(self.conv(x))
        x = nn.functional.relu6(self.dw(x))
        return self.fc(self.pw(x).mean(dim=(2, 3)))


def _calibration(count: int = 48, size: int = 12) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(count, size, size, 3)).astype(np.float32))


@pytest.mark.torch
def test_sensitivity_ranks_the_layer_whose_rounding_hurts_and_counts_macs() -> None:
    from edgetl.backends.torch.sensitivity import layer_sensitivity, most_sensitive

    model = Tiny().eval()
    with torch.no_grad():  # one outlier per output: the classifier's other weights round to 0 on its grid
        model.fc.weight[:, 0] = 400 * model.fc.weight.abs().amax()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = layer_sensitivity(model, _calibration(), seconds=60, images=32)
    assert [r["layer"] for r in record["rows"]] == ["conv", "dw", "pw", "fc"]
    assert record["measured"] == 4 and record["images"] == 32
    assert most_sensitive(record, 1) == ["fc"]
    rows = {r["layer"]: r for r in record["rows"]}
    assert rows["dw"]["kind"] == "depthwise" and rows["pw"]["kind"] == "conv 1x1" and rows["fc"]["kind"] == "linear"
    assert rows["conv"]["macs"] == 12 * 12 * 8 * 27 and rows["fc"]["macs"] == 64
    assert sum(r["macs_share"] for r in record["rows"]) == pytest.approx(1, abs=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # left as it was
    bounded = layer_sensitivity(model, _calibration(), seconds=0, images=8)
    assert bounded["measured"] == 0 and not any(r["measured"] for r in bounded["rows"])


@pytest.mark.torch
def test_a_sensitivity_table_cut_short_is_completed_without_measuring_a_layer_twice() -> None:
    """Which layers a time-bounded table reaches depends on the machine's load; learned rounding picks its layers
    from a completed table, so its choice does not. Rows already measured are kept as they are."""
    from edgetl.backends.torch.sensitivity import complete, layer_sensitivity, most_sensitive

    model = Tiny().eval()
    with torch.no_grad():
        model.fc.weight[:, 0] = 400 * model.fc.weight.abs().amax()
    full = layer_sensitivity(model, _calibration(), seconds=60, images=16)
    assert complete(full) and not complete(None)
    cut = json.loads(json.dumps(full))  # as a busy machine leaves it: the last two layers not reached
    for row in cut["rows"][2:]:
        for key in ("logit_error", "relative_logit_error", "changed_predictions", "rank"):
            row.pop(key, None)
        row["measured"] = False
    cut["measured"], cut["rows"][0]["logit_error"] = 2, 99.0  # a kept row is taken as it is, not measured again
    assert not complete(cut) and most_sensitive(cut, 1) == ["conv"]
    completed = layer_sensitivity(model, _calibration(), seconds=float("inf"), images=16, known=cut)
    assert complete(completed) and completed["completed"].startswith("2 rows")
    assert completed["budget_seconds"] == 60.0  # the table's own budget; the manifest stays strict JSON
    json.dumps(completed, allow_nan=False)
    unbounded = layer_sensitivity(model, _calibration(), seconds=float("inf"), images=8)
    assert unbounded["budget_seconds"] is None and complete(unbounded)
    json.dumps(unbounded, allow_nan=False)
    rows = {r["layer"]: r for r in completed["rows"]}
    assert rows["conv"]["logit_error"] == 99.0 and rows["conv"]["rank"] == 1
    for name in ("dw", "pw", "fc"):
        assert rows[name]["logit_error"] == next(r for r in full["rows"] if r["layer"] == name)["logit_error"]
    assert most_sensitive(completed, 2) == ["conv", "fc"]
    assert layer_sensitivity(model, _calibration(), seconds=0, images=16, known=full)["measured"] == 4


@pytest.mark.torch
def test_learned_rounding_is_sized_in_pixels_so_224_px_costs_what_128_px_costs() -> None:
    """At 224 px each step and the captured activations would cost 3x those at 128 px: learned rounding takes
    proportionally fewer images and a smaller batch there (each step still sees as many activation positions),
    and keeps its defaults at 128 px and below."""
    from edgetl.backends.torch.adaround import adaround, sized_for

    assert sized_for(torch.zeros(300, 128, 128, 3)) == (256, 32)
    assert sized_for(torch.zeros(300, 32, 32, 3)) == (256, 32)
    assert sized_for(torch.zeros(300, 224, 224, 3)) == (84, 10)
    assert sized_for(torch.zeros(300, 512, 512, 3)) == (32, 8)  # floors: enough images and a batch to learn from
    images, batch = sized_for(torch.zeros(1, 224, 224, 3))
    assert images * 224 * 224 == pytest.approx(256 * 128 * 128, rel=0.01) and batch * 224**2 == pytest.approx(
        32 * 128**2, rel=0.05)
    _, record = adaround(Tiny().eval(), _calibration(), ["conv"], iterations=20)
    assert (record["images"], record["batch"]) == (len(_calibration()), 32)  # 12 px: the defaults, all images


@pytest.mark.torch
def test_learned_rounding_reconstructs_better_and_pt2e_keeps_exactly_its_integers() -> None:
    pytest.importorskip("executorch")
    from edgetl.backends.torch.adaround import adaround
    from edgetl.backends.torch.export import _fold_weight_quantization
    from edgetl.backends.torch.quantize import quantize_ptq, weight_scale

    calibration = _calibration()
    model = Tiny().eval()
    rounded, record = adaround(model, calibration, ["conv", "dw", "pw"], iterations=150)
    assert [r["layer"] for r in record["layers"]] == ["conv", "dw", "pw"]
    for row in record["layers"]:
        assert row["error_learned"] <= row["error_nearest"]
    assert any(r["kept"] and r["changed_share"] > 0 for r in record["layers"])  # some weights rounded the other way
    expected = {}
    for name in ("conv", "dw", "pw"):
        weight = getattr(rounded, name).weight.detach()
        integers = weight / weight_scale(weight)
        assert torch.allclose(integers, integers.round(), atol=1e-4)  # on the int8 grid
        expected[name] = integers.round().to(torch.int8)
    graph = _fold_weight_quantization(quantize_ptq(rounded, torch.zeros(1, 12, 12, 3), torch.split(calibration, 16)))
    attributes = [functools.reduce(getattr, node.target.split("."), graph) for node in graph.graph.nodes
                  if node.op == "get_attr"]
    frozen = [t for t in [*graph.state_dict().values(), *attributes]
              if isinstance(t, torch.Tensor) and t.dtype == torch.int8]
    for name, integers in expected.items():
        assert any(t.shape == integers.shape and torch.equal(t, integers) for t in frozen), name
    if importlib.util.find_spec("litert_torch") is None:
        return
    # the .tflite made from the same Q/DQ graph holds the same integers (conv weights stored OHWI, depthwise 1HWO)
    from ai_edge_litert.interpreter import Interpreter

    from edgetl.backends.torch.export import convert_tflite

    interpreter = Interpreter(model_content=convert_tflite(
        quantize_ptq(rounded, torch.zeros(1, 12, 12, 3), torch.split(calibration, 16)), torch.zeros(1, 12, 12, 3),
        quantized=True), experimental_preserve_all_tensors=True)
    stored = []
    for detail in interpreter.get_tensor_details():
        if detail["dtype"] == np.int8 and len(detail["shape"]) == 4:
            try:
                stored.append(interpreter.get_tensor(detail["index"]))
            except ValueError:  # activation tensors hold no data before invoke
                continue
    layouts = {"conv": (0, 2, 3, 1), "pw": (0, 2, 3, 1), "dw": (1, 2, 3, 0)}
    for name, integers in expected.items():
        wanted = integers.numpy().transpose(layouts[name])
        assert any(t.shape == wanted.shape and np.array_equal(t, wanted) for t in stored), name


@pytest.mark.torch
def test_float_fallback_keeps_named_layers_float_in_both_formats_and_the_interface_int8(tmp_path: Path) -> None:
    """The named layers' weights stay float in the Q/DQ graph, in the .tflite (a float kernel between a dequantize
    and a quantize) and in the .pte; every other layer stays int8 and so do the model's input and output."""
    pytest.importorskip("executorch")
    pytest.importorskip("litert_torch")
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgetl import formats
    from edgetl.backends.torch.export import convert_tflite, lower_pte
    from edgetl.backends.torch.quantize import quantize_ptq

    calibration, example = _calibration(), torch.zeros(1, 12, 12, 3)
    model = Tiny().eval()
    with pytest.raises(ValueError, match="not found.*nope"):
        quantize_ptq(model, example, torch.split(calibration, 16), float_layers=["conv", "nope"])

    def quantized_weights(graph: torch.fx.GraphModule) -> set[str]:
        """The weights (get_attr targets) that reach a per-channel dequantize through their quantize."""
        return {str(node.args[0].args[0].target) for node in graph.graph.nodes
                if node.op == "call_function" and "dequantize_per_channel" in str(node.target)}

    assert len(quantized_weights(quantize_ptq(model, example, torch.split(calibration, 16)))) == 4
    graph = quantize_ptq(model, example, torch.split(calibration, 16), float_layers=["conv", "fc"])
    assert {name.split("_")[0].split(".")[0] for name in quantized_weights(graph)} == {"dw", "pw"}

    tflite = tmp_path / "fallback.tflite"
    tflite.write_bytes(convert_tflite(graph, example, quantized=True, strict_qdq=True))
    interpreter = Interpreter(model_path=str(tflite),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    kinds = [(op["op_name"], tensors[op["outputs"][0]]["dtype"]) for op in interpreter._get_ops_details()]
    assert ("CONV_2D", np.float32) in kinds and ("FULLY_CONNECTED", np.float32) in kinds
    assert ("DEPTHWISE_CONV_2D", np.int8) in kinds and ("CONV_2D", np.int8) in kinds  # dw and pw stay int8
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert kinds[0][0] != "QUANTIZE" and kinds[-1][0] != "DEQUANTIZE"  # the interface conversions were dropped

    x = calibration[:16].numpy()
    with torch.no_grad():
        reference = graph(torch.from_numpy(x)).numpy()
    spread = float(np.abs(reference).max())
    assert np.abs(formats.run(tflite, x) - reference).max() <= 0.05 * spread
    payload, delegation = lower_pte(graph, example)
    assert delegation["delegated_nodes"] > 0
    pte = tmp_path / "fallback.pte"
    pte.write_bytes(payload)
    assert np.abs(formats.run(pte, x) - reference).max() <= 0.05 * spread


# ----------------------------------------------------------------------------- one real export

@pytest.mark.torch
def test_auto_over_budget_gets_learned_rounding_recorded_with_cost_and_gain(tiny_checkpoint: Path,
                                                                            tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    from edgetl import export
    from edgetl.manifest import read_checkpoint

    # the tiny checkpoint has no validation split; this copy carves one from its training images
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    splits_file = checkpoint / read_checkpoint(checkpoint).splits_file
    listing = json.loads(splits_file.read_text())
    listing["splits"]["val"], listing["splits"]["train"] = listing["splits"]["train"][:10], \
        listing["splits"]["train"][10:]
    splits_file.write_text(json.dumps(listing))
    out = tmp_path / "export"
    result = run_cli("export", str(checkpoint), "--formats", "tflite", "--quant", "int8", "--max-drop", "0",
                     "--no-qat", "--rounding-layers", "4", "--calib", "32", "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    quantization = manifest["quantization"]
    policy, sensitivity = quantization["policy"], quantization["sensitivity"]
    assert policy["mode"] == "auto" and policy["no_qat"] and policy["max_drop"] == 0
    name = "mobilenet_v2-w0.35-32-int8.tflite"
    first = policy["first"][name]
    # remedies are judged on the validation split; the test split only reports (PTQ alone is recorded there too)
    # the changed predictions are also counted on the training images the calibration draw left out
    left_out = min(len(listing["splits"]["train"]) - 32, export.UNLABELLED_JUDGE_IMAGES)
    assert left_out > 0
    assert policy["judged_on"] == {"split": "validation", "images": 10, "unlabelled_images": left_out}
    for record in [first] + [f for step in policy["steps"] for f in step["files"].values() if "error" not in f]:
        assert record["changed_predictions"] == record["changed_labelled"] + record["changed_unlabelled"]
        assert record["changed_labelled"] <= 10 and record["changed_unlabelled"] <= left_out
    assert "changed_unlabelled" not in first["test"]  # the test split's record is the test images' alone
    assert first["test"]["top1"] == pytest.approx(manifest["float_reference"]["top1"] - first["test"]["drop_points"]
                                                  / 100, abs=1e-4)
    assert sensitivity["measured"] == sensitivity["layers"] == len(sensitivity["rows"]) > 20
    assert "int8 sensitivity" in result.stdout and "int8 by" in (out / "verification.txt").read_text()
    # PTQ calibrates both activation observers and keeps the one whose logits lie closer to float's, unless it
    # changes clearly more top-1 classes (no labels either way)
    from edgetl.backends.torch.ranges import choose_observer

    choice = quantization["activation_choice"]
    observers = {"histogram", "per-image", "percentile"}
    assert set(choice["errors"]) == set(choice["changed_top1"]) == observers and choice["images"] == 32
    assert (choice["chosen"], choice["why"]) == choose_observer(choice["errors"], choice["changed_top1"], 32)
    described = {"histogram": "HistogramObserver", "per-image": "each image's min/max",
                 "percentile": "PercentileObserver"}[choice["chosen"]]
    assert described in quantization["activations"]
    row = manifest["verification"]["rows"][0]
    if first["drop_points"] <= 0:  # PTQ already within a zero budget: nothing to remedy
        assert policy["steps"] == [] and row["remedy"] == "ptq" and result.returncode == 0
        return
    steps = [s["remedy"] for s in policy["steps"]]
    assert steps[:3] == ["equalize", "ranges", "adaround"][:len(steps)]  # cheapest first, until within budget
    if "adaround" not in steps:
        return
    step = policy["steps"][steps.index("adaround")]
    assert step["seconds"] > 0 and step["quantization"]["method"].endswith("+adaround")
    assert len(step["quantization"]["learned_rounding"]["layers"]) == 4
    made = step["files"][name]
    assert made["gain_points"] == pytest.approx(made["drop_before"] - made["drop_points"], abs=0.011)
    standing, by = first["drop_points"], "ptq"  # the file as it stood before learned rounding
    for earlier in policy["steps"][:steps.index("adaround")]:
        if earlier["files"].get(name, {}).get("kept"):
            standing, by = earlier["files"][name]["drop_points"], earlier["remedy"]
    assert made["drop_before"] == standing
    assert row["remedy"] in ("adaround" if made["kept"] else by, "float-fallback", "qat")
    assert policy["steps"][-1] in ({"remedy": "qat", "files": {}, "skipped": "--no-qat"}, step)
    sidecar = json.loads((out / f"{name}.json").read_text())
    assert sidecar["verification"]["remedy"] == row["remedy"]
    assert result.returncode == (0 if row["drop_points"] <= 0 else 3), result.stderr[-2000:]
    assert not list(out.glob(".remedy-*"))  # candidates never stay


def test_remedies_are_judged_on_the_validation_split_and_on_the_test_split_only_without_one() -> None:
    from edgetl import export

    x_test, y_test, x_val, y_val = np.ones((3, 2, 2, 3)), np.arange(3), np.zeros((2, 2, 2, 3)), np.arange(2)
    test = export.Judge("test", x_test, y_test, np.eye(3))
    inputs = export.Inputs({}, x_test, y_test, np.zeros((0, 2, 2, 3)), [], x_val, y_val)
    judge = export.judge_of(inputs, test, lambda x: np.full((len(x), 3), x.mean()))
    assert judge.split == "validation" and judge.x is x_val and judge.y is y_val
    assert judge.reference.shape == (2, 3) and judge.describe() == {"split": "validation", "images": 2}
    inputs = export.Inputs({}, x_test, y_test, np.zeros((0, 2, 2, 3)), [])
    judge = export.judge_of(inputs, test, lambda x: pytest.fail("no validation images to run"))
    assert judge is test and judge.describe() == {"split": "test", "images": 3}
    # training images left out of calibration join either judge, for the changed predictions only
    unlabelled = np.full((4, 2, 2, 3), 2.0)
    inputs = export.Inputs({}, x_test, y_test, np.zeros((0, 2, 2, 3)), [], x_val, y_val, unlabelled)
    judge = export.judge_of(inputs, test, lambda x: np.full((len(x), 3), x.mean()))
    assert judge.split == "validation" and judge.unlabelled is unlabelled
    assert judge.unlabelled_reference.shape == (4, 3) and judge.unlabelled_reference[0, 0] == 2.0
    assert judge.describe() == {"split": "validation", "images": 2, "unlabelled_images": 4}
    assert judge.says() == "the 2 validation images (changed predictions also on 4 unlabelled training images)"
    inputs = export.Inputs({}, x_test, y_test, np.zeros((0, 2, 2, 3)), [], None, None, unlabelled)
    judge = export.judge_of(inputs, test, lambda x: np.zeros((len(x), 3)))
    assert judge.split == "test" and judge.x is x_test and judge.reference is test.reference
    assert test.unlabelled is None  # the test split's own judge, which verification's record uses, stays as it was


def test_measure_counts_changed_predictions_on_the_unlabelled_images_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The drop comes from the labelled images alone; the changed predictions from both."""
    from edgetl import export

    reference = np.eye(3)[[0, 1, 2, 0]]  # float predicts 0, 1, 2, 0; labels 0, 1, 1, 0
    unlabelled_reference = np.eye(3)[[2, 2, 1, 0, 0]]
    runs = {4: np.eye(3)[[0, 2, 2, 0]],  # changes image 1: one label lost, one prediction changed
            5: np.eye(3)[[2, 1, 1, 1, 0]]}  # changes two of the five unlabelled
    monkeypatch.setattr(export.formats, "run", lambda path, x, threads, fmt: runs[len(x)])
    judge = export.Judge("validation", np.zeros((4, 2, 2, 3)), np.array([0, 1, 1, 0]), reference,
                         np.zeros((5, 2, 2, 3)), unlabelled_reference)
    measured = export._measure(Path("a.tflite"), "tflite", judge, 1)
    assert measured == {"drop_points": 25.0, "top1": 0.5, "changed_predictions": 3, "changed_labelled": 1,
                        "changed_unlabelled": 2}
    measured = export._measure(Path("a.tflite"), "tflite", export.Judge("test", judge.x, judge.y, reference), 1)
    assert measured == {"drop_points": 25.0, "top1": 0.5, "changed_predictions": 1}


def test_a_label_free_remedy_is_kept_only_when_no_worse_in_drop_and_changed_predictions() -> None:
    """Label-free remedies aim at the float model; QAT trains toward the labels and is judged by the drop."""
    from edgetl.export import replaces

    # measured (MobileNetV3-Large from scratch on sprites-5, 38.2% float): per-tensor ranges moved 53 of 131 test
    # predictions against PTQ's 26 and "gained" 13.74 points; judged by the drop alone it was kept
    assert not replaces("ranges", -12.98, 53, 0.76, 26)
    # measured (MobileNetV3-Small, sprites-5): ranges changed one prediction fewer but lost one image more
    assert not replaces("ranges", 1.53, 13, 0.76, 14)
    assert replaces("ranges", 0.0, 13, 1.53, 20)
    assert replaces("equalize", 0.0, 2, 1.53, 2)  # as many changed, less lost
    assert replaces("equalize", 1.53, 1, 1.53, 2)  # as much lost, fewer changed
    assert not replaces("equalize", 1.53, 2, 1.53, 2)
    assert not replaces("adaround", 0.3, 11, 2.0, 10)  # one more prediction moved away from float
    assert replaces("qat", -0.7, 115, 0.2, 44)  # trained toward the labels: the drop decides
    assert not replaces("qat", 0.3, 10, 0.2, 44)


def test_policy_tries_remedies_in_order_keeps_only_gains_and_honours_no_qat(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The remedy loop on scripted drops: equalization first (no gain: not kept), activation ranges (worse: not
    kept), then learned rounding; a
    remedied file replaces the earlier one only if it lost less; QAT runs only for what is still over the budget
    and never with --no-qat."""
    from types import SimpleNamespace

    from edgetl import export
    from edgetl.backends.base import CAPABILITIES, Graphs
    from edgetl.contracts import ArtifactEntry

    drops = {"ptq": {"a.tflite": 1.5, "a.pte": 0.8}, "ranges": {"a.tflite": 1.6, "a.pte": 0.8},
             "equalize": {"a.tflite": 1.5, "a.pte": 0.8},
             "adaround": {"a.tflite": 1.2, "a.pte": 0.9},
             "float-fallback": {"a.tflite": 0.4, "a.pte": 0.6}, "qat": {"a.tflite": 0.1, "a.pte": 0.3}}
    state = {"made_by": "ptq"}

    class Backend:
        capabilities = CAPABILITIES["torch"]
        calls: list[str] = []

        def remedy(self, name, graphs, *args) -> None:
            self.calls.append(name)
            state["made_by"] = name
            graphs.quantization = {"method": name}

    def export_one(backend, context, quant, fmt, folder, parts=True):
        (folder / f"a.{fmt}").write_text(state["made_by"])
        (folder / f"a.{fmt}.json").write_text("{}")
        return ArtifactEntry(file=f"a.{fmt}", format=fmt, quant="int8", status="ok")

    def measure(path, fmt, judge, threads):
        made_by = path.read_text()
        return {"drop_points": drops[made_by][path.name], "top1": 0.5, "changed_predictions": 10}

    monkeypatch.setattr(export, "_export_one", export_one)
    monkeypatch.setattr(export, "_measure", measure)
    for fmt in ("tflite", "pte"):
        (tmp_path / f"a.{fmt}").write_text("ptq")
    artifacts = [ArtifactEntry(file=f"a.{fmt}", format=fmt, quant="int8", status="ok") for fmt in ("tflite", "pte")]

    def run(config: ExportConfig) -> dict:
        state["made_by"] = "ptq"
        Backend.calls = []
        for fmt in ("tflite", "pte"):
            (tmp_path / f"a.{fmt}").write_text("ptq")
        context = SimpleNamespace(config=config.validate(), graphs=Graphs(float_model=None, example=None),
                                  manifest=None, graph_of={})
        inputs = SimpleNamespace(calibration=np.zeros((1, 2, 2, 3)))
        judge = export.Judge("validation", np.zeros((2, 2, 2, 3)), np.zeros(2), np.zeros((2, 2)))
        return export._apply_policy(Backend(), context, tmp_path, None, inputs, judge, list(artifacts), tmp_path)

    policy = run(ExportConfig.of(max_drop=1.0, no_qat=True))
    assert Backend.calls == ["equalize", "ranges", "adaround"]
    assert policy["remedy_of"] == {"a.tflite": "adaround", "a.pte": "ptq"}  # .pte was within: never remade
    assert policy["steps"][0]["files"]["a.tflite"]["kept"] is False  # equalization gained nothing: PTQ's file stayed
    assert policy["steps"][1]["files"]["a.tflite"]["kept"] is False  # ranges lost more: not kept either
    step = policy["steps"][2]
    assert list(step["files"]) == ["a.tflite"] and step["files"]["a.tflite"]["gain_points"] == pytest.approx(0.3)
    assert policy["steps"][3] == {"remedy": "float-fallback", "files": {}, "skipped": "no --float-layers"}
    assert policy["steps"][4] == {"remedy": "qat", "files": {}, "skipped": "--no-qat"}
    assert (tmp_path / "a.tflite").read_text() == "adaround"

    policy = run(ExportConfig.of(max_drop=0.7, no_qat=True, float_layers="model.stem"))
    assert Backend.calls == ["equalize", "ranges", "adaround", "float-fallback"]  # within the budget: no QAT step
    assert policy["remedy_of"] == {"a.tflite": "float-fallback", "a.pte": "float-fallback"}
    assert [s["remedy"] for s in policy["steps"]] == ["equalize", "ranges", "adaround", "float-fallback"]
    assert policy["steps"][3]["files"]["a.pte"]["drop_before"] == 0.8  # .pte's adaround was worse: from PTQ's
    assert policy["steps"][3]["files"]["a.tflite"]["drop_before"] == 1.2

    policy = run(ExportConfig.of(max_drop=0.5))
    assert Backend.calls == ["equalize", "ranges", "adaround", "qat"]
    assert policy["remedy_of"] == {"a.tflite": "qat", "a.pte": "qat"}
    assert policy["steps"][2]["files"]["a.pte"] == {"drop_points": 0.9, "top1": 0.5, "changed_predictions": 10,
                                                    "drop_before": 0.8, "changed_before": 10, "gain_points": -0.1,
                                                    "kept": False, "seconds": pytest.approx(0, abs=1)}
    assert [s["remedy"] for s in policy["steps"]] == ["equalize", "ranges", "adaround", "float-fallback", "qat"]
    assert (tmp_path / "a.pte").read_text() == "qat" and (tmp_path / "a.tflite").read_text() == "qat"

    assert run(ExportConfig.of(int8="ptq", max_drop=0.5))["steps"] == []  # --int8 ptq: no remedy
    assert Backend.calls == []


def test_the_sweep_report_plots_the_first_int8_sensitivity_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from edgetl.report import _sensitivity_plot, int8_sensitivity

    rows = [{"layer": f"model.l{i}", "index": i, "macs_share": 0.25, "measured": i < 3, "rank": i + 1,
             **({"logit_error": 0.1 / (i + 1)} if i < 3 else {})} for i in range(4)]
    table = {"images": 64, "rows": rows}
    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "manifest.json").write_text(json.dumps({"quantization": None}))
    (tmp_path / "auto").mkdir()
    (tmp_path / "auto" / "manifest.json").write_text(json.dumps({"quantization": {"sensitivity": table}}))
    document = {"variants": [{"name": "fp32", "export": str(tmp_path / "fp32")},
                             {"name": "int8-auto", "export": str(tmp_path / "auto")}]}
    assert int8_sensitivity(document) == ("int8-auto", table)
    assert _sensitivity_plot(plt, "int8-auto", table).startswith(b"\x89PNG")
    assert int8_sensitivity({"variants": document["variants"][:1]}) is None
