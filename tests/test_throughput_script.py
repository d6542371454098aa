"""benchmarks/throughput.py: its cheap parts run for real at toy sizes (the figures themselves are the script's
business; here only that they are produced, positive and consistent, and that its folders are what they say)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    """The script as a module (it is not a package member)."""
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("throughput_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_reference_loop_and_gflops_write_json(throughput, tmp_path: Path) -> None:
    import torch

    out = tmp_path / "results"
    # One thread: on a busy machine two threads per process wait on each other and the run takes 10x longer.
    argv = ["--quick", "--parts", "reference", "--backbones", "mobilenet_v2:0.35", "--sizes", "32", "--batch", "8",
            "--warmup", "1", "--steps", "2", "--threads", "1", "--out", str(out)]
    if throughput.cpu_clock_ghz()[0] is None:  # a machine that states no clock: the peak needs one given
        argv += ["--clock-ghz", "2.0"]
    threads = torch.get_num_threads()
    try:
        throughput.main(argv)
    finally:
        torch.set_num_threads(threads)  # the script sets it for the whole process; later tests keep theirs

    results = json.loads((out / "throughput.json").read_text())
    assert (out / "throughput.md").read_text().startswith("# Fine-tuning throughput")
    assert (out / "throughput.png").stat().st_size > 0
    peak = results["peak_fp32"]["gflops"]
    assert peak > 0
    records = results["reference"]
    expected = ["nchw_fp32", "channels_last_fp32"] + (["channels_last_bf16"] if results["machine"]["native_bf16"]
                                                      else [])
    assert [r["variant"] for r in records] == expected
    for record in records:
        assert "error" not in record, record.get("error")
        assert record["eval_images_per_s"] > 0 and record["train_images_per_s"] > 0
        assert len(record["train_step_seconds"]) == 2
        # a training step is forward + backward: between two and three forwards' worth of FLOPs per image
        assert 2 * record["forward_flops_per_image"] < record["train_flops_per_image"]
        assert record["train_flops_per_image"] < 3.5 * record["forward_flops_per_image"]
        for figure in ("eval_achieved", "train_achieved"):
            assert 0 < record[figure]["gflops"] < peak
        conditions = record["conditions"]
        assert conditions["threads"] == 1 and conditions["cores"] >= 1 and conditions["torch"]
        assert len(conditions["load_average"]) == 3 and conditions["commit"]


def test_depthwise_gradient_flops_count_groups(throughput) -> None:
    """Each gradient of a depthwise convolution costs what its forward costs (torch's own formula says 33x)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    custom = {torch.ops.aten.convolution_backward: throughput.conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        conv(x).sum().backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert counts["aten.convolution_backward"] == 2 * counts["aten.convolution"]


def test_phone_folder_is_phone_size_jpegs_and_reused(throughput, tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    from PIL import Image

    folder = throughput.write_phone_folder(tmp_path / "phone", per_class=2, classes=1)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 2
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (4032, 3024)
    assert files[0].read_bytes() != files[1].read_bytes()
    stamps = [p.stat().st_mtime_ns for p in files]
    throughput.write_phone_folder(tmp_path / "phone", per_class=2, classes=1)
    assert [p.stat().st_mtime_ns for p in files] == stamps  # present and complete: not written again

    shrunk = throughput.write_shrunk_folder(folder, tmp_path / "shrunk", 256)
    with Image.open(next(shrunk.rglob("*.jpg"))) as image:
        assert min(image.size) == 256 and image.size[0] / image.size[1] == pytest.approx(4 / 3, abs=0.01)


def test_pairs_alternate_and_ratios_are_new_over_old(throughput) -> None:
    assert throughput.pair_order(0, ["new", "old"]) == ["new", "old"]
    assert throughput.pair_order(1, ["new", "old"]) == ["old", "new"]
    records = [{"key": "k", "repeat": 0, "side": "old", "seconds": 10.0},
               {"key": "k", "repeat": 0, "side": "new", "seconds": 5.0},
               {"key": "k", "repeat": 1, "side": "new", "seconds": 9.0},
               {"key": "k", "repeat": 1, "side": "old", "seconds": 10.0},
               {"key": "other", "repeat": 0, "side": "new", "seconds": 1.0}]
    assert throughput.ratios(records, "k", "seconds") == {"pairs": [0.5, 0.9], "median": 0.7}
