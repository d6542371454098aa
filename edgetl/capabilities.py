"""What each export backend can make, as one import-free table.

Config validation reads it before any framework is imported, so an option the checkpoint's backend lacks is
refused in one line instead of being ignored. Which formats a backend makes comes from the format registry
(`edgetl.formats`: each format's converters by framework). It imports nothing of edgetl but the errors and the
format records, so the configuration (which checks options) and the backends (which implement them) both
depend on it, and no arrow runs from the configuration back into a backend package.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetl.errors import UserError
from edgetl.formats import FORMATS

# Export options every backend honours: which files, how many calibration images, the quality gate, the
# seed, verification threads, the recipe's name.
COMMON_KNOBS = frozenset({"formats", "quant", "calib", "max_drop", "seed", "threads", "recipe", "prune", "qat", "int8",
                          "no_qat"})


@dataclass(frozen=True)
class Capabilities:
    """What one backend can make: the table that config validation reads."""

    framework: str
    quants: tuple[str, ...]
    prune_kinds: tuple[str, ...]
    knobs: frozenset[str]  # ExportConfig fields beyond COMMON_KNOBS that this backend honours
    libraries: tuple[str, ...]  # whose versions the manifests record
    # int8 remedies `--int8 auto` may apply to a file over --max-drop, cheapest first ("qat" trains on labels)
    remedies: tuple[str, ...] = ("qat",)
    hint: str = ""  # what to do instead, appended when an option is refused
    from_scratch: bool = False  # implements Backend.train_backbone_from_scratch

    def honours(self, knob: str) -> bool:
        return knob in COMMON_KNOBS or knob in self.knobs

    @property
    def converters(self) -> dict[str, str]:
        """Format → what makes the file from this framework's checkpoints: the formats' own records say."""
        return {name: record.converters[self.framework] for name, record in FORMATS.items()
                if self.framework in record.converters}

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats this backend exports to, in the registry's order."""
        return tuple(self.converters)


CAPABILITIES: dict[str, Capabilities] = {
    "torch": Capabilities(
        framework="torch",
        quants=("fp32", "int8"),
        prune_kinds=("channels", "magnitude"),
        knobs=frozenset({"bias_correction", "fuse_clamp", "distill", "recovery_epochs", "recovery_lr", "qat_epochs",
                         "qat_lr", "tune_images", "rounding_layers", "sensitivity_seconds", "float_layers",
                         "parts", "debug_numerics", "debug_blocks"}),
        libraries=("torch", "torchao", "executorch", "litert-torch", "ai-edge-litert", "numpy", "pillow"),
        remedies=("equalize", "ranges", "adaround", "float-fallback", "qat"),
        hint="fine-tune with --framework keras to use them",
    ),
    "keras": Capabilities(
        framework="keras",
        quants=("fp32", "fp16", "dynamic", "int8"),
        prune_kinds=("magnitude",),
        knobs=frozenset({"recovery_epochs", "recovery_lr", "qat_epochs", "qat_lr", "tune_images"}),
        libraries=("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "numpy", "pillow"),
        hint="fine-tune with --framework torch to use them",
        from_scratch=True,
    ),
}


# Every framework edgetl trains and exports with, in the table's order: the one list the options and the contracts
# check a framework name against.
FRAMEWORKS: tuple[str, ...] = tuple(CAPABILITIES)


def capabilities(framework: object) -> Capabilities:
    if framework not in CAPABILITIES:
        raise UserError(f"checkpoint framework {framework!r} has no export backend; valid: {', '.join(CAPABILITIES)}")
    return CAPABILITIES[str(framework)]
