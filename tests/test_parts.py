"""`edgetl export --parts`: the graph a .pte is lowered from, cut into its network blocks. The cut is faithful
(the parts chained give the whole's output bit for bit, int8 and fp32, on every backbone family), each part keeps
the whole's weights and scales, MACs add up, and a part lowered on its own runs in the ExecuTorch runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from edgetl.backends.torch import parts as graph_parts  # noqa: E402
from edgetl.backends.torch.export import ChannelsLastInput, lower_pte, quantize_ptq_graph  # noqa: E402
from edgetl.backends.torch.models import build_model  # noqa: E402
from edgetl.backends.torch.sensitivity import macs_per_image  # noqa: E402

SIZE = 32


def _model(backbone: str, width: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return ChannelsLastInput(build_model(backbone, width, num_classes=3)).eval()


def _chain(parts: list[graph_parts.GraphPart], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for part in parts:
            x = part.module(x)
    return x


@pytest.mark.torch
@pytest.mark.parametrize(("backbone", "width", "blocks", "stem", "head"), [
    ("mobilenet_v2", 0.35, 17, "features.0", "features.18+classifier.1"),
    ("efficientnet_lite0", 1.0, 16, "stem", "head"),
    ("mobilenet_v3_small", 1.0, 11, "features.0", "features.12+classifier.0+classifier.3"),
])
def test_the_blocks_chained_give_the_whole_bit_for_bit(backbone: str, width: float, blocks: int, stem: str,
                                                       head: str) -> None:
    model = _model(backbone, width)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32))
    calibration = np.random.default_rng(2).uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32)
    int8, _ = quantize_ptq_graph(model, torch.zeros(1, SIZE, SIZE, 3), calibration)
    fp32 = torch.export.export(model, (x,)).module()
    for graph in (int8, fp32):
        parts = graph_parts.build(graph, x)
        names = [p.name for p in parts]
        assert [p.role for p in parts] == ["stem", *["block"] * blocks, "head"], names
        assert names[0] == stem and names[-1] == head
        with torch.no_grad():
            assert torch.equal(_chain(parts, x), graph(x))  # every cut requantizes exactly
        assert sum(p.macs for p in parts) == sum(macs_per_image(model, x).values())
        for part in parts[1:]:  # a cut crosses as NHWC, the layout XNNPACK computes in
            assert all(t.dim() != 4 or t.shape[-1] < t.shape[1] or t.shape[1] == t.shape[2] for t in part.inputs)


@pytest.mark.torch
def test_a_block_lowered_alone_runs_in_executorch_like_the_graph(tmp_path: Path) -> None:
    from edgetl import formats

    model = _model("mobilenet_v2", 0.35)
    calibration = np.random.default_rng(2).uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32)
    int8, _ = quantize_ptq_graph(model, torch.zeros(1, SIZE, SIZE, 3), calibration)
    parts = graph_parts.build(int8, torch.from_numpy(calibration[:1]))
    block = parts[3]  # features.3: a residual block, int8 in and out of XNNPACK
    payload, delegation = lower_pte(block.module, block.inputs)
    assert delegation["subgraphs"] == 1 and not delegation["compute_ops_outside"]
    path = tmp_path / "block.pte"
    path.write_bytes(payload)
    x = block.inputs[0].numpy()
    with torch.no_grad():
        expected = block.module(*block.inputs).numpy()
    got = formats.run(path, x).reshape(expected.shape)
    step = float(np.abs(expected).max()) / 100  # int8 kernels against the Q/DQ reference: within a few levels
    assert np.abs(got - expected).max() <= 3 * step


def test_a_graph_without_blocks_cannot_be_cut() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    graph = torch.export.export(model, (torch.zeros(1, 3, 8, 8),)).module()
    with pytest.raises(ValueError, match="no inverted-residual block"):
        graph_parts.split(graph)
