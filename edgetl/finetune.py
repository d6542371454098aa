"""The fine-tuning stage: data folder in, complete checkpoint folder out (or nothing at all).

Framework-free orchestration: validate the config, list and split the data, fit the open settings to the
folder (`edgetl.recipe`), run the recipe's two stages on the backend's trainer (stage 1 the converged
probe of `edgetl.probe`, stage 2 the fine-tune, `edgetl.selection` choosing the kept weights), then write
weights, labels, history, splits and the manifest into a temporary folder that is renamed to
RUN/checkpoint only when everything is there.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from edgetl import backends
from edgetl.backbones import parse_hub_weights
from edgetl.backends.training import FinetuneBackend, FinetuneTrainer, TimedTrainer
from edgetl.budget import Speed, fit_to_budget, refit_after_stage1, refit_during_stage2
from edgetl.config import FinetuneConfig
from edgetl.data import DatasetListing, cache_side, scan_folder
from edgetl.datasets import is_builtin, resolve_builtin
from edgetl.distributed import world_from_env
from edgetl.imagecache import ImageCache, Share, open_cache
from edgetl.manifest import (
    CHECKPOINT_KIND,
    SCHEMA_VERSION,
    library_versions,
    now_utc,
    sha256_file,
    write_json,
    write_labels,
)
from edgetl.paths import atomic_dir, claim_output, ensure_writable_dir, room_for
from edgetl.probe import fit_probe
from edgetl.recipe import Plan, describe_folder, fold_small_validation, search_sample, size_candidates
from edgetl.recipe import plan as plan_recipe
from edgetl.selection import Selector
from edgetl.stats import wilson_interval
from edgetl.ui import console, progress, stdout

SEARCH_BATCH = 32  # images per forward while measuring input sizes, when --batch-size is open

def load_listing(config: FinetuneConfig) -> DatasetListing:
    """Resolve `--data` (a folder or builtin:NAME) and list it with the run's seed."""
    # absolute, so that export finds the data from any directory; `source` keeps what the user typed for display
    dataset = config.dataset
    root = resolve_builtin(dataset.data) if is_builtin(dataset.data) else Path(dataset.data).expanduser().absolute()
    return scan_folder(root, config.train.seed, dataset.val_fraction, dataset.test_fraction, source=dataset.data)


def _print_data(listing: DatasetListing, init: dict) -> None:
    console.print(f"weights: {init.get('source', init.get('kind'))}")
    counts = listing.counts()
    sizes = ", ".join(f"{split} {sum(per.values())}" for split, per in counts.items())
    console.print(f"data: {listing.source} — {len(listing.classes)} classes; {sizes}; split: {listing.split_origin}")
    if listing.skipped:
        console.print(f"[yellow]skipped {len(listing.skipped)} file(s) while listing[/] (unreadable, not images, "
                      "broken symlinks, symlinks leaving their class folder, files reached twice, images over the "
                      "pixel limit; listed in the manifest)")
    if listing.ignored:
        console.print(f"ignored {len(listing.ignored)} entr{'y' if len(listing.ignored) == 1 else 'ies'} (hidden, "
                      "empty class folders, files outside the class folders; listed in the manifest)")


def _print_plan(plan: Plan) -> None:
    """The settings the run uses, each with where it came from, before any training."""
    table = Table(title="recipe", show_header=True)
    for column in ("setting", "value", "why"):
        table.add_column(column)
    for name, choice in plan.choices.items():
        why = choice.why if choice.source == "auto" else f"given ({choice.why})"
        table.add_row(name.replace("_", "-"), str(choice.value), why)
    console.print(table)
    for note in plan.warnings:
        console.print(f"[yellow]warning: {note}[/]")


def run_recipe(trainer: FinetuneTrainer, plan: Plan, listing: DatasetListing, bar,
               before_stage2: Callable[[dict], None] | None = None) -> dict:
    """The two stages in order, on any backend's trainer; returns what the manifest says about training.

    Stage 1: eval-mode features of train and val once, the converged probe fitted on the training ones
    (on rank 0, shared with every rank), the head set from it. Stage 2 (when it has epochs and blocks to
    unfreeze) offers its model to the selector after every epoch; the selector's choice is loaded last.
    `before_stage2(stage-1 figures)` may set the trainer's config for stage 2 (a time budget's second plan).
    """
    config = plan.config
    selector = Selector(len(listing.splits["val"]))
    start = time.perf_counter()
    cached = {"train": trainer.extract_features("train", bar)}
    if listing.splits["val"]:
        cached["val"] = trainer.extract_features("val", bar)
    else:  # validation put back into train; every rank skips it alike
        cached["val"] = (cached["train"][0][:0], cached["train"][1][:0])
    extract_seconds = time.perf_counter() - start
    listing.drop(trainer.failures)
    trainer.failures.clear()
    (x_train, y_train), (x_val, y_val) = cached["train"], cached["val"]
    balance = config.dataset.class_weights == "balanced"
    with console.status(f"stage 1: linear probe on {len(y_train)} cached features"):
        head = trainer.world.from_main(
            lambda: fit_probe(x_train, y_train, len(listing.classes), config.train.seed, balance=balance))
    trainer.set_head(head.weight, head.bias)
    val_loss, val_top1 = _probe_scores(head, x_val, y_val)
    selector.offer(1, 1, val_loss, val_top1, trainer.snapshot)
    trainer.log(1, 1, head.record["train_log_loss"], head.record["train_top1"], val_loss, val_top1, 0.0,
                time.perf_counter() - start, len(y_train))
    console.print(f"stage 1: probe C={head.record['C']:.3g} ({head.record['rule'].split(':')[0]}), "
                  f"{head.record['iterations']} L-BFGS iterations; train top-1 {head.record['train_top1']:.3f}, "
                  + (f"val top-1 {val_top1:.3f}" if len(y_val) else "no validation split"))
    throughput = {"stage1": {
        "feature_extraction_seconds": round(extract_seconds, 2),
        "feature_images_per_s": round((len(y_train) + len(y_val)) / max(1e-9, extract_seconds), 1),
        "probe_seconds": head.record["seconds"],
        "seconds": round(time.perf_counter() - start, 2),
    }}
    del cached  # the features are not needed past stage 1
    if before_stage2 is not None:
        before_stage2(throughput["stage1"])
        config = trainer.config
    unfrozen = 0
    if config.train.epochs_finetune and config.train.unfreeze:
        start = time.perf_counter()
        unfrozen = trainer.finetune(bar, selector)
        stage2 = [h["train_images_per_s"] for h in trainer.history if h["stage"] == 2]
        throughput["stage2"] = {"seconds": round(time.perf_counter() - start, 2), "epochs": len(stage2),
                                "units_unfrozen": unfrozen,
                                "images_per_s": round(sorted(stage2)[len(stage2) // 2], 1) if stage2 else None}
    listing.drop(trainer.failures)
    chosen = selector.chosen()
    trainer.restore(chosen.state)
    return {"stage1": head.record, "selection": selector.record(), "throughput": throughput}


def _probe_scores(head, features, labels) -> tuple[float, float]:
    """Validation cross-entropy and top-1 of the probe, computed as the trainers compute them."""
    import numpy as np

    if not len(labels):
        return 0.0, 0.0
    logits = head.logits(features).astype(np.float64)
    logits -= logits.max(1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    return loss, float((logits.argmax(1) == labels).mean())


def run_finetune(config: FinetuneConfig, run_dir: Path | None = None) -> Path:
    """Fine-tune and write RUN/checkpoint; returns the checkpoint folder.

    With --devices/--nnodes (and no launcher around us) the backend starts the worker processes and this
    returns once they are done; inside a multi-process run only rank 0 writes the checkpoint.
    """
    run_started = time.perf_counter()  # a time budget counts the whole run
    config = config.validate()
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config.model.backbone
    data = None if is_builtin(config.dataset.data) else Path(config.dataset.data).expanduser()
    named_file = config.model.weights not in ("imagenet", "none") and parse_hub_weights(config.model.weights) is None
    weights = Path(config.model.weights).expanduser() if named_file else None
    claim_output(run_dir / "checkpoint", CHECKPOINT_KIND, [data, weights], option="checkpoint folder",
                 keep_out_of=[data])
    ensure_writable_dir(run_dir, "output folder")
    backend = backends.load(config.model.framework, "finetune")
    launched = backend.launch_if_needed(config, run_dir)
    if launched is not None:
        return launched
    with backend.session(config) as world, contextlib.ExitStack() as caches:
        listing, folder = world.from_main(lambda: _listing_and_folder(config))  # the same on every rank
        candidates = size_candidates(config, folder, backend.FEATURES_AT_ANY_SIZE)
        measured = search_images = None
        if candidates:  # a model that takes any input size measures the candidates with the initial weights
            initial = backend.build_initial_model(config)  # a weights file that does not fit stops here
            _print_data(listing, initial[1])
            sample = search_sample(listing, config.train.seed)
            search_cache = caches.enter_context(contextlib.ExitStack())
            search_images = open_images(search_cache, sample, max(candidates), run_dir, world)
            measured = measure_sizes(backend, config, listing, candidates, initial, world, search_images, sample)
            folder["size_search"] = measured
        recipe = world.from_main(lambda: plan_recipe(config, listing, world.size,
                                                     measured and measured["cv_log_loss"], folder))
        config = recipe.config
        if not candidates:
            initial = backend.build_initial_model(config)  # ... or here, before anything is printed
            _print_data(listing, initial[1])
        _print_plan(recipe)
        preprocess = backend.preprocess_spec(config)
        images = open_images(caches, listing, config.model.image_size, run_dir, world, reuse=search_images)
        if search_images is not None:
            search_cache.close()  # its pixels live on, resized, in the run's cache

        started = time.perf_counter()
        trainer = backend.Trainer(config, listing, preprocess, initial, world, images=images)
        budget = None
        if config.train.time_budget is not None:
            recipe, budget = _fit_budget(trainer, recipe, listing, run_started, candidates or (), world)
            if recipe.config.model.image_size != config.model.image_size:  # a smaller measured size fits it better
                preprocess = backend.preprocess_spec(recipe.config)
                trainer = backend.Trainer(recipe.config, listing, preprocess, initial, world, images=images)
            config = trainer.config = recipe.config
            trainer.deadline = run_started + budget["stage2_deadline_seconds"]
        replan = None
        if budget is not None and config.train.max_steps:
            def replan(stage1: dict) -> None:
                counts = {split: len(records) for split, records in listing.splits.items()}
                trainer.config, shared = world.from_main(lambda: (refit_after_stage1(
                    trainer.config, budget, counts, time.perf_counter() - run_started,
                    stage1["feature_images_per_s"]), budget))
                budget.update(shared)  # every rank plans with rank 0's record
                trainer.deadline = run_started + budget["stage2_deadline_seconds"]
                steps_per_epoch = -(-len(listing.splits["train"]) // int(trainer.config.train.batch_size))
                trainer.refit_steps = lambda done, step_seconds, overhead: world.from_main(
                    lambda: refit_during_stage2(trainer.config, budget, time.perf_counter() - run_started, done,
                                                step_seconds, overhead, steps_per_epoch))
        with progress() as bar:
            training = run_recipe(trainer, recipe, listing, bar, replan)
        config = trainer.config
        if budget is not None and budget.get("refits"):  # the schedule that ran, refitted epoch by epoch
            ran = sum(1 for entry in trainer.history if entry["stage"] == 2)
            config = config.with_(max_steps=budget["refits"][-1]["total_steps"], epochs_finetune=ran)
        training["image_cache"] = images.record
        if budget is not None:
            budget["stopped_at_deadline"] = trainer.stopped_at_deadline
        result = trainer.result()
        train_seconds = time.perf_counter() - started
        if budget is not None:
            training["time_budget"] = budget
        metrics = {}
        for split in ("val", "test"):
            if not listing.splits[split]:  # validation put back into train: nothing to run
                metrics[split] = split_metrics([[0] * len(listing.classes) for _ in listing.classes], listing.classes)
                continue
            found = backend.evaluate(result.model, config, listing, preprocess, split, world=world, images=images)
            listing.drop(found["decode_failures"])
            metrics[split] = split_metrics(found["confusion_matrix"], listing.classes)
        checkpoint = run_dir / "checkpoint"
        if budget is not None:
            budget["run_seconds_before_write"] = round(time.perf_counter() - run_started, 1)
        if world.is_main:
            _write_checkpoint(checkpoint, backend, config, listing, preprocess, result, training, recipe, metrics,
                              train_seconds)
        elif getattr(world, "save_on_every_worker", False):
            # tf.distribute reads mirrored variables with collectives: every worker saves, the others elsewhere
            with tempfile.TemporaryDirectory(prefix="edgetl-worker-") as scratch:
                backend.save_weights(result.model, Path(scratch) / backend.WEIGHTS_FILE)
        world.barrier()  # no rank returns before the checkpoint exists
    return checkpoint


def _fit_budget(trainer: TimedTrainer, recipe: Plan, listing: DatasetListing, run_started: float,
                candidates: tuple[int, ...], world) -> tuple[Plan, dict]:
    """Time real steps, then fit the stage-2 schedule (and a measured input size) to --time-budget."""
    with console.status("timing a few training steps for the time budget"):
        measured = trainer.measure_speed()
    speed = Speed(recipe.config.model.image_size, measured["forward_images_per_s"], measured["train_images_per_s"],
                  measured["seconds"])
    counts = {split: len(records) for split, records in listing.splits.items()}
    elapsed = time.perf_counter() - run_started
    fitted, record = world.from_main(lambda: fit_to_budget(recipe, counts, speed, elapsed, candidates))
    console.print(f"time budget {fitted.choices['time_budget'].why}")
    return fitted, record


def open_images(stack: contextlib.ExitStack, listing: DatasetListing, image_size: int, run_dir: Path, world,
                reuse: ImageCache | None = None) -> ImageCache:
    """Decode every image of `listing` once into a cache that lives as long as `stack` (see edgetl.imagecache).

    Processes of one run on one machine build one shared cache, each decoding its share; across machines
    each process keeps its own.
    """
    rels = sorted({rel for records in listing.splits.values() for rel, _ in records})
    env = world_from_env()
    shared = env.size > 1 and env.local_size == env.size
    share = Share(env.local_rank, env.local_size) if shared else Share()
    side = cache_side(image_size)
    with progress() as bar:
        task = bar.add_task(f"decoding {len(rels)} images once (each side at most {side} px)", total=len(rels),
                            status="")
        images = stack.enter_context(open_cache(
            listing.root, rels, side, run_dir, share=share, sync=world.from_main if shared else None,
            merge=world.merge if shared else None, reuse=reuse, progress=lambda done: bar.advance(task, done)))
    return images


def _listing_and_folder(config: FinetuneConfig) -> tuple[DatasetListing, dict]:
    listing, folded = fold_small_validation(load_listing(config))
    folder = describe_folder(listing, config.train.seed)
    if folded:
        folder["validation_folded"] = folded
    return listing, folder


def measure_sizes(backend: FinetuneBackend, config: FinetuneConfig, listing: DatasetListing,
                  sizes: tuple[int, ...], initial, world, images=None,
                  sample: DatasetListing | None = None) -> dict | None:
    """The probe's cross-validated log loss (and its standard error) at each input size, on a sample.

    Every rank extracts its shard of the sample's features; rank 0 fits the probes. None when the sample
    cannot be cross-validated (a class with a single image).
    """
    seed = config.train.seed
    sample = sample or search_sample(listing, seed)
    started = time.perf_counter()
    losses: dict[int, tuple[float, float]] = {}
    with progress() as bar:
        for size in sizes:
            sized = config.with_(image_size=size, batch_size=config.train.batch_size or SEARCH_BATCH)
            trainer = backend.Trainer(sized, sample, backend.preprocess_spec(sized), initial, world, images=images)
            x, y = trainer.extract_features("train", bar)
            with console.status(f"input size {size} px: probe on {len(y)} sampled training images"):
                record = world.from_main(lambda x=x, y=y: fit_probe(x, y, len(listing.classes), seed).record)
            if record["cv_best_log_loss"] is None:
                return None
            losses[size] = (record["cv_best_log_loss"], record["cv_best_log_loss_se"])
    return {"cv_log_loss": losses, "sample_images": len(sample.splits["train"]),
            "seconds": round(time.perf_counter() - started, 1)}


def split_metrics(confusion: list[list[int]], classes: list[str]) -> dict:
    """Top-1 with its 95% Wilson interval, per-class and balanced accuracy, from a confusion matrix."""
    correct = sum(confusion[i][i] for i in range(len(classes)))
    total = sum(map(sum, confusion))
    per_class = {name: round(confusion[i][i] / sum(confusion[i]), 5) if sum(confusion[i]) else None
                 for i, name in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    low, high = wilson_interval(correct, total)
    return {  # an empty split (validation put back into train) has no top-1 to state
        "top1": round(correct / total, 5) if total else None,
        "top1_ci95": [round(low, 5), round(high, 5)] if total else None,
        "images": int(total),
        "balanced_top1": round(sum(present) / len(present), 5) if present else None,
        "per_class_top1": per_class,
        "confusion_matrix": confusion,
    }


def _write_checkpoint(checkpoint: Path, backend: FinetuneBackend, config: FinetuneConfig,
                      listing: DatasetListing, preprocess: dict, result, training: dict, recipe: Plan,
                      metrics: dict, train_seconds: float) -> None:
    needed = int(backend.describe(result.model).get("parameters", 0)) * 4 + 2**20  # fp32 weights, the small files
    with room_for(checkpoint.parent, "the checkpoint", needed), atomic_dir(checkpoint) as tmp:
        backend.save_weights(result.model, tmp / backend.WEIGHTS_FILE)
        write_labels(tmp / "labels.txt", listing.classes)
        write_json(tmp / "history.json", result.history)
        write_json(tmp / "splits.json", listing.to_json())
        manifest = {
            "kind": CHECKPOINT_KIND,
            "schema_version": SCHEMA_VERSION,
            "created": now_utc(),
            "framework": config.model.framework,
            "weights_file": backend.WEIGHTS_FILE,
            "weights_sha256": sha256_file(tmp / backend.WEIGHTS_FILE),
            "model": {
                "backbone": config.model.backbone,
                "width": config.model.width,
                "image_size": config.model.image_size,
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
                "warnings": listing.warnings,
                "ignored_count": len(listing.ignored),
                "ignored": listing.ignored,
            },
            "config": config.to_json(),
            "recipe": recipe.to_json(),
            "training": {
                "device": result.device,
                "stage1": training["stage1"],
                "best": training["selection"],
                "throughput": training["throughput"],
                "image_cache": training["image_cache"],
                **({"time_budget": training["time_budget"]} if "time_budget" in training else {}),
                "seconds": round(train_seconds, 1),
            },
            "metrics": metrics,
            "versions": library_versions(backend.LIBRARIES),
        }
        write_json(tmp / "manifest.json", manifest)
    _print_summary(manifest, checkpoint)


def _print_summary(manifest: dict, checkpoint: Path) -> None:
    table = Table(title=f"fine-tuned {manifest['model']['backbone']} @ {manifest['model']['image_size']} px")
    for column in ("split", "images", "top-1", "95% interval", "balanced top-1"):
        table.add_column(column, justify="right" if column != "split" else "left")
    for split, figures in manifest["metrics"].items():
        if not figures["images"]:
            table.add_row(split, "0", "—", "—", "—")
            continue
        low, high = figures["top1_ci95"]
        balanced = figures["balanced_top1"]
        table.add_row(split, str(figures["images"]), f"{100 * figures['top1']:.1f}%",
                      f"{100 * low:.1f}–{100 * high:.1f}%", "" if balanced is None else f"{100 * balanced:.1f}%")
    stdout.print(table)
    training = manifest["training"]
    best = training["best"]
    kept = "the stage-1 probe" if best["stage"] == 1 else f"stage 2 epoch {best['epoch']}"
    stdout.print(f"kept weights: {kept} (rule: {best['rule']}); trained in {training['seconds']:.0f} s "
                 f"on {training['device']['type']}; checkpoint: {checkpoint}")
    skipped = manifest["data"]["skipped_count"]  # listing and decoding together: the manifest's own count
    if skipped:
        final = ", ".join(f"{split} {sum(per.values())}" for split, per in manifest["data"]["counts"].items())
        stdout.print(f"skipped {skipped} file(s) in all (listed in manifest.json → data.skipped); images used: "
                     f"{final}")
