"""Label-free int8 remedies of the torch backend: cross-layer equalization with bias absorption (exact on the
calibration images, ReLU6 included), and activation ranges chosen per tensor by output error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgetl.backends.torch.equalize import RELU6_CLIP, _column_range, _row_range, equalize, find_pairs
from edgetl.backends.torch.models import build_model, to_int8_form
from edgetl.backends.torch.quantize import fold_batchnorm


class Separable(nn.Module):
    """expand 1×1 → ReLU6 → depthwise 3×3 → ReLU → project 1×1, plus a residual read of the input, on NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1)
        self.act6 = nn.ReLU6()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.ReLU()
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act(self.depthwise(self.act6(self.expand(x)))))


def _separable() -> tuple[Separable, torch.Tensor]:
    torch.manual_seed(0)
    model = Separable().eval()
    with torch.no_grad():
        model.expand.weight.mul_(torch.tensor([0.02, 0.05, 1, 2, 4, 8, 0.5, 0.1]).view(-1, 1, 1, 1))
        model.expand.bias.copy_(torch.tensor([0.5, 0.2, 0.0, 1.0, 2.0, 0.0, 0.3, 0.1]))
        model.depthwise.weight.mul_(torch.tensor([30, 10, 1, 0.5, 0.2, 0.05, 3, 8]).view(-1, 1, 1, 1))
        model.depthwise.bias.copy_(torch.tensor([4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 2.0, 5.0]))
    return model, torch.randn(64, 4, 12, 12) * 2


def test_pairs_follow_the_separable_blocks_of_every_backbone() -> None:
    """Expand → depthwise and depthwise → projection of each block (and the stem → first depthwise when the first
    block has no expansion); a conv whose output something else reads too, or a hardswish, is never a pair."""
    counts = {}
    for backbone in ("mobilenet_v2", "efficientnet_lite0", "mobilenet_v3_small"):
        model = build_model(backbone, 1.0, 5).eval()
        example = torch.zeros(1, 3, 32, 32)
        counts[backbone] = len(find_pairs(to_int8_form(fold_batchnorm(model, example)), example))
    # MobileNetV2: the stem feeds block 1's depthwise, block 1 has no expansion, 16 blocks with two pairs each
    assert counts["mobilenet_v2"] == 1 + 1 + 16 * 2
    assert counts["efficientnet_lite0"] == 1 + 1 + 15 * 2
    # MobileNetV3-Small: the two ReLU blocks without squeeze-excite, and every squeeze-excite's fc1 → ReLU → fc2
    # (9 of them); hardswish is no pair, and block 1's depthwise output feeds its squeeze-excite
    assert counts["mobilenet_v3_small"] == 2 * 2 + 9
    model, images = _separable()
    pairs = find_pairs(model, images[:2])
    assert [(a, kind, b) for a, kind, b in pairs] == [(model.expand, "relu6", model.depthwise),
                                                      (model.depthwise, "relu", model.project)]


def test_equalization_is_exact_and_equalizes_what_it_may() -> None:
    model, images = _separable()
    with torch.no_grad():
        reference = model(images)
        pre = model.expand(images)
    equalized, record = equalize(model, images)
    with torch.no_grad():
        moved = (equalized(images) - reference).abs().max()
    assert float(moved) < 1e-4 * float(reference.abs().max())
    assert record["pairs"] == 2 and record["relu6_pairs"] == 1
    assert record["logit_max_abs_change"] == pytest.approx(float(moved), rel=0.01, abs=1e-9)
    # depthwise → ReLU → projection is scale-invariant: both convs' ranges end equal per channel
    assert torch.allclose(_row_range(equalized.depthwise), _column_range(equalized.project), rtol=1e-4)
    # a ReLU6 channel that reaches 6 on the calibration images keeps its scale (its clip would move otherwise)
    clipping = pre.amax(dim=(0, 2, 3)) > RELU6_CLIP
    assert bool(clipping.any()) and bool((~clipping).any())
    ratio = (equalized.expand.weight / model.expand.weight).flatten(1).mean(dim=1)
    assert torch.allclose(ratio[clipping], torch.ones(int(clipping.sum())))
    assert not torch.allclose(ratio[~clipping], torch.ones(int((~clipping).sum())))
    # bias absorption: channels the ReLU never cuts at 0 lose that floor into the projection's bias
    assert record["absorbed_channels"] > 0
    with torch.no_grad():
        floor = equalized.depthwise(equalized.act6(equalized.expand(images))).amin(dim=(0, 2, 3))
    assert float(floor.clamp_min(0).max()) < 1e-4  # no channel keeps a positive floor


def test_equalization_leaves_the_float_model_of_a_real_backbone_unchanged() -> None:
    """MobileNetV2 with BatchNorm statistics that make activations reach ReLU6's clip: the rule keeps the logits."""
    torch.manual_seed(1)
    model = build_model("mobilenet_v2", 0.35, 5).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 3.0)
            module.bias.data.uniform_(-1.0, 2.0)
    with torch.no_grad():
        model.classifier[1].weight.normal_(0, 1.0)
    images = torch.randn(32, 3, 32, 32)
    folded = to_int8_form(fold_batchnorm(model, images[:1]))
    equalized, record = equalize(folded, images)
    with torch.no_grad():
        before, after = folded(images), equalized(images)
    assert record["pairs"] == 34 and 0 < record["rescaled_channels"] < record["channels"]
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-4 * float(before.abs().max()))


def test_ranges_chosen_per_tensor_never_raise_the_output_error() -> None:
    """Two calibrations of one prepared graph: the per-tensor mix is no worse than the better of them on the
    label-free criterion, and `apply_choice` rebuilds exactly the graph the search chose."""
    from edgetl.backends.torch import export as graphs_of
    from edgetl.backends.torch.ranges import apply_choice, choose_per_tensor, groups, tensors_for

    torch.manual_seed(0)
    model = graphs_of.ChannelsLastInput(build_model("mobilenet_v3_small", 1.0, 5).eval()).eval()
    with torch.no_grad():
        model.model.classifier[3].weight.normal_(0, 1.0)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (24, 32, 32, 3)).astype(np.float32)
    images[:2] *= 8  # two outlier images: the histogram and per-image ranges part on some tensors
    example = torch.zeros(1, 32, 32, 3)
    candidates = {name: graphs_of.quantize_ptq_graph(model, example, images, activations=name)[0]
                  for name in ("histogram", "per-image")}
    reference = graphs_of.logits(model, images)

    def error(graph) -> float:
        return float(np.mean((graphs_of.logits(graph, images) - reference) ** 2))

    options = groups(candidates)
    assert options and all(len(set(qparams.values())) == 2 for _, qparams in options)
    mixed, choice, record = choose_per_tensor(candidates, error, tensors=len(options))
    assert record["tried"] == record["tensors"] == len(options)
    assert record["error"] <= min(record["candidates"].values())
    assert error(mixed) == pytest.approx(record["error"], rel=1e-6)
    rebuilt = apply_choice(candidates, record["base"], choice)
    assert np.array_equal(graphs_of.logits(rebuilt, images), graphs_of.logits(mixed, images))
    _, _, cut_short = choose_per_tensor(candidates, error, tensors=0)
    assert cut_short["tried"] == 0 and cut_short["error"] == min(cut_short["candidates"].values())
    # bounded by a count, not by seconds: the same call chooses the same graph however busy the machine is
    _, first_choice, first = choose_per_tensor(candidates, error, tensors=1)
    _, again_choice, again = choose_per_tensor(candidates, error, tensors=1)
    assert first["tried"] == again["tried"] == 1 and first_choice == again_choice and first["error"] == again["error"]
    assert tensors_for(128) == 32 and tensors_for(224) == 10 and tensors_for(32) == 512 and tensors_for(1024) == 4
    # the search starts from the observer the whole graph was given, even where the other has the lower error
    worse = max(record["candidates"], key=record["candidates"].get)
    _, _, from_worse = choose_per_tensor(candidates, error, tensors=0, base=worse)
    assert from_worse["base"] == worse and from_worse["error"] == from_worse["candidates"][worse]


def test_the_percentile_observer_leaves_out_the_few_values_far_outside_the_rest() -> None:
    """Two batches: ordinary values, then the same with a handful of values 100x larger (an outlier image's). The
    histogram's range reaches them; the percentile observer's stays with the bulk, and its range is the pooled
    quantiles of everything observed (the sample of a large tensor is seeded: the same calls give the same range)."""
    from torchao.quantization.pt2e import HistogramObserver

    from edgetl.backends.torch.quantize import PERCENTILE_TAIL, PercentileObserver

    torch.manual_seed(0)
    ordinary = torch.randn(4, 16, 32, 32)
    outlying = ordinary.clone()
    outlying.view(-1)[:5] = 400.0  # 5 of the 131,072 values observed: under the 0.01% tail
    ranges = []
    for observer in (PercentileObserver(eps=2**-12), HistogramObserver(eps=2**-12), PercentileObserver(eps=2**-12)):
        observer(ordinary)
        observer(outlying)
        scale, _ = observer.calculate_qparams()
        ranges.append(float(scale) * 255)
    pooled = torch.cat([ordinary.flatten(), outlying.flatten()])
    expected = float(torch.quantile(pooled, 1 - PERCENTILE_TAIL) - torch.quantile(pooled, PERCENTILE_TAIL))
    assert ranges[0] == pytest.approx(expected, rel=1e-3) and ranges[0] < 12  # the bulk: about ±4.4
    assert ranges[1] > 50  # the histogram's range reaches toward the outliers
    assert ranges[0] == ranges[2]


def test_the_observer_with_the_lower_logit_error_is_set_aside_when_it_moves_more_predictions() -> None:
    """Mean squared logit error is dominated by a few images with large logits; an observer that fits them can move
    most other predictions. Measured on MobileNetV3-Large from scratch on sprites-5 (64 calibration images): histogram
    1.337 with 57 top-1 classes changed, per-image min/max 19.81 with 11; on the test images 15% and 81% agreement."""
    from edgetl.backends.torch.ranges import choose_observer

    chosen, why = choose_observer({"histogram": 1.337, "per-image": 19.81}, {"histogram": 57, "per-image": 11}, 64)
    assert chosen == "per-image" and "histogram had the lower logit error but changed 57 of 64" in why
    # near ties stay with the lower error: the margin is 2 images, or 5% of them (4 of 64)
    assert choose_observer({"histogram": 0.1, "per-image": 0.2}, {"histogram": 4, "per-image": 1}, 64)[0] == "histogram"
    assert choose_observer({"histogram": 0.1, "per-image": 0.2}, {"histogram": 5, "per-image": 1}, 64)[0] == "per-image"
    assert choose_observer({"histogram": 0.1, "per-image": 0.2}, {"histogram": 2, "per-image": 1}, 10)[0] == "histogram"
    assert choose_observer({"histogram": 0.1, "per-image": 0.2}, {"histogram": 3, "per-image": 1}, 10)[0] == "per-image"
    assert choose_observer({"histogram": 0.3, "per-image": 0.2}, {"histogram": 0, "per-image": 9}, 64)[0] == \
        "histogram"  # either way round
    assert choose_observer({"histogram": 0.3, "per-image": 0.2}, {"histogram": 3, "per-image": 3}, 64) == \
        ("per-image", "lowest logit error")


def test_a_second_calibration_reuses_the_learned_rounding_and_says_so() -> None:
    """With ranges chosen per tensor, every later remedy calibrates twice; the second call reuses the first's
    learned rounding (no `rounded_layers`) and still records how many layers it learned."""
    from edgetl.backends.torch import export as graphs_of

    torch.manual_seed(0)
    model = graphs_of.ChannelsLastInput(build_model("mobilenet_v3_small", 1.0, 5).eval()).eval()
    images = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    example = torch.zeros(1, 32, 32, 3)
    first, info = graphs_of.quantize_ptq_graph(model, example, images, rounded_layers=["model.features.0.0"],
                                               rounding_iterations=4)
    again, reused = graphs_of.quantize_ptq_graph(model, example, images, rounded=info["_rounded"],
                                                 activations="per-image")
    assert "learned rounding on 1 layer(s)" in info["weights"] and "learned rounding on 1 layer(s)" in reused["weights"]
    assert reused["learned_rounding"] == info["learned_rounding"] and reused["method"] == "pt2e-ptq+adaround"


def test_the_ranges_line_starts_from_the_base_it_searched_from() -> None:
    """Measured record (MobileNetV3-Large, sprites-5): the search started from per-image min/max, chosen for its
    top-1 changes, not from histogram's lower error; the line once read "1.836 → 19.42", a rise that never was."""
    from edgetl.backends.torch.ranges import describe_search

    record = {"base": "per-image", "candidates": {"histogram": 1.836162, "per-image": 19.991596,
                                                  "percentile": 12.557465},
              "changed": {"histogram": 4, "percentile": 6}, "tensors": 125, "error": 19.418036, "seconds": 115.3}
    assert describe_search(record) == ("per-image for most tensors, 10 of 125 tensors changed "
                                       "(logit error 19.99 → 19.42, 115.3 s)")
