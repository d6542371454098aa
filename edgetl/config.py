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
    devices: int = 1  # processes (torch) or replicas (keras) per machine, one per GPU
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None  # ADDR:PORT of node rank 0, for several machines
    master_timeout: float = 120.0  # seconds to wait for the master before giving up with one line

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
        self._validate_scale_out()
        return replace(self, image_size=size)

    @property
    def world_size(self) -> int:
        """Training processes (torch) or workers × replicas asked for on the command line."""
        return self.devices * self.nnodes

    def _validate_scale_out(self) -> None:
        """--devices/--nnodes/--node-rank/--master: checks that need no framework (GPU counts come later)."""
        from edgetl.distributed import parse_master

        if self.devices < 1:
            raise UserError(f"--devices {self.devices} is not usable; valid: 1 or more (one process per GPU)")
        if self.nnodes < 1:
            raise UserError(f"--nnodes {self.nnodes} is not usable; valid: 1 or more machines")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} does not fit --nnodes {self.nnodes}; "
                            f"valid: 0 to {self.nnodes - 1}")
        if self.nnodes > 1 and not self.master:
            raise UserError(f"--nnodes {self.nnodes} needs --master ADDR:PORT (the address of node rank 0)")
        if self.master:
            parse_master(self.master)
        if self.master_timeout <= 0:
            raise UserError(f"--master-timeout {self.master_timeout} is not usable; valid: seconds > 0")
        if self.device == "mps" and self.devices > 1:
            raise UserError(f"--devices {self.devices} with --device mps: Apple GPUs are one device; valid: 1")
        if self.batch_size % self.world_size:
            raise UserError(
                f"--batch-size {self.batch_size} is the global batch and must divide evenly over "
                f"{self.world_size} processes (--devices {self.devices} × --nnodes {self.nnodes}); "
                f"valid: a multiple of {self.world_size}"
            )

    def to_json(self) -> dict:
        return asdict(self)
