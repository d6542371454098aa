"""Activation ranges chosen per tensor, by output error and without labels.

Each activation observer fits a range its own way: the histogram observer minimises the L2 error of all
calibration values at once, so a few outlier images can stretch a range for every image; the per-image observer
follows the typical image and clips the outliers. Neither is right for every tensor. Both calibrated graphs have
the same nodes, since they come from one prepared model, so each activation's quantize/dequantize pair can take
its scale and zero point from either graph. Starting from the graph whose logits lie closer to the float model's,
each tensor in turn takes the other observer's range when that brings the logits on the calibration images closer
to the float model's (mean squared error), coordinate descent over a fixed number of tensors, those whose
candidate ranges differ most first. The bound is a count, not seconds, so the graph chosen does not depend on how
busy the machine is. Tensors that share one range (equal in every candidate graph, as a quantizer's shared specs
make them) change together.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch

# the label-free criterion every int8 choice of the torch backend is made by (and records)
CRITERION = "mean squared error of the calibration images' logits against the float model's (no labels)"

# An observer the criterion prefers is set aside when it changes the top-1 class of this many more calibration images
# than the other (at least 2, or 5% of them): a low mean squared error can hide a shift that moves most predictions
CHANGED_MARGIN = (2, 0.05)


def choose_observer(errors: dict[str, float], changed: dict[str, int], images: int) -> tuple[str, str]:
    """The activation observer for the whole graph, and why: the lowest output error (CRITERION), unless it changes
    the top-1 class of clearly more calibration images than another observer does (no labels: against the float
    model's own classes). Mean squared logit error is dominated by a few images with large logits; an observer
    whose ranges fit those can still move most of the others' predictions (MobileNetV3-Large from scratch on
    sprites-5: histogram 1.34 against 19.8, yet 57 of 64 predictions changed against 11)."""
    by_error = min(errors, key=errors.get)
    margin = max(CHANGED_MARGIN[0], math.ceil(CHANGED_MARGIN[1] * images))
    fewest = min(changed, key=lambda name: (changed[name], errors[name]))
    if changed[by_error] - changed[fewest] >= margin:
        return fewest, (f"{by_error} had the lower logit error but changed {changed[by_error]} of {images} top-1 "
                        f"classes against {changed[fewest]} (margin {margin})")
    return by_error, "lowest logit error"


QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE = torch.ops.quantized_decomposed.dequantize_per_tensor.default


def _quantize_nodes(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in graph.graph.nodes if node.op == "call_function" and node.target == QUANTIZE]


def _qparams(node: torch.fx.Node) -> tuple[float, int]:
    return float(node.args[1]), int(node.args[2])


def _set(node: torch.fx.Node, scale: float, zero_point: int) -> None:
    """The quantize node and each dequantize that reads it take (scale, zero_point)."""
    node.args = (node.args[0], scale, zero_point, *node.args[3:])
    for user in list(node.users):
        if user.op == "call_function" and user.target == DEQUANTIZE:
            user.args = (user.args[0], scale, zero_point, *user.args[3:])


def groups(candidates: dict[str, torch.fx.GraphModule]) -> list[tuple[list[int], dict[str, tuple[float, int]]]]:
    """Activation tensors that may take another candidate's range: (indices of their quantize nodes, each
    candidate's qparams). Candidates must be calibrations of one prepared graph (same quantize nodes in order)."""
    nodes = {name: _quantize_nodes(graph) for name, graph in candidates.items()}
    counts = {len(found) for found in nodes.values()}
    if len(counts) != 1:
        raise ValueError(f"the candidate graphs differ in their activation quantizers: {sorted(counts)}")
    grouped: dict[tuple, list[int]] = {}
    for index in range(counts.pop()):
        key = tuple(_qparams(found[index]) for found in nodes.values())
        grouped.setdefault(key, []).append(index)
    names = list(candidates)
    return [(indices, dict(zip(names, key, strict=True))) for key, indices in grouped.items()
            if len(set(key)) > 1]  # tensors every candidate gives the same range have no choice


def apply_choice(candidates: dict[str, torch.fx.GraphModule], base: str,
                 choice: dict[int, str]) -> torch.fx.GraphModule:
    """A copy of `candidates[base]` whose activation groups listed in `choice` (group number → candidate) take
    that candidate's range."""
    graph = copy.deepcopy(candidates[base])
    found = _quantize_nodes(graph)
    for number, (indices, qparams) in enumerate(groups(candidates)):
        if number in choice:
            for index in indices:
                _set(found[index], *qparams[choice[number]])
    graph.recompile()
    return graph


def _disparity(qparams: dict[str, tuple[float, int]]) -> float:
    """How far apart the candidates' ranges are: the ratio of the largest to the smallest scale."""
    scales = [scale for scale, _ in qparams.values()]
    return max(scales) / max(min(scales), 1e-12)


# Tensors the search tries at 128 px. Each try is one pass of the calibration images through the int8 graph; the
# earlier 60-second budget reached 16 to 41 tensors at 128 px (one thread beside other work, 2026-12-06), so 32
# costs about as much. Larger inputs try proportionally fewer (224 px: 10).
TENSORS_AT_128 = 32


def describe_search(record: dict) -> str:
    """One line for `choose_per_tensor`'s record: the error it started from is its base's, not the lowest one."""
    return (f"{record['base']} for most tensors, {sum(record['changed'].values())} of {record['tensors']} tensors "
            f"changed (logit error {record['candidates'][record['base']]:.4g} → {record['error']:.4g}, "
            f"{record['seconds']:g} s)")


def tensors_for(image_size: int) -> int:
    """How many activation groups the search tries at `image_size`: its cost in proportion to the pixels."""
    return max(4, round(TENSORS_AT_128 * (128 / image_size) ** 2))


def choose_per_tensor(candidates: dict[str, torch.fx.GraphModule], error: Callable[[torch.fx.GraphModule], float],
                      tensors: int, base: str | None = None,
                      errors: dict[str, float] | None = None) -> tuple[torch.fx.GraphModule, dict[int, str], dict]:
    """Coordinate descent over the activation groups (see the module docstring): the mixed graph, the choice
    (group number → candidate, for groups that left the base) and a record. `error(graph)` is the label-free
    output error (`errors`: the candidates' own, when the caller has them); the search tries the `tensors` groups
    whose candidates disagree most, widest first, starting from `base` (default: the candidate of lowest error)."""
    started = time.perf_counter()
    errors = errors if errors is not None else {name: error(graph) for name, graph in candidates.items()}
    base = base if base in errors else min(errors, key=errors.get)
    graph = copy.deepcopy(candidates[base])
    found = _quantize_nodes(graph)
    current = errors[base]
    choice: dict[int, str] = {}
    tried = 0
    options = groups(candidates)
    # the tensors whose candidate ranges differ most first, so a budget that runs out leaves only the small ones
    order = sorted(range(len(options)), key=lambda number: -_disparity(options[number][1]))
    for number in order[:tensors]:
        indices, qparams = options[number]
        tried += 1
        for name, values in qparams.items():
            if name == base or values == qparams[base]:
                continue
            for index in indices:
                _set(found[index], *values)
            graph.recompile()
            trial = error(graph)
            if trial < current:
                current, choice[number] = trial, name
            else:
                for index in indices:
                    _set(found[index], *qparams[choice.get(number, base)])
                graph.recompile()
    record = {
        "criterion": CRITERION,
        "candidates": {name: round(value, 6) for name, value in errors.items()},
        "base": base,
        "tensors": len(options),
        "tried": tried,
        "bound": f"at most {tensors} tensors, widest disagreement first",
        "changed": {name: sum(1 for chosen in choice.values() if chosen == name) for name in candidates
                    if name != base},
        "error": round(current, 6),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return graph, choice, record
