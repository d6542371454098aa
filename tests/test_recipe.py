"""The transfer-learning recipe's parts: the converged probe, frozen BatchNorm, batch-independent features,
the model-selection rule, the settings fitted to the folder, and the confidence interval of top-1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.config import FinetuneConfig
from edgetl.data import DatasetListing, scan_folder
from edgetl.probe import STD_FLOOR, fit_probe
from edgetl.recipe import (
    IMBALANCE_RATIO,
    MIN_STAGE2_STEPS,
    SEARCH_PER_CLASS,
    SIZE_CANDIDATES,
    fold_small_validation,
    pick_size,
    plan,
    search_sample,
    size_candidates,
)
from edgetl.selection import LARGE_VALIDATION, SMALL_VALIDATION, Selector
from edgetl.stats import half_width, wilson_interval

# ------------------------------------------------------------ Wilson interval


def test_wilson_interval_matches_published_values() -> None:
    low, high = wilson_interval(8, 10)  # Newcombe (1998), table I: 0.4902 to 0.9433
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert half_width(1000) < 0.032 < half_width(100)


# ------------------------------------------------------------ the probe


def _blobs(n_per_class: int, classes: int, dim: int = 20, seed: int = 0, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, spread, (len(y), dim)) + 5.0  # offset: the folding of the standardisation matters
    return x.astype(np.float32) * rng.uniform(0.1, 10, dim).astype(np.float32), y


def _standardised(x: np.ndarray) -> np.ndarray:
    """The probe's documented scaling: centred, each feature divided by its spread, floored at STD_FLOOR of
    the root-mean-square spread."""
    x64 = x.astype(np.float64)
    spread = x64.std(0)
    return (x64 - x64.mean(0)) / np.maximum(spread, STD_FLOOR * np.sqrt((spread**2).mean()))


def test_probe_folds_standardisation_into_the_head_and_matches_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(30, 4, spread=3.0)
    head = fit_probe(x, y, 4, seed=0)
    assert head.record["converged"] and head.record["folds"] == 5
    assert (x.std(0) < STD_FLOOR * np.sqrt((x.std(0) ** 2).mean())).any()  # scales span 100x: some are floored
    standard = _standardised(x)
    reference = LogisticRegression(C=head.record["C"], tol=1e-8, max_iter=5000).fit(standard, y)
    logits = head.logits(x.astype(np.float64))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, reference.predict_proba(standard), atol=2e-3)


def test_a_nearly_constant_feature_does_not_dominate_the_head() -> None:
    """A channel that barely moves but follows the label would get a weight hundreds of times the others
    under plain standardisation; int8's per-row scale would then round the rest of the row away."""
    x, y = _blobs(40, 3, spread=3.0)
    x = x / x.std(0)  # every feature on one scale ...
    x[:, 0] = 1e-3 * (y == 1) + 1e-4 * np.random.default_rng(1).normal(size=len(y))  # ... but this one
    weight = np.abs(fit_probe(x, y, 3, seed=0).weight)
    assert weight.max() / weight.mean() < 1 / STD_FLOOR * 10


def test_probe_two_classes_gives_a_softmax_head_equal_to_the_sigmoid() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(25, 2, spread=4.0, seed=3)
    head = fit_probe(x, y, 2)
    assert head.weight.shape == (2, x.shape[1])
    standard = _standardised(x)
    reference = LogisticRegression(C=head.record["C"], tol=1e-8, max_iter=5000).fit(standard, y)
    logits = head.logits(x.astype(np.float64))
    p1 = 1 / (1 + np.exp(logits[:, 0] - logits[:, 1]))
    np.testing.assert_allclose(p1, reference.predict_proba(standard)[:, 1], atol=2e-3)


def test_probe_choice_of_penalty_uses_the_training_data_only() -> None:
    x, y = _blobs(40, 3, spread=6.0, seed=1)
    first = fit_probe(x, y, 3, seed=0)
    assert first.record["rule"].startswith("5-fold stratified cross-validation on the training features")
    assert len(first.record["cv_log_loss"]) == len(first.record["grid"]) and first.record["C"] in first.record["grid"]
    # a noisier problem needs a stronger penalty than a clean one
    clean = fit_probe(*_blobs(40, 3, spread=0.5, seed=1), 3, seed=0)
    assert first.record["C"] <= clean.record["C"]


def test_probe_with_a_single_image_class_still_fits_and_says_why() -> None:
    x, y = _blobs(6, 3, seed=2)
    keep = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:1]])
    head = fit_probe(x[keep], y[keep], 3)
    assert head.record["folds"] == 0 and "single training image" in head.record["rule"]
    assert (head.logits(x[keep]).argmax(1) == y[keep]).mean() >= 0.9


def test_balanced_probe_weights_the_small_class() -> None:
    x, y = _blobs(60, 2, spread=5.0, seed=4)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:8]])
    plain = fit_probe(x[keep], y[keep], 2)
    balanced = fit_probe(x[keep], y[keep], 2, balance=True)
    # the minority class gets more of the decision region: recall on fresh minority images does not drop
    fresh, fresh_y = _blobs(60, 2, spread=5.0, seed=4)
    minority = fresh[fresh_y == 1]
    assert (balanced.logits(minority).argmax(1) == 1).mean() >= (plain.logits(minority).argmax(1) == 1).mean()
    assert balanced.record["balanced_class_weights"] is True


# ------------------------------------------------------------ the selection rule


def test_small_validation_keeps_the_end_of_schedule_over_an_earlier_tie_or_noise() -> None:
    selector = Selector(val_images=SMALL_VALIDATION + 6)
    selector.offer(1, 1, 0.40, 0.9375, lambda: "probe")
    selector.offer(2, 1, 0.35, 1.0, lambda: "epoch 1")
    selector.offer(2, 2, 0.30, 0.9375, lambda: "epoch 2")
    chosen = selector.chosen()
    assert (chosen.stage, chosen.epoch, chosen.state) == (2, 2, "epoch 2")
    record = selector.record()
    assert record["rule"] == "end_of_schedule" and f"{SMALL_VALIDATION + 6} images" in record["why"]
    assert len(record["candidates"]) == 3


def test_small_validation_keeps_the_probe_only_when_it_wins_on_loss_and_top1() -> None:
    selector = Selector(val_images=SMALL_VALIDATION + 10)
    selector.offer(1, 1, 0.30, 0.95, lambda: "probe")
    selector.offer(2, 4, 0.50, 0.95, lambda: "stage 2")
    assert selector.chosen().state == "stage 2"  # a tie on top-1 never keeps the earlier model
    selector = Selector(val_images=SMALL_VALIDATION + 10)
    selector.offer(1, 1, 0.30, 0.95, lambda: "probe")
    selector.offer(2, 4, 0.90, 0.70, lambda: "stage 2")
    assert selector.chosen().state == "probe"


def test_tiny_validation_never_ranks_the_probe_above_stage_2() -> None:
    """Two validation images decided a two-class folder's run for the probe; below a few dozen only the
    schedule decides, and the probe is kept only when stage 2 did not run."""
    selector = Selector(val_images=2)
    selector.offer(1, 1, 0.10, 1.0, lambda: "probe")
    selector.offer(2, 9, 0.90, 0.5, lambda: "stage 2")
    assert selector.chosen().state == "stage 2"
    record = selector.record()
    assert record["rule"] == "end_of_schedule_only" and "2 images" in record["why"]
    alone = Selector(val_images=2)
    alone.offer(1, 1, 0.10, 1.0, lambda: "probe")
    assert alone.chosen().state == "probe"


def test_large_validation_takes_the_best_top1_ties_to_lower_loss_then_later() -> None:
    selector = Selector(val_images=LARGE_VALIDATION)
    selector.offer(1, 1, 0.50, 0.86, lambda: "probe")
    selector.offer(2, 1, 0.45, 0.88, lambda: "e1")
    selector.offer(2, 2, 0.40, 0.88, lambda: "e2")
    selector.offer(2, 3, 0.40, 0.88, lambda: "e3")
    selector.offer(2, 4, 0.30, 0.87, lambda: "e4")
    assert selector.chosen().state == "e3" and selector.record()["rule"] == "val_top1"


# ------------------------------------------------------------ the settings fitted to the folder


def _images(root: Path, per_class: dict[str, int], size: int = 24) -> None:
    for index, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size, size), (40 * index, i % 255, 90)).save(root / name / f"{i}.png")


def _folder(root: Path, per_class: dict[str, int], size: int = 24) -> DatasetListing:
    _images(root, per_class, size)
    return scan_folder(root)


def test_plan_for_small_images_and_few_of_them(tmp_path: Path) -> None:
    listing = _folder(tmp_path / "d", {"a": 12, "b": 12}, size=25)
    config = FinetuneConfig.of(data=str(tmp_path / "d"))
    folder = plan(config, listing).folder
    assert size_candidates(config, folder, any_size_features=True) == SIZE_CANDIDATES
    measured = {128: (0.60, 0.05), 160: (0.50, 0.04), 224: (0.47, 0.05)}
    result = plan(config, listing, measured_sizes=measured, folder=folder)
    chosen = result.config
    # 160 px is within one standard error of 224 px's loss: the smaller input wins
    assert chosen.model.image_size == 160 and result.choices["image_size"].source == "auto"
    assert "25 px" in result.choices["image_size"].why and "224 px 0.470" in result.choices["image_size"].why
    n_train = len(listing.splits["train"])
    assert chosen.train.batch_size == 8 and chosen.train.unfreeze == -1
    assert chosen.train.epochs_finetune * math.ceil(n_train / chosen.train.batch_size) >= MIN_STAGE2_STEPS
    assert chosen.dataset.class_weights == "none" and result.choices["selection"].value == "end_of_schedule_only"
    assert any("test split has" in note for note in result.warnings)
    stored = json.loads(json.dumps(result.to_json()))
    assert stored["choices"]["image_size"]["value"] == 160
    assert stored["folder"]["source_size"]["median_short_side"] == 25
    unmeasured = plan(config, listing)  # a sample that cannot be cross-validated: the backbone's own input
    assert unmeasured.config.model.image_size == 224


def test_a_tiny_carved_validation_split_trains_instead_and_a_given_one_stays(tmp_path: Path) -> None:
    listing = _folder(tmp_path / "d", {"a": 12, "b": 12})
    assert 0 < len(listing.splits["val"]) < SMALL_VALIDATION
    folded, note = fold_small_validation(listing)
    assert folded.splits["val"] == [] and note == {"folded_images": len(listing.splits["val"]),
                                                   "threshold": SMALL_VALIDATION}
    assert sorted(folded.splits["train"]) == sorted(listing.splits["train"] + listing.splits["val"])
    assert folded.splits["test"] == listing.splits["test"] and "put back into train" in folded.split_origin
    folder = plan(FinetuneConfig.of(data="x"), folded).folder
    folder["validation_folded"] = note
    result = plan(FinetuneConfig.of(data="x"), folded, folder=folder)
    assert "too few to rank models" in result.choices["validation"].why
    assert result.choices["selection"].value == "end_of_schedule_only"
    large = _folder(tmp_path / "big", {"a": 200, "b": 200}, size=8)
    assert fold_small_validation(large)[1] is None  # 40 carved images rank models: kept
    given = tmp_path / "given"
    for split, count in (("train", 12), ("val", 2)):
        _images(given / split, {"a": count, "b": count})
    kept = scan_folder(given)
    assert len(kept.splits["val"]) == 4 and fold_small_validation(kept)[1] is None


def test_input_size_is_measured_only_where_it_can_be(tmp_path: Path) -> None:
    listing = _folder(tmp_path / "d", {"a": 12, "b": 12}, size=25)
    folder = plan(FinetuneConfig.of(data=str(tmp_path / "d")), listing).folder
    for config, any_size in ((FinetuneConfig.of(data="x", image_size=96), True), (FinetuneConfig.of(data="x"), False),
                             (FinetuneConfig.of(data="x", weights="none"), True)):
        assert size_candidates(config, folder, any_size) == ()
    photos = _folder(tmp_path / "p", {"a": 3, "b": 3}, size=300)
    assert size_candidates(FinetuneConfig.of(data="x"), plan(FinetuneConfig.of(data="x"), photos).folder, True) == ()
    assert pick_size({128: (0.3, 0.01), 224: (0.5, 0.01)}) == 128
    assert pick_size({128: (0.9, 0.01), 160: (0.6, 0.01), 224: (0.5, 0.2)}) == 160


def test_the_size_search_sample_is_stratified_and_bounded(tmp_path: Path) -> None:
    listing = _folder(tmp_path / "d", {"a": 120, "b": 9})
    sample = search_sample(listing, seed=0)
    labels = [label for _, label in sample.splits["train"]]
    counts = listing.counts()["train"]
    assert labels.count(0) == SEARCH_PER_CLASS and labels.count(1) == counts["b"]
    assert set(sample.splits["train"]) <= set(listing.splits["train"])
    assert sample.splits["val"] == [] and search_sample(listing, seed=0).splits == sample.splits


def test_plan_keeps_flags_and_uses_the_backbone_input_for_photos(tmp_path: Path) -> None:
    listing = _folder(tmp_path / "d", {"a": 10, "b": 10}, size=300)
    auto = plan(FinetuneConfig.of(data=str(tmp_path / "d")), listing)
    assert auto.config.model.image_size == 224
    given = plan(FinetuneConfig.of(data=str(tmp_path / "d"), image_size=96, batch_size=4, epochs_finetune=2, unfreeze=3,
                                class_weights="balanced"), listing)
    train = given.config.train
    assert (given.config.model.image_size, train.batch_size, train.epochs_finetune, train.unfreeze,
            given.config.dataset.class_weights) == (96, 4, 2, 3, "balanced")
    assert all(given.choices[k].source == "flag" for k in ("image_size", "batch_size", "epochs_finetune", "unfreeze"))


def test_plan_weights_unbalanced_classes_and_divides_the_batch_over_processes(tmp_path: Path) -> None:
    listing = _folder(tmp_path / "d", {"a": 60, "b": 12})
    counts = listing.counts()["train"]
    assert counts["a"] / counts["b"] >= IMBALANCE_RATIO
    result = plan(FinetuneConfig.of(data=str(tmp_path / "d")), listing, processes=3)
    assert result.config.dataset.class_weights == "balanced" and "unbalanced" in result.choices["class_weights"].why
    assert result.config.train.batch_size % 3 == 0


# ------------------------------------------------------------ frozen BatchNorm and batch-independent features


@pytest.fixture(scope="module")
def tiny_trainer(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path):
    import os

    os.environ["EDGETL_CACHE"] = str(shared_cache)
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    from edgetl.backends.torch import finetune as backend
    from edgetl.datasets import resolve_builtin

    listing = scan_folder(resolve_builtin("builtin:shapes"))
    config = FinetuneConfig.of(data="builtin:shapes", image_size=32, batch_size=16, epochs_finetune=1,
                            unfreeze=-1).validate()
    spec = backend.preprocess_spec(config)
    trainer = backend.Trainer(config, listing, spec, backend.build_initial_model(config))
    return backend, trainer


def test_cached_feature_does_not_depend_on_the_rest_of_its_batch(tiny_trainer) -> None:
    from rich.progress import Progress

    _, trainer = tiny_trainer
    with Progress(disable=True) as bar:
        features, labels = trainer.extract_features("val", bar)
        records = trainer.listing.splits["val"]
        trainer.listing.splits["val"] = records[::-1]  # other neighbours, other batch boundaries
        trainer.config = trainer.config.with_(batch_size=5)
        reversed_features, reversed_labels = trainer.extract_features("val", bar)
        trainer.listing.splits["val"] = records
    np.testing.assert_array_equal(reversed_labels[::-1], labels)
    np.testing.assert_allclose(reversed_features[::-1], features, rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_are_bit_identical_through_both_stages(tmp_path: Path) -> None:
    import torch

    from edgetl.backends.torch import finetune as backend
    from edgetl.finetune import run_finetune

    config = FinetuneConfig.of(data="builtin:shapes", image_size=32, epochs_finetune=2, unfreeze=-1)
    pretrained, _ = backend.build_initial_model(config.validate())
    before = backend.batchnorm_buffers(pretrained)
    checkpoint = run_finetune(config, tmp_path / "run")
    saved = torch.load(checkpoint / "model.pt")
    assert before and {k for k in before} <= set(saved)
    for key, value in before.items():
        assert torch.equal(saved[key], value), key
    history = json.loads((checkpoint / "history.json").read_text())
    assert [h["stage"] for h in history] == [1, 2, 2]  # both stages ran


def test_a_from_scratch_backbone_updates_its_batchnorm_statistics_in_stage_2(tmp_path: Path) -> None:
    """Statistics estimated on the randomly initialised backbone go stale as its weights train: frozen, they let
    activations grow hundreds of times their mean (a from-scratch MobileNetV3-Large reached 1061 against a mean of
    5.9, which per-tensor int8 cannot hold). So only pretrained statistics stay frozen."""
    import torch

    from edgetl.backends.torch import finetune as backend
    from edgetl.datasets import resolve_builtin
    from edgetl.finetune import run_finetune

    config = FinetuneConfig.of(data="builtin:shapes", image_size=32, epochs_finetune=1, weights="none",
                            backbone="mobilenet_v2", width=0.35, seed=3, batch_size=16)
    listing = scan_folder(resolve_builtin("builtin:shapes"))
    trainer = backend.Trainer(config.validate(), listing, backend.preprocess_spec(config.validate()),
                              backend.build_initial_model(config.validate()))
    estimated = backend.batchnorm_buffers(trainer.model)  # what stage 2 starts from (the same seed, the same images)
    saved = torch.load(run_finetune(config, tmp_path / "run") / "model.pt")
    means = [key for key in estimated if key.endswith("running_mean")]
    moved = [key for key in means if not torch.equal(saved[key], estimated[key])]
    assert len(moved) == len(means) > 10


# ------------------------------------------------------------ stage 1 is a converged linear probe


@pytest.mark.slow
def test_stage1_alone_matches_a_converged_logistic_regression_on_builtin_data(tmp_path: Path) -> None:
    _stage1_against_reference(tmp_path, image_size=64)


def test_stage1_alone_matches_a_converged_logistic_regression_small(tmp_path: Path) -> None:
    _stage1_against_reference(tmp_path, image_size=32)


def _stage1_against_reference(tmp_path: Path, image_size: int) -> None:
    """--epochs-finetune 0 on builtin:fashion-mnist-mini is at least a full-batch L-BFGS logistic regression on
    the same cached features (best of a penalty grid, chosen on the test split: an oracle), within one point."""
    import torch
    from rich.progress import Progress

    from edgetl.backends.torch import finetune as backend
    from edgetl.finetune import run_finetune

    checkpoint = run_finetune(FinetuneConfig.of(data="builtin:fashion-mnist-mini", image_size=image_size,
                                             epochs_finetune=0), tmp_path / "run")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    top1 = manifest["metrics"]["test"]["top1"]
    assert manifest["training"]["best"]["stage"] == 1 and manifest["training"]["stage1"]["converged"]

    listing = DatasetListing.from_json(json.loads((checkpoint / "splits.json").read_text()))
    config = FinetuneConfig.from_json(manifest["config"])
    trainer = backend.Trainer(config, listing, manifest["preprocess"], backend.build_initial_model(config))
    with Progress(disable=True) as bar:
        x_train, y_train = trainer.extract_features("train", bar)
        x_test, y_test = trainer.extract_features("test", bar)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = torch.from_numpy((x_train - mean) / std), torch.from_numpy((x_test - mean) / std)
    ya = torch.from_numpy(y_train)
    best = 0.0
    for l2 in (1e-2, 3e-2, 1e-1):  # per image; the probe's grid spans 1/(0.3 n) to 1/(300 n)
        weight = torch.zeros(a.shape[1], 10, requires_grad=True)
        bias = torch.zeros(10, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, tolerance_grad=1e-7, tolerance_change=1e-10,
                                      history_size=20, line_search_fn="strong_wolfe")

        def closure(weight=weight, bias=bias, optimizer=optimizer, l2=l2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(a @ weight + bias, ya) + 0.5 * l2 * (weight * weight).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            best = max(best, float(((b @ weight + bias).argmax(1).numpy() == y_test).mean()))
    assert top1 >= best - 0.01, (top1, best)


@pytest.mark.torch
def test_finetune_measures_the_input_size_of_small_images(tmp_path: Path, shared_cache: Path) -> None:
    """Tiny images and pretrained features (here a weights file): the run measures every candidate size on
    a sample, keeps the one the rule picks, says so in the plan and stores the measurement."""
    import os

    import torch

    from edgetl.backends.torch.models import build_model
    from edgetl.finetune import run_finetune

    os.environ["EDGETL_CACHE"] = str(shared_cache)
    weights = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_v2", 0.35, num_classes=1000).state_dict(), weights)
    _folder(tmp_path / "d", {"a": 10, "b": 10}, size=20)
    config = FinetuneConfig.of(data=str(tmp_path / "d"), backbone="mobilenet_v2", width=0.35, weights=str(weights),
                            epochs_finetune=0, seed=0)
    manifest = json.loads((run_finetune(config, tmp_path / "run") / "manifest.json").read_text())
    search = manifest["recipe"]["folder"]["size_search"]
    measured = {int(size): tuple(pair) for size, pair in search["cv_log_loss"].items()}
    assert sorted(measured) == list(SIZE_CANDIDATES)
    assert search["sample_images"] == manifest["data"]["counts"]["train"]["a"] * 2  # fewer than the sample bound
    # 20 images: the one carved validation image a class trains instead, and the manifest says so
    assert manifest["data"]["counts"]["val"] == {"a": 0, "b": 0} and manifest["metrics"]["val"]["top1"] is None
    assert "validation" in manifest["recipe"]["choices"]
    chosen = pick_size(measured)
    assert manifest["model"]["image_size"] == chosen == manifest["config"]["model"]["image_size"]
    assert manifest["recipe"]["choices"]["image_size"]["source"] == "auto"
    assert manifest["preprocess"]["resize"]["height"] == manifest["preprocess"]["resize"]["width"] == chosen


# ------------------------------------------------------------ recipe files: every value of its declared type

# (recipe kind, key, value as written in the TOML file, words of the type wanted)
WRONG_TYPES = [
    ("export", "calib", '"many"', "a whole number"),
    ("export", "max_drop", '"x"', "a number"),
    ("export", "formats", "5", "a list of texts"),
    ("export", "threads", '"two"', "a whole number"),
    ("sweep", "iters", '"many"', "a whole number"),
    ("sweep", "max_drop", "[1]", "a number"),
    ("export", "seed", "1.5", "a whole number"),
    ("export", "parts", '"yes"', "true or false"),
    ("export", "quant", "[1]", "a list of texts"),
]


@pytest.mark.parametrize(("kind", "key", "value", "wanted"), WRONG_TYPES,
                         ids=[f"{kind}-{key}" for kind, key, _, _ in WRONG_TYPES])
def test_a_recipe_value_of_the_wrong_type_is_one_line_naming_key_value_and_type(
        tmp_path: Path, kind: str, key: str, value: str, wanted: str) -> None:
    from tests.conftest import run_cli

    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'description = "a recipe with one wrong value"\n{key} = {value}\n')
    result = run_cli(kind, str(tmp_path / "checkpoint"), "--recipe", str(recipe))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("edgetl: error:"), lines[0]
    assert f"{key} = {value}" in lines[0] and f"valid: {wanted}" in lines[0] and str(recipe) in lines[0], lines[0]


def test_every_config_field_is_checked_against_its_type_hint() -> None:
    """The check reads the dataclasses' hints, so a field added later is covered without a new special case."""
    from edgetl.config import BenchOptions, BundleOptions, ExportConfig, SweepConfig
    from edgetl.errors import UserError

    refused = [
        (ExportConfig.of(rounding_layers=True), "rounding_layers = true", "a whole number"),  # bool is not int
        (ExportConfig.of(float_layers=("a", 2)), 'float_layers = ["a", 2]', "a list of texts"),
        (ExportConfig.of(prune=[0.5]), "prune = [0.5]", "a text or a number"),
        (ExportConfig.of(recovery_lr="fast"), 'recovery_lr = "fast"', "a number"),
        (SweepConfig.of(threads=(1, 2.0)), "threads = [1, 2.0]", "a list of whole numbers"),
        (SweepConfig.of(breakdown=1), "breakdown = 1", "true or false"),
        (BenchOptions(iters=2.5), "iters = 2.5", "a whole number"),
        (BundleOptions(golden="5"), 'golden = "5"', "a whole number"),
        (FinetuneConfig.of(data="x", seed=1.0), "seed = 1.0", "a whole number"),
        (FinetuneConfig.of(data="x", master="a", master_timeout=[]), "master_timeout = []", "a number"),
    ]
    for config, shown, wanted in refused:
        with pytest.raises(UserError) as caught:
            config.validate()
        message = str(caught.value)
        assert shown in message and f"valid: {wanted}" in message and "\n" not in message, message
    with pytest.raises(UserError, match="--seed -1 is not usable"):
        FinetuneConfig.of(data="x", weights="none", seed=-1).validate()
    # int where a float is wanted, None where the hint allows it, a comma-separated text for a list
    loose = ExportConfig.of(max_drop=2, threads=None, formats="tflite", sensitivity_seconds=0).validate()
    assert loose.policy.max_drop == 2
    assert SweepConfig.of(threads="2,1", targets="host").validate().bench.threads == (2, 1)


def test_every_shipped_recipe_loads_and_validates() -> None:
    from edgetl.config import ExportConfig, SweepConfig, load_recipe, recipe_names, resolve

    assert len(recipe_names("export")) >= 10 and len(recipe_names("sweep")) >= 2
    for kind, config_type in (("export", ExportConfig), ("sweep", SweepConfig)):
        for name in recipe_names(kind):
            assert load_recipe(name, kind), name
            config = resolve(kind, name)
            assert isinstance(config, config_type) and config.recipe == name


@pytest.mark.parametrize(("kind", "text", "needle"), [
    ("export", 'colour = "red"\n', "unknown key(s) colour"),
    ("sweep", '[variant.x]\nquant = ["int8"]\ncolour = 1\n', "variant 'x' sets unknown key(s) colour"),
    ("sweep", '[variant.x]\nquant = ["int8"]\ncalib = "many"\n', 'variant.x.calib = "many"'),
    ("sweep", "variant = 5\n", "variant = 5"),
    ("sweep", '[variant.x]\nquant = 3\n', "variant.x.quant = 3"),
    ("export", 'description = 4\nquant = ["int8"]\n', "description = 4"),
    ("export", "calib = 1e400\n", "calib = Infinity"),
    ("export", "calib = " + "9" * 5000 + "\n", "not valid TOML"),
    ("export", "formats = " + "[" * 3000 + "]" * 3000 + "\n", "nests too deeply"),
    ("export", '"a\\nb" = 1\n', 'unknown key(s) "a\\nb"'),  # a quoted key may hold any character
    ("export", "seed = -1\n", "--seed -1 is not usable; valid: 0 to 4294967295"),  # numpy would refuse it later
    ("export", "threads = 100000000000\n", "--threads 100000000000 is not usable; valid: 1 to 1024"),
    ("sweep", "threads = [1, 100000]\n", "1 to 1024"),
])
def test_a_bad_recipe_file_is_one_line(tmp_path: Path, kind: str, text: str, needle: str) -> None:
    from edgetl.config import resolve
    from edgetl.errors import UserError

    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(UserError) as caught:
        resolve(kind, str(recipe))
    assert needle in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    recipe.write_bytes(b'quant = ["\xff"]\n')  # not UTF-8
    with pytest.raises(UserError, match="not UTF-8"):
        resolve(kind, str(recipe))
