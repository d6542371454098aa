"""The fine-tuning stage: data folder in, complete checkpoint folder out (or nothing at all).

Framework-free orchestration: validate the config, list and split the data, hand the training to the
backend, then write weights, labels, history, splits and the manifest into a temporary folder that is
renamed to RUN/checkpoint only when everything is there.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from edgetl.config import FinetuneConfig
from edgetl.data import DatasetListing, scan_folder
from edgetl.datasets import is_builtin, resolve_builtin
from edgetl.errors import UserError
from edgetl.manifest import (
    CHECKPOINT_KIND,
    SCHEMA_VERSION,
    library_versions,
    now_utc,
    sha256_file,
    write_json,
    write_labels,
)
from edgetl.paths import atomic_dir, claim_output, ensure_writable_dir
from edgetl.ui import console, stdout


def load_listing(config: FinetuneConfig) -> DatasetListing:
    """Resolve `--data` (a folder or builtin:NAME) and list it with the run's seed."""
    root = resolve_builtin(config.data) if is_builtin(config.data) else Path(config.data).expanduser()
    return scan_folder(root, config.seed, config.val_fraction, config.test_fraction, source=config.data)


def finetune_backend(framework: str):
    """The framework's fine-tuning module, imported only now.

    Each backend module provides: WEIGHTS_FILE, LIBRARIES, preprocess_spec(config),
    launch_if_needed(config, run_dir, feature_cache) (starts the processes of a multi-process run and
    returns its checkpoint, or None to train here), session(config) (a context manager yielding this
    process's world: is_main, size, from_main(fn), barrier()), build_initial_model(config),
    train(config, listing, preprocess, initial, feature_cache, world),
    evaluate(model, config, listing, preprocess, split, world), save_weights(model, path), describe(model).
    """
    try:
        if framework == "torch":
            from edgetl.backends.torch import finetune as backend
        elif framework == "keras":
            from edgetl.backends.keras import finetune as backend
        else:
            raise UserError(f"--framework {framework!r} has no fine-tuning backend; valid: torch, keras")
    except ImportError as error:
        raise UserError(
            f"the {framework} backend cannot be imported ({error}); install it with: pip install 'edgetl[{framework}]'"
        ) from None
    return backend


def _print_data(listing: DatasetListing) -> None:
    counts = listing.counts()
    sizes = ", ".join(f"{split} {sum(per.values())}" for split, per in counts.items())
    console.print(f"data: {listing.source} — {len(listing.classes)} classes; {sizes}; split: {listing.split_origin}")
    if listing.skipped:
        console.print(f"[yellow]skipped {len(listing.skipped)} file(s) while listing[/] (unreadable, not images, "
                      "broken symlinks; listed in the manifest)")
    if listing.ignored:
        console.print(f"ignored {len(listing.ignored)} entr{'y' if len(listing.ignored) == 1 else 'ies'} (hidden, "
                      "empty class folders, files outside the class folders; listed in the manifest)")


def run_stages(trainer, model, config: FinetuneConfig, listing: DatasetListing, feature_cache: bool, bar,
               restore_best: Callable[[], object]) -> dict:
    """The recipe's order and its throughput figures, shared by both backends (their trainers do the work).

    `trainer` provides extract_features, train_head, train_head_uncached, finetune_top, history and failures
    (already merged over ranks); `restore_best` loads the best validation weights into `model`.
    """
    throughput: dict = {}
    if config.epochs_head:
        start = time.perf_counter()
        if feature_cache:
            cached = {split: trainer.extract_features(model, split, bar) for split in ("train", "val")}
            extract_seconds = time.perf_counter() - start
            listing.drop(trainer.failures)
            trainer.failures.clear()
            trainer.train_head(model, cached, bar)
            throughput["stage1"] = {
                "feature_cache": True,
                "feature_extraction_seconds": round(extract_seconds, 2),
                "feature_images_per_s": round(sum(len(v[1]) for v in cached.values()) / extract_seconds, 1),
                "head_seconds": round(time.perf_counter() - start - extract_seconds, 2),
            }
            del cached
        else:
            trainer.train_head_uncached(model, bar)
            throughput["stage1"] = {"feature_cache": False}
        stage1_seconds = time.perf_counter() - start
        epochs_run = sum(1 for h in trainer.history if h["stage"] == 1)
        throughput["stage1"].update({
            "seconds": round(stage1_seconds, 2),
            "epochs": epochs_run,
            "images_per_s": round(epochs_run * len(listing.splits["train"]) / stage1_seconds, 1),
        })
        restore_best()
    if config.epochs_finetune and config.unfreeze:
        start = time.perf_counter()
        trainer.finetune_top(model, bar)
        stage2 = [h["train_images_per_s"] for h in trainer.history if h["stage"] == 2]
        throughput["stage2"] = {
            "seconds": round(time.perf_counter() - start, 2),
            "epochs": len(stage2),
            "images_per_s": round(sorted(stage2)[len(stage2) // 2], 1),
        }
    listing.drop(trainer.failures)
    restore_best()
    return throughput


def run_finetune(config: FinetuneConfig, run_dir: Path | None = None, feature_cache: bool = True) -> Path:
    """Fine-tune and write RUN/checkpoint; returns the checkpoint folder.

    With --devices/--nnodes (and no launcher around us) the backend starts the worker processes and this
    returns once they are done; inside a multi-process run only rank 0 writes the checkpoint.
    """
    config = config.validate()
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.backbone
    data = None if is_builtin(config.data) else Path(config.data).expanduser()
    weights = None if config.weights in ("imagenet", "none") else Path(config.weights).expanduser()
    claim_output(run_dir / "checkpoint", CHECKPOINT_KIND, [data, weights], option="checkpoint folder",
                 keep_out_of=[data])
    ensure_writable_dir(run_dir, "output folder")
    backend = finetune_backend(config.framework)
    launched = backend.launch_if_needed(config, run_dir, feature_cache)
    if launched is not None:
        return launched
    with backend.session(config) as world:
        initial = backend.build_initial_model(config)
        listing = world.from_main(lambda: load_listing(config))  # one listing, the same on every rank
        _print_data(listing)
        preprocess = backend.preprocess_spec(config)

        started = time.perf_counter()
        result = backend.train(config, listing, preprocess, initial, feature_cache=feature_cache, world=world)
        train_seconds = time.perf_counter() - started
        metrics = {split: backend.evaluate(result.model, config, listing, preprocess, split, world=world)
                   for split in ("val", "test")}
        for split_metrics in metrics.values():
            listing.drop(split_metrics.pop("decode_failures"))
        checkpoint = run_dir / "checkpoint"
        if world.is_main:
            _write_checkpoint(checkpoint, backend, config, listing, preprocess, result, metrics, train_seconds)
        elif getattr(world, "save_on_every_worker", False):
            # tf.distribute reads mirrored variables with collectives: every worker saves, the others elsewhere
            with tempfile.TemporaryDirectory(prefix="edgetl-worker-") as scratch:
                backend.save_weights(result.model, Path(scratch) / backend.WEIGHTS_FILE)
        world.barrier()  # no rank returns before the checkpoint exists
    return checkpoint


def _write_checkpoint(checkpoint: Path, backend, config: FinetuneConfig, listing: DatasetListing, preprocess: dict,
                      result, metrics: dict, train_seconds: float) -> None:
    with atomic_dir(checkpoint) as tmp:
        backend.save_weights(result.model, tmp / backend.WEIGHTS_FILE)
        write_labels(tmp / "labels.txt", listing.classes)
        write_json(tmp / "history.json", result.history)
        write_json(tmp / "splits.json", listing.to_json())
        manifest = {
            "kind": CHECKPOINT_KIND,
            "schema_version": SCHEMA_VERSION,
            "created": now_utc(),
            "framework": config.framework,
            "weights_file": backend.WEIGHTS_FILE,
            "weights_sha256": sha256_file(tmp / backend.WEIGHTS_FILE),
            "model": {
                "backbone": config.backbone,
                "width": config.width,
                "image_size": config.image_size,
                "num_classes": len(listing.classes),
                **backend.describe(result.model),
            },
            "labels": listing.classes,
            "preprocess": preprocess,
            "init_weights": result.init,
            "data": {
                "source": listing.source,
                "root": str(listing.root.resolve()),
                "split_origin": listing.split_origin,
                "splits_file": "splits.json",
                "counts": listing.counts(),
                "skipped_count": len(listing.skipped),
                "skipped": listing.skipped,
                "ignored_count": len(listing.ignored),
                "ignored": listing.ignored,
            },
            "config": config.to_json(),
            "training": {
                "device": result.device,
                "best": result.best,
                "throughput": result.throughput,
                "seconds": round(train_seconds, 1),
            },
            "metrics": metrics,
            "versions": library_versions(backend.LIBRARIES),
        }
        write_json(tmp / "manifest.json", manifest)
    _print_summary(manifest, checkpoint)


def _print_summary(manifest: dict, checkpoint: Path) -> None:
    table = Table(title=f"fine-tuned {manifest['model']['backbone']} @ {manifest['model']['image_size']} px")
    for column in ("split", "images", "top-1"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, figures in manifest["metrics"].items():
        table.add_row(split, str(figures["images"]), f"{100 * figures['top1']:.1f}%")
    stdout.print(table)
    training = manifest["training"]
    best = training["best"]
    stdout.print(
        f"best weights: stage {best.get('stage')} epoch {best.get('epoch')}; trained in {training['seconds']:.0f} s "
        f"on {training['device']['type']}; checkpoint: {checkpoint}"
    )
    skipped = manifest["data"]["skipped_count"]  # listing and decoding together: the manifest's own count
    if skipped:
        stdout.print(f"skipped {skipped} file(s) in all (listed in manifest.json → data.skipped)")
