"""Train a keras.applications backbone from random initialisation on a run's training split.

Where no ImageNet file can be had (offline, empty Keras cache), the frozen-backbone recipe has nothing to
transfer: random MobileNet features are constant (BatchNorm frozen at its initial statistics), so the head
learns nothing. The keras demo and figures then first train the whole network from scratch here (BatchNorm
learning, momentum 0.9 so that its running statistics follow in a few hundred steps), save the no-top
weights, and run the usual recipe with `--weights PATH`. Nothing from the validation or test split is used.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgetl import data
from edgetl.backbones import get_backbone
from edgetl.backends.keras import models
from edgetl.backends.keras.finetune import MEAN, STD
from edgetl.config import FinetuneConfig
from edgetl.ui import console

keras = models.keras


def train_backbone_from_scratch(config: FinetuneConfig, listing: data.DatasetListing, epochs: int, path: Path,
                                lr: float = 1e-3) -> dict:
    """Whole-network training on the training split of `listing` (the run's, as `config` lists it); writes the
    no-top weights to `path`."""
    config = config.validate()
    spec = data.preprocess_spec(config.model.image_size, MEAN, STD, layout="NHWC")
    x, labels = data.decode_kept(listing.root, listing.splits["train"], spec)
    y = keras.utils.to_categorical(labels, len(listing.classes))
    keras.utils.set_random_seed(config.train.seed)
    backbone = models.build_backbone(get_backbone(config.model.backbone), config.model.width, config.model.image_size)
    model = models.add_head(backbone, len(listing.classes), config.train.seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.train.label_smoothing)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=["accuracy"])
    console.print(f"from scratch: training {config.model.backbone} on {len(x)} training images for {epochs} epochs")
    started = time.perf_counter()
    history = model.fit(x, y, batch_size=config.train.batch_size or 64, epochs=epochs, shuffle=True, verbose=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Never a half-written file under `path`; the temporary name keeps the suffix, which picks Keras's format.
    partial = path.with_name(f".partial-{path.name}")
    backbone.save_weights(str(partial))
    partial.replace(path)
    return {
        "kind": "trained from scratch (--weights none) on the training split",
        "epochs": epochs,
        "train_images": int(len(x)),
        "seconds": round(time.perf_counter() - started, 1),
        "final_train_top1": round(float(history.history["accuracy"][-1]), 4),
        "batchnorm_momentum": 0.9,
        "weights_file": str(path),
    }
