"""Resolved configuration of each stage, as frozen dataclasses.

The CLI builds them from flags; `validate()` turns every bad value into one clear UserError before any
heavy import, and the resolved dict is stored in the manifest so a run can be repeated exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgetl.backbones import check_image_size, get_backbone
from edgetl.errors import UserError, one_of

FRAMEWORKS = ("torch", "keras")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides a fine-tuning run (with `seed`, it is reproducible on CPU)."""

    data: str
    backbone: str = "efficientnet_lite0"
    width: float = 1.0
    image_size: int | None = None
    weights: str = "imagenet"
    epochs_head: int = 30
    epochs_finetune: int = 4
    unfreeze: int = 3
    batch_size: int = 64
    lr_head: float = 3e-3
    lr_finetune: float = 3e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1
    patience: int = 6
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    framework: str = "torch"

    def validate(self) -> FinetuneConfig:
        """Check every value; return a copy with defaults resolved (image size)."""
        spec = get_backbone(self.backbone)
        spec.check_width(self.width)
        if self.framework not in FRAMEWORKS:
            raise UserError(one_of(self.framework, FRAMEWORKS, "--framework"))
        spec.check_framework(self.framework)
        if self.device not in DEVICES:
            raise UserError(one_of(self.device, DEVICES, "--device"))
        size = check_image_size(self.image_size if self.image_size is not None else spec.default_image_size)
        if self.weights not in ("imagenet", "none"):
            path = Path(self.weights)
            if not path.is_file():
                raise UserError(f"--weights {self.weights!r} is neither 'imagenet', 'none' nor an existing file")
        if self.weights == "imagenet" and self.framework == "keras":
            spec.keras_weight_source(self.width, size)
        elif self.weights == "imagenet":
            spec.torch_weight_source(self.width)
        for name in ("epochs_head", "epochs_finetune", "unfreeze", "patience", "workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is negative; valid: 0 or more")
        if self.epochs_head == 0 and self.epochs_finetune == 0:
            raise UserError("--epochs-head 0 and --epochs-finetune 0 train nothing; give at least one epoch")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} is not usable; valid: 1 or more")
        for name in ("lr_head", "lr_finetune"):
            if not 0 < getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} is not usable; valid: 0 < lr < 1")
        if not (0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise UserError("validation and test fractions must each be between 0 and 0.5")
        return replace(self, image_size=size)

    def to_json(self) -> dict:
        return asdict(self)
