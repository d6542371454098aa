"""Pruning for the torch backend: channels removed for real (speed), or weights zeroed (size).

- `channels`: torch-pruning's dependency graph groups every layer that shares a channel dimension (the
  expand conv, the depthwise conv that must keep one filter per channel, their BatchNorms, the project conv's
  inputs; across a stage, every block joined by residual adds), and removes the lowest-L2 groups: a fraction R
  of each group's channels. The classifier's outputs (the labels), the image input, the stem and the first
  block stay. Right after pruning the network is at chance (measured at 10–50%), so the "recovery" rebuilds it:
  BatchNorm statistics re-estimated, then a fine-tune distilled from the dense model (its soft targets carry
  far more than 2700 labels) with BatchNorm trained in batch mode, and its statistics re-estimated again.
- `magnitude`: `torch.nn.utils.prune` zeroes the smallest weights of every conv / linear layer except the
  depthwise ones (few weights, each one a whole spatial filter), rising on a cubic schedule (Zhu & Gupta 2017)
  to the target during the recovery fine-tune; `prune.remove` makes the zeros permanent. Shapes and speed do
  not change; zeros survive symmetric int8 (zero-point 0), so the gain shows in gzip size.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from edgetl import data
from edgetl.backends.torch.finetune import BN_ESTIMATE_IMAGES, ImageRecords, _loader, estimate_batchnorm_statistics
from edgetl.backends.torch.recovery import Tune, fit
from edgetl.ui import console

PRUNED_MODEL_FILE = "pruned_model.pt"
SCHEDULE_END = 0.75  # magnitude: the target is reached after 75% of the steps; the rest recovers with the mask fixed
SCHEDULE_UPDATES = 16
KEEP_FIRST_STAGES = 2  # channels: the stem and the first block keep every channel (`_kept_layers`)


def _block_of(name: str, containers: set[str]) -> str:
    """`_blocks.3._expand_conv` → `_blocks.3`, `features.4.conv.0.0` → `features.4`, `_fc` → `_fc`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in containers and len(parts) > 1 else parts[0]


def block_costs(model: nn.Module, example: torch.Tensor) -> dict[str, dict[str, int]]:
    """Parameters and multiply-accumulates of every conv / linear layer, summed per top-level block.

    MACs of a conv: output elements × (input channels / groups) × kernel area; of a linear layer: output
    elements × input features. One forward pass of `example` (batch 1) measures the output sizes.
    """
    containers = {name for name, child in model.named_children() if isinstance(child, nn.Sequential | nn.ModuleList)}
    costs: dict[str, dict[str, int]] = {}
    hooks = []

    def add(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        entry = costs.setdefault(_block_of(name, containers), {"params": 0, "macs": 0})
        entry["macs"] += int(output[0].numel()) * per_output

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: add(name, m, o)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    for name, parameter in model.named_parameters():
        costs.setdefault(_block_of(name, containers), {"params": 0, "macs": 0})["params"] += parameter.numel()
    return costs


def _totals(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"macs": int(macs), "params": int(params)}


def _output_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The layer(s) whose outputs are the labels: never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _kept_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers channel pruning leaves whole: the classifier's outputs, and the convs of the stem and first block.

    The first two stages work at the highest resolution on 16–32 channels: they hold ~5% of the MACs and few
    parameters, but every later layer sees the world through them, and their weights are the ones int8 rounding
    hurts most (docs/HISTORY.md, "A second checkpoint"). Measured on the demo model, channels:0.5 with them
    pruned: float 86.0%, int8 84.4%; with them kept: float 87.0%, int8 85.9% (dense int8 86.8%).
    """
    kept = _output_layers(model, num_classes)
    stages = model.stages() if hasattr(model, "stages") else []
    for stage in stages[:KEEP_FIRST_STAGES]:
        kept += [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return kept


def _estimate_bn(model: nn.Module, listing: data.DatasetListing, spec: dict, tune: Tune) -> int:
    loader = _loader(ImageRecords(listing.root, listing.splits["train"], spec), tune.batch_size, 0, True, tune.seed)
    return estimate_batchnorm_statistics(model, loader, torch.device("cpu"), BN_ESTIMATE_IMAGES)


def prune_channels(
    model: nn.Module, ratio: float, num_classes: int, listing: data.DatasetListing, spec: dict, tune: Tune,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, dict]:
    """Remove a fraction `ratio` of the channels of every prunable group, re-estimate BN, recover; in place.

    `teacher` (the dense model) supplies soft targets to the recovery when `tune.distill` > 0."""
    size = spec["resize"]["height"]
    example = torch.zeros(1, 3, size, size)
    model.eval()
    before_blocks, before = block_costs(model, example), _totals(model, example)
    started = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=_kept_layers(model, num_classes),
        round_to=8,  # XNNPACK's int8 kernels work on channel tiles; odd counts waste lanes
    )
    pruner.step()
    prune_seconds = time.perf_counter() - started
    with torch.no_grad():
        out = model(example)
    if out.shape != (1, num_classes):
        raise RuntimeError(f"channel pruning broke the model: output {tuple(out.shape)}, expected (1, {num_classes})")
    bn_images = _estimate_bn(model, listing, spec, tune)
    console.print(f"channels: {ratio:.0%} pruned in {prune_seconds:.1f} s; recovery fine-tune ({tune.epochs} epochs)…")
    recovery = (fit(model, listing, spec, tune, "recovery fine-tune (channels)", teacher=teacher)
                if tune.epochs else None)
    if recovery is not None and tune.train_batchnorm:  # batch-mode training leaves lagging running statistics
        recovery["batchnorm_statistics_from_images"] = _estimate_bn(model, listing, spec, tune)
    after_blocks, after = block_costs(model, example), _totals(model, example)
    blocks = []
    for name, cost in before_blocks.items():
        now = after_blocks.get(name, {"params": 0, "macs": 0})
        blocks.append({"block": name, "params_before": cost["params"], "params_after": now["params"],
                       "macs_before": cost["macs"], "macs_after": now["macs"]})
    info = {
        "method": "channels",
        "ratio": ratio,
        "library": "torch-pruning MetaPruner, GroupMagnitudeImportance (L2), dependency-graph coupled groups",
        "kept": "classifier outputs (labels), the image input, and the convs of the stem and the first block "
                "(their output channels); channel counts rounded to multiples of 8",
        "params_before": before["params"], "params_after": after["params"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "macs_ratio": round(after["macs"] / before["macs"], 4),
        "params_ratio": round(after["params"] / before["params"], 4),
        "macs_input": f"1x3x{size}x{size}",
        "blocks": blocks,
        "batchnorm_statistics_from_images": bn_images,
        "recovery": recovery,
        "prune_seconds": round(prune_seconds, 1),
    }
    return model, info


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers that magnitude pruning zeroes: all but depthwise convs."""
    def depthwise(m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and not depthwise(m))]


def layer_sparsity(model: nn.Module) -> dict:
    """Measured fraction of exact zeros in every conv / linear weight, per layer and overall."""
    chosen = {name for name, _ in prunable_layers(model)}
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        weight = module.weight.detach()
        zeros = int((weight == 0).sum())
        rows.append({"layer": name, "type": "depthwise" if name not in chosen else type(module).__name__,
                     "weights": int(weight.numel()), "zeros": zeros, "sparsity": round(zeros / weight.numel(), 4),
                     "prunable": name in chosen})

    def overall(selected: list[dict]) -> float:
        total = sum(r["weights"] for r in selected)
        return round(sum(r["zeros"] for r in selected) / total, 4) if total else 0.0

    return {"sparsity_prunable": overall([r for r in rows if r["prunable"]]), "sparsity_all": overall(rows),
            "layers": rows}


def polynomial_sparsity(target: float, step: int, end: int) -> float:
    """Zhu & Gupta's cubic ramp: fast at first, gentle near the target; `target` from step `end` on."""
    done = min(1.0, step / max(1, end))
    return target * (1.0 - (1.0 - done) ** 3)


def prune_magnitude(
    model: nn.Module, sparsity: float, listing: data.DatasetListing, spec: dict, tune: Tune,
    teacher: nn.Module | None = None,
) -> tuple[nn.Module, dict]:
    """Zero the smallest weights of each prunable layer on a cubic schedule while fine-tuning; in place."""
    layers = prunable_layers(model)
    state = {"current": 0.0, "updates": []}

    def apply(level: float) -> None:
        for _, module in layers:
            amount = int(round(level * module.weight.numel()))
            if not torch_prune.is_pruned(module):
                torch_prune.l1_unstructured(module, "weight", amount=amount)  # `weight_orig` is the trained tensor
                continue
            # Re-rank the masked weights in place: the optimiser keeps training the same `weight_orig`, and
            # weights already masked (now zero) rank lowest, so the mask only grows.
            with torch.no_grad():
                magnitude = (module.weight_orig * module.weight_mask).abs().flatten()
                mask = torch.ones_like(magnitude)
                mask[torch.topk(magnitude, amount, largest=False).indices] = 0
                module.weight_mask.copy_(mask.view_as(module.weight_mask))
        state["current"] = level

    def after_step(step: int, total: int) -> None:
        end = max(1, int(SCHEDULE_END * total))
        every = max(1, end // SCHEDULE_UPDATES)
        if step % every == 0 or step == end:
            level = polynomial_sparsity(sparsity, step, end)
            if level > state["current"] + 1e-6:
                apply(level)
                state["updates"].append({"step": step, "sparsity": round(level, 4)})

    started = time.perf_counter()
    if tune.epochs:
        console.print(f"magnitude: pruning to {sparsity:.0%} during a {tune.epochs}-epoch fine-tune…")
        recovery = fit(model, listing, spec, tune, "fine-tune with magnitude pruning", after_step=after_step,
                       teacher=teacher)
    else:
        recovery = None
    if state["current"] < sparsity:  # no training asked (or too few steps): prune once, without recovery
        apply(sparsity)
        state["updates"].append({"step": "final", "sparsity": sparsity})
    for _, module in layers:
        torch_prune.remove(module, "weight")
    model.eval()
    info = {
        "method": "magnitude",
        "target_sparsity": sparsity,
        "library": "torch.nn.utils.prune.l1_unstructured per layer, then prune.remove",
        "scope": "every Conv2d and Linear weight except depthwise convs (biases and BatchNorm stay dense)",
        "schedule": {"kind": "polynomial (cubic), from 0", "reached_at_fraction_of_steps": SCHEDULE_END,
                     "updates": state["updates"]},
        "recovery": recovery,
        "seconds": round(time.perf_counter() - started, 1),
        **layer_sparsity(model),
    }
    return model, info


def save_pruned(model: nn.Module, folder: Path) -> str:
    """torch-pruning's state dict (weights + the pruned layer shapes): `tp.load_state_dict(build_model(...), it)`."""
    buffer = io.BytesIO()  # written by Python, so a full disk is an OSError with its errno (see save_weights)
    torch.save(tp.state_dict(model), buffer)
    (Path(folder) / PRUNED_MODEL_FILE).write_bytes(buffer.getbuffer())
    return PRUNED_MODEL_FILE
