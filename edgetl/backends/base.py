"""The contract every backend implements; what each one can do is the table in `edgetl.capabilities`.

`Backend` is the handful of steps that differ by framework (`edgetl.backends.load` gives a framework's);
`edgetl.export.run_export` is the one orchestration around them (listing, calibration, the atomic folder, file
names, sidecars, verification, the manifest). A backend imports this module and its own framework, never a
stage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.capabilities import CAPABILITIES, COMMON_KNOBS, Capabilities, capabilities

__all__ = ["CAPABILITIES", "COMMON_KNOBS", "Backend", "Capabilities", "Converted", "Graphs", "capabilities"]

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Tune:
    """One short training run of compression: pruning recovery or quantization-aware training.

    Each backend reads the fields it implements; what it does not (keras: distillation, weight decay) stays at
    the value that says so, so the manifest records what was really done."""

    epochs: int
    lr: float
    batch_size: int = 64
    images: int | None = None  # None: the whole training split
    seed: int = 0
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    distill: float = 0.0  # weight of the dense model's soft targets in the loss (0: labels only)
    temperature: float = 4.0
    # BatchNorm: frozen (running statistics as they are; right for a network that already works on small
    # data) or trained in batch mode (a network rebuilt after channel pruning: its statistics move every step).
    train_batchnorm: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TuneDefaults:
    """A backend's measured defaults for its short fine-tunes, by kind ("channels", "magnitude", "qat")."""

    epochs: dict[str, int]
    lr: dict[str, float]
    distill: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 1e-4


def trained_settings(stored: dict) -> dict[str, Any]:
    """A checkpoint manifest's fine-tuning config as flat settings, whichever config version wrote it."""
    from edgetl.config import FinetuneConfig

    return FinetuneConfig.settings_of(stored)


def tune_for(stored: dict, config: Any, kind: str, defaults: TuneDefaults, epochs: int | None = None) -> Tune:
    """The fine-tune of `kind`: the checkpoint's own batch size, seed and label smoothing (`stored` is its
    manifest's resolved fine-tuning config), epochs, learning rate, distillation and images from the export
    config, the backend's defaults where it leaves them unset. `epochs` overrides the default epochs of `kind`."""
    trained = trained_settings(stored)
    if kind == "qat":
        chosen_epochs, lr = config.policy.qat_epochs, config.policy.qat_lr
    else:
        chosen_epochs, lr = config.compression.recovery_epochs, config.compression.recovery_lr
    if chosen_epochs is None:
        chosen_epochs = defaults.epochs[kind] if epochs is None else epochs
    distill = config.compression.distill
    return Tune(
        epochs=int(chosen_epochs),
        lr=defaults.lr[kind] if lr is None else float(lr),
        distill=defaults.distill.get(kind, 0.0) if distill is None else float(distill),
        weight_decay=defaults.weight_decay,
        train_batchnorm=kind == "channels",  # a network rebuilt by channel pruning: its BN statistics must follow
        batch_size=int(trained.get("batch_size", 64)),
        images=config.compression.tune_images,
        seed=int(trained.get("seed", config.seed)),
        label_smoothing=float(trained.get("label_smoothing", 0.1)),
    )


@dataclass
class Graphs:
    """The models one export turns into files, and what was measured making them.

    `float_model` is the reference every file is verified against (the pruned model when pruning ran);
    `int8` is the quantized model when the backend makes one before conversion (PT2E, QAT), else None
    (the converter quantizes); `int8_error` says why int8 failed, when it did: the float files still go on.
    """

    float_model: Any
    example: Any
    int8: Any = None
    quantization: dict = field(default_factory=dict)
    pruning: dict | None = None
    int8_error: str | None = None
    sensitivity: dict | None = None  # per-layer int8 cost table (backend.sensitivity), when the backend has one
    float_label: str = "checkpoint"  # what the float reference is, for the manifest


@dataclass
class Converted:
    """One converted file's bytes and what its converter reported about it (e.g. XNNPACK delegation)."""

    payload: bytes
    details: dict = field(default_factory=dict)


class Backend(ABC):
    """What a framework backend does for the stages: the steps of `edgetl export`, in the order the stage calls
    them, and the optional training entries (`train_backbone_from_scratch`).

    `manifest` is a contracts.CheckpointManifest, `listing` the checkpoint's data.DatasetListing, `config`
    an ExportConfig already checked against `capabilities`. Which int8 method runs (QAT or post-training) and
    what pruning precedes it is each backend's policy; the stage only isolates failures.
    """

    capabilities: Capabilities

    @abstractmethod
    def needs_calibration(self, config: Any) -> bool:
        """Whether int8 needs calibration images (post-training quantization) for this config."""

    @abstractmethod
    def load_float(self, checkpoint: Path, manifest: Any, listing: Any, config: Any) -> Graphs:
        """The float model every file is made from: the checkpoint's, or pruned and fine-tuned when asked."""

    @abstractmethod
    def quantize(self, graphs: Graphs, checkpoint: Path, manifest: Any, listing: Any, calibration: np.ndarray,
                 config: Any) -> None:
        """Fill `graphs.int8` and `graphs.quantization` (QAT or post-training, by the backend's policy). May
        raise: the stage then records the error and still makes the float files."""

    @abstractmethod
    def logits(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Float32 logits of `model` over NHWC float32 images: the reference the files are verified against."""

    @abstractmethod
    def convert(self, graphs: Graphs, quant: str, fmt: str) -> Converted:
        """One file of format `fmt` at precision `quant`."""

    def sensitivity(self, graphs: Graphs, calibration: np.ndarray, config: Any) -> dict | None:
        """Per-layer int8 cost on calibration images (each layer rounded alone), or None where not implemented."""
        return None

    def pte_parts(self, graphs: Graphs, quant: str) -> list[dict] | None:
        """Each network block of the `quant` .pte lowered on its own (name, role, macs, payload), for
        `bench --breakdown`; None where the backend cannot cut its graph."""
        return None

    def block_signals(self, graphs: Graphs, images: np.ndarray, lower_pte: bool,
                      selected: tuple[str, ...] = ()) -> list | None:
        """Each block's output in the float model and the int8 graph on `images`, with (`lower_pte`) each int8 block
        (each `selected` one, when any is) lowered to a .pte of its own, for the numerics debugger; None where the
        backend cannot cut its graph."""
        return None

    def block_names(self, checkpoint: Path, manifest: Any) -> list[str] | None:
        """Names of the blocks the numerics debugger compares (what --debug-blocks may name), or None where not
        known."""
        return None

    def quantized_layer_names(self, checkpoint: Path, manifest: Any) -> list[str] | None:
        """Names of the layers int8 quantizes (what --float-layers may name), or None where not known."""
        return None

    def remedy(self, name: str, graphs: Graphs, checkpoint: Path, manifest: Any, listing: Any,
               calibration: np.ndarray, config: Any) -> None:
        """Remake `graphs.int8` / `graphs.quantization` with remedy `name` (one of `capabilities.remedies`)."""
        if name == "qat":
            self.quantize(graphs, checkpoint, manifest, listing, calibration, config.with_(qat=True, int8="qat"))
            return
        raise ValueError(f"remedy {name!r} is not implemented by the {self.capabilities.framework} backend")

    def save_extras(self, graphs: Graphs, folder: Path) -> None:  # noqa: B027 - optional step
        """Write what the export folder should keep besides the model files (a pruned float model)."""

    def pruning_summary(self, pruning: dict) -> str:
        """One console line about what pruning did."""
        return f"pruning: {pruning.get('method', 'done')}"

    def train_backbone_from_scratch(self, config: Any, listing: Any, epochs: int, path: Path) -> dict:
        """Train the whole network from random initialisation on the training split of `listing` and write the
        no-top backbone weights to `path` (a start where no ImageNet file can be had); returns the record."""
        from edgetl.errors import UserError

        raise UserError(f"the {self.capabilities.framework} backend has no from-scratch pretraining; valid: "
                        f"{', '.join(n for n, c in CAPABILITIES.items() if c.from_scratch) or 'none'}")


class TrainerShared:
    """What both trainers share, written once. The validation figure they offer the selector, computed one way:
    cross-entropy (no smoothing, no class weights) and top-1 over the whole split, summed over ranks. And the
    history row of each epoch, the same fields in either framework. A trainer provides `listing`, `world` (with
    `sum`), `history` (a list) and `predict(split)` → (labels, predicted, probabilities) of this rank's shard."""

    def log(self, stage: int, epoch: int, loss: float, top1: float, val_loss: float, val_top1: float, lr: float,
            seconds: float, images: int, train_seconds: float | None = None) -> None:
        self.history.append({
            "stage": stage,
            "epoch": epoch,
            "train_loss": round(loss, 5),
            "train_top1": round(top1, 5),
            "val_loss": round(val_loss, 5),
            "val_top1": round(val_top1, 5),
            "lr": lr,
            "seconds": round(seconds, 3),
            "train_images_per_s": round(images / max(1e-9, train_seconds or seconds), 1),
        })

    def evaluate_split(self, split: str) -> tuple[float, float]:
        import numpy as np

        if not self.listing.splits[split]:  # the same on every rank: no collective is started for nothing
            return 0.0, 0.0
        labels, predicted, probs = self.predict(split)
        nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))
        loss_sum, correct, count = self.world.sum([float(nll.sum()), float(np.sum(predicted == labels)),
                                                   float(len(labels))])
        return loss_sum / max(1.0, count), correct / max(1.0, count)


def one_line(error: BaseException) -> str:
    """An exception as one short line for a manifest: type, then the first line of its message."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]
