"""MobileNetV4: timm's names, shapes and function, and weights from the Hugging Face Hub cache, offline.

The reference is timm's own code when it imports; otherwise `tests/reference/timm_mobilenet_v4.json`, produced
from timm 1.0.31's source by `tests/reference/timm_mobilenet_v4.py` (the command is in its docstring).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from edgetl.backbones import BACKBONES, HubSource, get_backbone, parse_hub_weights
from edgetl.backends.torch.models import build_model
from edgetl.backends.torch.weights import apply_weights
from edgetl.errors import UserError
from tests.conftest import run_cli

pytestmark = pytest.mark.torch

REFERENCE_DIR = Path(__file__).parent / "reference"
REFERENCE = json.loads((REFERENCE_DIR / "timm_mobilenet_v4.json").read_text())
TIMM_NAMES = {"mobilenet_v4_conv_small": "mobilenetv4_conv_small",
              "mobilenet_v4_conv_medium": "mobilenetv4_conv_medium"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot a test's hub cache holds


def _reference_maker():
    spec = importlib.util.spec_from_file_location("timm_reference", REFERENCE_DIR / "timm_mobilenet_v4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timm_names_and_shapes(timm_name: str) -> dict[str, list[int]]:
    """timm's own model when timm imports here; the file produced from timm's source otherwise."""
    try:
        import timm
    except ImportError:  # timm needs torchvision, which does not import beside the pinned torch
        return REFERENCE["models"][timm_name]["state_dict"]
    return {k: list(v.shape) for k, v in timm.create_model(timm_name, pretrained=False).state_dict().items()}


@pytest.mark.parametrize("backbone", sorted(TIMM_NAMES))
def test_state_dict_names_and_shapes_equal_timms(backbone: str) -> None:
    ours = {k: list(v.shape) for k, v in build_model(backbone).state_dict().items()}
    theirs = _timm_names_and_shapes(TIMM_NAMES[backbone])
    assert list(ours) == list(theirs)  # the same names in the same order
    assert ours == theirs
    values = sum(v.numel() for k, v in build_model(backbone).state_dict().items() if "num_batches" not in k)
    assert values == {"mobilenet_v4_conv_small": 3_799_112, "mobilenet_v4_conv_medium": 9_783_416}[backbone]


@pytest.mark.parametrize("backbone", sorted(TIMM_NAMES))
def test_seeded_weights_give_timms_logits(backbone: str) -> None:
    """Names and shapes could match a different function; the same seeded weights must give timm's logits."""
    maker = _reference_maker()
    reference = REFERENCE["models"][TIMM_NAMES[backbone]]
    model = build_model(backbone).eval()
    model.load_state_dict(maker.seeded_state(model.state_dict(), REFERENCE["seed"]), strict=True)
    with torch.no_grad():
        logits = model(maker.seeded_input(REFERENCE["forward_side"], REFERENCE["seed"]))[0]
    expected = torch.tensor(reference["logits"])
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4), float((logits - expected).abs().max())
    assert int(logits.argmax()) == int(expected.argmax())


def test_the_registry_records_timms_repository_and_preprocessing() -> None:
    for backbone, timm_name in TIMM_NAMES.items():
        spec, reference = get_backbone(backbone), REFERENCE["models"][timm_name]
        assert spec.torch_weights[1.0] == HubSource(reference["hf_hub_id"])
        assert list(spec.mean) == pytest.approx(reference["mean"]) and list(spec.std) == pytest.approx(reference["std"])
        assert spec.default_image_size == reference["input_size"][-1]
        assert spec.keras is None  # torch-only
    with pytest.raises(UserError, match="valid: 1"):
        BACKBONES["mobilenet_v4_conv_small"].check_width(0.5)


def test_int8_form_leaves_mobilenet_v4_unchanged() -> None:
    """Nothing in it needs rewriting for int8: no hard-swish, no squeeze-excite, only ReLU, BatchNorm, conv, add."""
    model = build_model("mobilenet_v4_conv_small", num_classes=3)
    kinds = {type(m).__name__ for m in model.modules() if not list(m.children())}
    assert kinds == {"Conv2d", "BatchNorm2d", "ReLU", "Identity", "Dropout", "Linear"}


def make_hub_cache(home: Path, repo_id: str, state: dict[str, torch.Tensor], commit: str = COMMIT,
                   ref: str = "main") -> Path:
    """The layout huggingface_hub's cache has after a download: the file as a blob named by its hash, a snapshot
    of the commit linking to it, and the branch's ref naming the commit."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    home.mkdir(parents=True, exist_ok=True)
    staging = home / "staging.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(staging))
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    blob = repo / "blobs" / digest
    staging.replace(blob)
    snapshot = repo / "snapshots" / commit / "model.safetensors"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline, for this process (huggingface_hub read its settings at import)."""
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_imagenet_weights_of_mobilenet_v4_load_from_the_hub_cache(hub_home: Path) -> None:
    published = build_model("mobilenet_v4_conv_small")
    torch.nn.init.normal_(published.conv_stem.weight)
    repo_id = get_backbone("mobilenet_v4_conv_small").torch_weights[1.0].repo_id
    snapshot = make_hub_cache(hub_home, repo_id, published.state_dict())
    model = build_model("mobilenet_v4_conv_small")
    record = apply_weights(model, get_backbone("mobilenet_v4_conv_small"), 1.0, "imagenet")
    assert torch.equal(model.conv_stem.weight, published.conv_stem.weight)
    assert record["kind"] == "imagenet" and record["repository"] == repo_id
    assert record["revision"] == COMMIT and record["revision_requested"] == "main"
    assert record["sha256"] == hashlib.sha256(snapshot.resolve().read_bytes()).hexdigest()
    assert record["source"].startswith("Hugging Face Hub cache (") and str(hub_home) in record["source"]
    assert record["tensors_loaded"] == len(published.state_dict())


def test_hf_hub_weights_work_for_any_backbone_whose_names_match(hub_home: Path) -> None:
    published = build_model("mobilenet_v2", 0.5, num_classes=7)  # another head: replaced, not refused
    make_hub_cache(hub_home, "someone/mv2-half", published.state_dict(), commit="c" * 40, ref="v1")
    model = build_model("mobilenet_v2", 0.5)
    record = apply_weights(model, get_backbone("mobilenet_v2"), 0.5, "hf-hub:someone/mv2-half@v1")
    assert record["kind"] == "hf-hub" and record["revision"] == "c" * 40 and record["revision_requested"] == "v1"
    assert torch.equal(model.features[0][0].weight, published.features[0][0].weight)
    # the same snapshot by its commit
    by_commit = apply_weights(build_model("mobilenet_v2", 0.5), get_backbone("mobilenet_v2"), 0.5,
                              "hf-hub:someone/mv2-half@" + "c" * 40)
    assert by_commit["sha256"] == record["sha256"]


def test_missing_hub_file_offline_names_the_repository_the_cache_and_the_command(hub_home: Path) -> None:
    with pytest.raises(UserError) as caught:
        apply_weights(build_model("mobilenet_v4_conv_small"), get_backbone("mobilenet_v4_conv_small"), 1.0, "imagenet")
    line = str(caught.value)
    assert "\n" not in line
    assert "timm/mobilenetv4_conv_small.e2400_r224_in1k@main" in line
    assert str(hub_home / "hub") in line
    assert "hf download timm/mobilenetv4_conv_small.e2400_r224_in1k model.safetensors" in line
    make_hub_cache(hub_home, "someone/mv4", build_model("mobilenet_v4_conv_small").state_dict())
    with pytest.raises(UserError, match=r"someone/mv4@v2 is not in the Hugging Face Hub cache.*--revision v2"):
        apply_weights(build_model("mobilenet_v4_conv_small"), get_backbone("mobilenet_v4_conv_small"), 1.0,
                      "hf-hub:someone/mv4@v2")


def test_a_file_that_does_not_fit_lists_its_first_three_mismatches(hub_home: Path) -> None:
    state = build_model("mobilenet_v4_conv_small").state_dict()
    state["blocks.2.0.pw_exp.conv.weight"] = torch.zeros(8, 64, 1, 1)
    del state["conv_head.weight"]
    state["extra.weight"] = torch.zeros(1)
    make_hub_cache(hub_home, "someone/bad", state)
    with pytest.raises(UserError) as caught:
        apply_weights(build_model("mobilenet_v4_conv_small"), get_backbone("mobilenet_v4_conv_small"), 1.0,
                      "hf-hub:someone/bad")
    line = str(caught.value)
    assert "3 mismatched tensors" in line and "\n" not in line
    assert "conv_head.weight missing" in line and "extra.weight unexpected" in line
    assert "blocks.2.0.pw_exp.conv.weight (8, 64, 1, 1) where the model has (192, 64, 1, 1)" in line


@pytest.mark.parametrize("value", ["hf-hub:timm", "hf-hub:a//b", "hf-hub:a/b--c", "hf-hub:a/b@", "hf-hub:-a/b"])
def test_malformed_hub_ids_are_refused_before_any_work(value: str) -> None:
    with pytest.raises(UserError, match="valid: "):
        parse_hub_weights(value)


def test_cli_refuses_bad_mobilenet_v4_weights_in_one_line(tmp_path: Path) -> None:
    """The conftest's environment: HF_HOME in the test's folder, empty, and HF_HUB_OFFLINE=1."""
    cases = [
        (["--weights", "imagenet"], ["timm/mobilenetv4_conv_small.e2400_r224_in1k", str(tmp_path / "hf" / "hub"),
                                     "hf download"]),
        (["--weights", "hf-hub:timm/x..y"], ["is not a Hugging Face Hub repository id", "hf-hub:OWNER/NAME"]),
        (["--width", "0.75"], ["width 0.75 is not available for mobilenet_v4_conv_small; valid: 1"]),
        (["--weights", "hf-hub:a/b", "--framework", "keras", "--backbone", "mobilenet_v2"],
         ["valid: --framework torch"]),
    ]
    for extra, words in cases:
        extra = extra if "--backbone" in extra else [*extra, "--backbone", "mobilenet_v4_conv_small"]
        done = run_cli("finetune", "--data", "builtin:shapes", "--out", str(tmp_path / "run"), *extra)
        assert done.returncode == 2, (extra, done.stderr[-2000:])
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        for word in words:
            assert word in " ".join(lines), (word, lines)
        assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.slow  # 40-80 s: two int8 conversions of the whole network
def test_int8_files_are_int8_throughout_in_one_partition_and_name_their_blocks(tmp_path: Path) -> None:
    """The goals of a MobileNetV4 int8 file: no float operator between the .tflite's int8 input and output, one
    XNNPACK partition in the .pte, and a per-block breakdown that names timm's blocks."""
    pytest.importorskip("executorch")
    from ai_edge_litert import schema_py_generated as schema

    from edgetl import breakdown
    from edgetl.backends.torch.export import ChannelsLastInput, convert_tflite, lower_pte, quantize_ptq_graph
    from tests.test_int8_form import _tflite_ops

    torch.manual_seed(0)
    model = build_model("mobilenet_v4_conv_small", num_classes=4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # statistics as after training, not the identity
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    side = 64
    calibration = torch.rand(16, side, side, 3).numpy() * 2 - 1
    example = torch.zeros(1, side, side, 3)
    graph, _ = quantize_ptq_graph(ChannelsLastInput(model).eval(), example, calibration)
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(convert_tflite(graph, example, quantized=True))
    ops = _tflite_ops(tflite.read_bytes())
    assert [name for name, kind in ops if kind == schema.TensorType.FLOAT32] == []
    assert not any(name in ("DEQUANTIZE", "QUANTIZE", "TRANSPOSE") for name, _ in ops), ops
    _, delegation = lower_pte(graph, example)
    assert delegation["subgraphs"] == 1 and delegation["compute_ops_outside"] == []

    parts = breakdown.tflite_parts(tflite)
    blocks = [part.name for part in parts if part.role == "block"]
    expected = [f"blocks.{stage}.{index}" for stage, count in enumerate((2, 2, 6, 6, 1)) for index in range(count)]
    assert blocks == expected
    assert parts[0].role == "stem" and parts[-1].role == "head" and parts[-1].last_op == len(ops) - 1


def test_breakdown_reads_timms_nested_block_names_from_tensor_names() -> None:
    """Tensor names as litert-torch writes them for MobileNetV4 (stage Sequential inside `blocks`), and the
    single-level names of the other backbones, give the block each operator belongs to."""
    from edgetl.breakdown import _block_of

    root = "edgetl.backends.torch.export.ChannelsLastInput/edgetl.backends.torch.mobilenet_v4.MobileNetV4_model/"
    seq = "torch.nn.modules.container.Sequential"
    uir = root + f"{seq}_blocks/{seq}_2/edgetl.backends.torch.mobilenet_v4.UniversalInvertedResidual_3/"
    assert _block_of([uir + "edgetl.backends.torch.mobilenet_v4.ConvNorm_pw_exp/torch.nn.modules.conv.Conv2d_conv;1"]) \
        == ("blocks.2.3", "UniversalInvertedResidual")
    assert _block_of([root + f"{seq}_blocks/{seq}_0/edgetl.backends.torch.mobilenet_v4.ConvBnAct_1/"
                      "torch.nn.modules.activation.ReLU_act;;x"]) == ("blocks.0.1", "ConvBnAct")
    assert _block_of([root + "torch.nn.modules.conv.Conv2d_conv_stem;1"]) is None  # the stem: no block
    assert _block_of(["serving_default_output_0_output"]) is None
    v2 = ("edgetl.backends.torch.export.ChannelsLastInput/edgetl.backends.torch.models.MobileNetV2_model/"
          f"{seq}_features/edgetl.backends.torch.models.InvertedResidualV2_3/{seq}_conv/x.ConvNormAct_0/y.Conv2d_0;1")
    assert _block_of([v2]) == ("features.3", "InvertedResidualV2")
    lite = ("edgetl.backends.torch.export.ChannelsLastInput/edgetl.backends.torch.models.EfficientNetLite0_model/"
            f"{seq}__blocks/edgetl.backends.torch.models.MBConvLite_5/torch.nn.modules.conv.Conv2d__expand_conv;1")
    assert _block_of([lite]) == ("_blocks.5", "MBConvLite")
    head = ("edgetl.backends.torch.export.ChannelsLastInput/edgetl.backends.torch.models.MobileNetV3_model/"
            f"{seq}_classifier/torch.nn.modules.linear.Linear_3;1")
    assert _block_of([head]) == ("classifier.3", "Linear")


def test_one_flag_fine_tunes_from_the_hub_cache_and_says_where_the_file_came_from(tmp_path: Path) -> None:
    """The real CLI, offline: `--weights imagenet` on a MobileNetV4 finds timm's file in the Hub cache (the
    conftest's HF_HOME), prints its path and records repository, revision and sha256 in the checkpoint."""
    repo_id = get_backbone("mobilenet_v4_conv_small").torch_weights[1.0].repo_id
    snapshot = make_hub_cache(Path(os.environ["HF_HOME"]), repo_id, build_model("mobilenet_v4_conv_small").state_dict())
    done = run_cli("finetune", "--data", "builtin:shapes", "--backbone", "mobilenet_v4_conv_small",
                   "--image-size", "32", "--epochs-finetune", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"weights: Hugging Face Hub cache ({snapshot})" in (done.stdout + done.stderr).replace("\n", "")
    init = json.loads((tmp_path / "run" / "checkpoint" / "manifest.json").read_text())["init_weights"]
    assert init["repository"] == repo_id and init["revision"] == COMMIT and init["tensors_loaded"] == 278
    assert init["sha256"] == hashlib.sha256(snapshot.resolve().read_bytes()).hexdigest()
