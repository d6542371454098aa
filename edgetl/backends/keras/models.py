"""tf_keras `keras.applications` backbones with a new head, built the same way for training and export.

The classifier is one flat functional model (backbone layers + `pool` → `dropout` → `logits`): tfmot's
pruning and quantization wrappers clone layer by layer and refuse nested models, and export rebuilds the
same graph from the checkpoint manifest before loading the saved weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from edgetl.backbones import BackboneSpec, get_backbone
from edgetl.errors import UserError
from edgetl.manifest import sha256_file

HEAD_LAYERS = ("pool", "dropout", "logits")
DROPOUT = 0.2
_BLOCK = re.compile(r"^(block_\d+|expanded_conv(_\d+)?)(?=[_/])")


def keras_home() -> Path:
    """$KERAS_HOME, else ~/.keras: the folder whose models/ sub-folder caches application weights."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def build_backbone(spec: BackboneSpec, width: float, image_size: int) -> keras.Model:
    """The no-top application with random weights; inputs are x/127.5 - 1 for every backbone.

    MobileNetV3 is built with include_preprocessing=False so that it takes the same [-1, 1] input as
    MobileNetV2 (its Rescaling layer holds no weights, so ImageNet files load either way).
    """
    spec.check_framework("keras")
    kwargs: dict = {"include_top": False, "weights": None, "input_shape": (image_size, image_size, 3)}
    if spec.keras.application.startswith("MobileNetV3"):
        kwargs["include_preprocessing"] = False
    factory = getattr(keras.applications, spec.keras.application)
    return factory(alpha=width, **kwargs)


def resolve_imagenet_file(spec: BackboneSpec, width: float, image_size: int) -> tuple[Path, str]:
    """The cached no-top ImageNet file (downloaded into the Keras cache when missing and online)."""
    source = spec.keras_weight_source(width, image_size)
    cached = keras_home() / "models" / source.filename
    if cached.is_file():
        return cached, f"Keras cache ({cached})"
    try:
        keras.utils.get_file(
            source.filename, source.url, cache_dir=str(keras_home()), cache_subdir="models", file_hash=source.md5
        )
    except Exception as error:  # URLError, HTTPError, socket errors, hash mismatch: all mean "could not fetch"
        raise UserError(
            f"could not download keras ImageNet weights for {spec.name} from {source.url} "
            f"({type(error).__name__}); offline? place {source.filename} in {cached.parent}, "
            f"or use --weights PATH / --weights none"
        ) from None
    return cached, f"downloaded from {source.url} into the Keras cache ({cached})"


def load_backbone_weights(model: keras.Model, path: Path, name: str) -> None:
    """Load a no-top weights file; a file of the wrong kind or shape is one UserError line."""
    try:
        model.load_weights(str(path))
    except Exception as error:  # h5py OSError, ValueError on layer count/shape mismatch
        message = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(
            f"weights file {str(path)!r} does not fit keras {name} (a no-top keras.applications .h5 file is "
            f"expected; check --backbone/--width): {message}"
        ) from None


def initial_backbone(backbone: str, width: float, image_size: int, weights: str, seed: int) -> tuple[keras.Model, dict]:
    """The backbone with its initial weights, and their provenance for the manifest."""
    spec = get_backbone(backbone)
    keras.utils.set_random_seed(seed)
    model = build_backbone(spec, width, image_size)
    if weights == "none":
        return model, {"kind": "none", "source": "random initialisation (keras.applications' scheme)"}
    if weights == "imagenet":
        path, source = resolve_imagenet_file(spec, width, image_size)
        kind = "imagenet"
    else:
        path, source, kind = Path(weights), f"file {weights}", "file"
    load_backbone_weights(model, path, spec.keras.application)
    return model, {"kind": kind, "source": source, "path": str(path), "sha256": sha256_file(path),
                   "tensors_loaded": len(model.weights)}


def add_head(backbone: keras.Model, num_classes: int, seed: int) -> keras.Model:
    """One flat model: backbone layers, global average pooling, dropout, a new linear layer (logits)."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.output)
    x = keras.layers.Dropout(DROPOUT, name="dropout", seed=seed)(x)
    init = keras.initializers.RandomNormal(stddev=0.01, seed=seed)
    logits = keras.layers.Dense(num_classes, name="logits", kernel_initializer=init)(x)
    return keras.Model(backbone.input, logits, name=backbone.name)


def build_classifier(backbone: str, width: float, image_size: int, num_classes: int) -> keras.Model:
    """The architecture of a checkpoint (random weights): export loads the saved weights into it."""
    return add_head(build_backbone(get_backbone(backbone), width, image_size), num_classes, seed=0)


def head_model(model: keras.Model) -> keras.Model:
    """The head alone on pooled features, sharing its layers (and so its weights) with `model`."""
    features = keras.Input((model.get_layer("pool").output.shape[-1],))
    x = model.get_layer("dropout")(features)
    return keras.Model(features, model.get_layer("logits")(x))


def feature_model(model: keras.Model) -> keras.Model:
    return keras.Model(model.input, model.get_layer("pool").output)


def stages(model: keras.Model) -> list[list[keras.layers.Layer]]:
    """Backbone layers with weights grouped like the torch backend's stages: stem, each block, last conv.

    keras.applications names block layers `block_N_*` (V2) or `expanded_conv_N/*` (V3); other weighted
    layers are single convolutions whose BatchNormalization follows them.
    """
    groups: list[tuple[str, list]] = []
    for layer in model.layers:
        if not layer.weights or layer.name in HEAD_LAYERS:
            continue
        match = _BLOCK.match(layer.name)
        if match:
            key = match.group(1)
        elif isinstance(layer, keras.layers.BatchNormalization) and groups:
            key = groups[-1][0]
        else:
            key = layer.name
        if groups and groups[-1][0] == key:
            groups[-1][1].append(layer)
        else:
            groups.append((key, [layer]))
    return [members for _, members in groups]


def set_trainable(model: keras.Model, unfreeze: int) -> int:
    """Freeze everything but the head and the top `unfreeze` stages (all when negative); BatchNorm stays frozen.

    In Keras 2 a BatchNormalization layer with trainable=False also runs in inference mode, so its
    running statistics are kept as they are. Returns how many stages were unfrozen.
    """
    groups = stages(model)
    count = len(groups) if unfreeze < 0 else min(unfreeze, len(groups))
    top = groups[len(groups) - count:] if count else []
    chosen = {id(layer) for group in top for layer in group}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        else:
            layer.trainable = layer.name in HEAD_LAYERS or id(layer) in chosen
    return len(top)


_FORWARD: dict[int, tuple[keras.Model, object]] = {}


def inference_fn(model: keras.Model):
    """One compiled inference function per model (batch dimension free), so evaluation does not retrace."""
    cached = _FORWARD.get(id(model))
    if cached is None or cached[0] is not model:
        signature = [tf.TensorSpec((None, *model.input.shape[1:]), tf.float32)]
        cached = (model, tf.function(lambda x: model(x, training=False), input_signature=signature))
        if len(_FORWARD) >= 8:  # a few live models at a time; do not keep old ones (and their weights) alive
            _FORWARD.clear()
        _FORWARD[id(model)] = cached
    return cached[1]


def count_parameters(model: keras.Model) -> int:
    """Learnable values, as torch counts parameters (BatchNorm running statistics are buffers there)."""
    return int(sum(tf.size(w).numpy() for w in model.weights if "moving_" not in w.name))
