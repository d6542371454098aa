"""Per-layer int8 sensitivity: what rounding one layer's weights alone costs, measured on calibration images.

The question a user asks when int8 loses accuracy is "which layer?". Each conv/linear layer of the BN-folded
float model has its weights rounded to the int8 grid XNNPACK uses (`quantize.fake_quant_per_channel`), every
other layer stays float, and the logits on unlabelled calibration images are compared with the float model's:
mean |Δlogit| and how many predictions change. Each layer's share of the model's MACs says what keeping it
float would cost. Bounded in time: layers not reached within the budget are listed as not measured. Learned
rounding, which optimises the most sensitive layers, first completes the table, so that the layers it picks do
not depend on how busy the machine was while the table was measured.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from edgetl.backends.torch.quantize import fake_quant_per_channel

QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers PT2E quantizes, by module name, in definition order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QUANTIZED_LAYERS)]


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "conv 1x1" if module.kernel_size == (1, 1) else f"conv {module.kernel_size[0]}x{module.kernel_size[1]}"


def macs_per_image(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every quantized layer, from one forward pass."""
    macs: dict[str, int] = {}
    hooks = []
    for name, module in quantized_layers(model):
        def count(m: nn.Module, _inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            per_output = m.weight[0].numel()  # in_channels/groups × kh × kw, or in_features
            macs[name] = int(output[0].numel() * per_output)
        hooks.append(module.register_forward_hook(count))
    with torch.no_grad():
        model(example[:1])
    for hook in hooks:
        hook.remove()
    return macs


def _logits(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in torch.split(x, batch)])


def layer_sensitivity(model: nn.Module, calibration: torch.Tensor, seconds: float = 60.0,
                      images: int = 64, known: dict | None = None) -> dict:
    """Round each layer's weights alone and measure the logit error on `images` calibration images.

    `model` is the BN-folded float model (NHWC input); it is left as it was. Returns the record the manifest
    keeps: one row per layer (definition order) and the conditions of the measurement. `known`, an earlier
    record of the same model on the same images, lends its measured rows as they are: a table that its time
    budget cut short is completed without measuring any layer twice."""
    started = time.perf_counter()
    done = {row["layer"]: row for row in (known or {}).get("rows", []) if row.get("measured")}
    x = calibration[:images]
    reference = _logits(model, x)
    predicted = reference.argmax(dim=1)
    scale = float(reference.abs().mean().clamp_min(1e-12))
    macs = macs_per_image(model, x)
    total_macs = max(sum(macs.values()), 1)
    rows = []
    for index, (name, module) in enumerate(quantized_layers(model)):
        row = {"layer": name, "kind": layer_kind(module), "index": index, "macs": macs.get(name, 0),
               "macs_share": round(macs.get(name, 0) / total_macs, 5)}
        if name in done:
            rows.append({**done[name], **row})
            continue
        if time.perf_counter() - started > seconds:
            rows.append({**row, "measured": False})
            continue
        original = module.weight.data
        module.weight.data = fake_quant_per_channel(original)
        try:
            out = _logits(model, x)
        finally:
            module.weight.data = original
        error = (out - reference).abs().mean()
        rows.append({**row, "measured": True, "logit_error": round(float(error), 6),
                     "relative_logit_error": round(float(error) / scale, 6),
                     "changed_predictions": int((out.argmax(dim=1) != predicted).sum())})
    measured = [r for r in rows if r["measured"]]
    ranked = sorted(measured, key=lambda r: -r["logit_error"])
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return {
        "method": "weights of one layer rounded to int8 (per channel, symmetric, ±127), every other layer float; "
                  "BatchNorm folded; compared with the float model's logits",
        "images": int(len(x)),
        "data": "calibration images (training split, unlabelled)",
        "layers": len(rows),
        "measured": len(measured),
        # the budget the table was first measured with (a completion has none; JSON has no infinity)
        "budget_seconds": (known or {}).get("budget_seconds", float(seconds) if math.isfinite(seconds) else None),
        "seconds": round(time.perf_counter() - started + (known or {}).get("seconds", 0.0), 1),
        **({"completed": f"{len(done)} rows of the export's table kept, the other layers measured for learned "
                         f"rounding"} if known is not None else {}),
        "rows": rows,
    }


def complete(record: dict | None) -> bool:
    """Whether `record` ranks every layer (a time-bounded table may not: which layers it reached depends on how
    busy the machine was)."""
    return record is not None and record["measured"] == record["layers"]


def most_sensitive(record: dict, count: int) -> list[str]:
    """Names of the `count` layers with the largest logit error, most sensitive first."""
    measured = [r for r in record["rows"] if r.get("measured")]
    return [r["layer"] for r in sorted(measured, key=lambda r: -r["logit_error"])[:count]]
