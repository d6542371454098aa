"""Stage 1 of the recipe: a linear probe fitted to convergence on cached backbone features.

Framework-free (numpy + scikit-learn), so both backends get the same head from the same features. The
features are standardised, an L2-regularised multinomial logistic regression is solved with L-BFGS to
its tolerance (not for a number of epochs), and the regularisation strength is chosen by stratified
cross-validation on the training features alone — the validation split stays untouched for choosing
between stages. The standardisation is folded into the returned weights, so the head applies them to
raw features.

The search is built to cost seconds on a busy machine as on a quiet one. Each fold walks the penalty path
from the strongest penalty to the weakest, starting every solve from the previous strength's solution,
and the final fit starts from the folds' mean solution at the chosen strength. BLAS runs single-threaded:
the products of an L-BFGS step are thin (images × features × classes), little work to share between
threads, and where the cores are busy with other work BLAS threads wait on each other at every product
(one fold's fit on 1800 × 1280 features took 0.4-0.7 s with one BLAS thread and 8-11 s with two on a
2-core host at load 6). The cores are used instead by solving the folds side by side, at most one solver
per usable core; the result is the same whatever their number.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgetl.machine import usable_cores

# Inverse L2 strengths tried, as multiples of 1 / n_train (so the grid means the same penalty per
# image whatever the folder's size): from a strongly regularised head to a nearly free one.
C_GRID_PER_IMAGE = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
MAX_ITER = 2000  # L-BFGS iterations; a standardised probe converges in a few hundred
CV_TOL, FINAL_TOL = 1e-4, 1e-6  # the search needs the ranking of the strengths; the kept head, convergence
MAX_FOLDS = 5  # 3 once there are 1000 training images: the fold means are tight by then
CV_IMAGES = 6000  # cross-validation on at most this many training images (the final fit uses them all)
# The smallest scale a feature gets, as a fraction of the root-mean-square spread of all features. Measured
# 2026-12-01 on Fashion-MNIST-mini features at 128 px (EfficientNet-Lite0): test top-1 86.3% with plain
# standardisation and 86.2% with this floor, while the largest head weight over the mean one fell from
# 259 to 11 (a fifth of the int8 rounding step per weight it had).
STD_FLOOR = 0.3


@dataclass
class Probe:
    """A fitted head: logits = features @ weight.T + bias, and how it was chosen."""

    weight: np.ndarray  # (classes, features), float32
    bias: np.ndarray  # (classes,), float32
    record: dict = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias


def class_weights(labels: np.ndarray, num_classes: int, balance: bool) -> np.ndarray:
    """Per-class loss weights: inverse frequency (mean 1 over the images) when balancing, else ones."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if not balance:
        return np.ones(num_classes)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights


def _solver(C: float, weights: np.ndarray | None, tol: float):
    from sklearn.linear_model import LogisticRegression

    class_weight = None if weights is None else dict(enumerate(weights.tolist()))
    # warm_start: a refit starts from the estimator's current coef_ / intercept_ (the previous strength's
    # solution on a fold, or the folds' solution for the final fit)
    return LogisticRegression(C=C, max_iter=MAX_ITER, tol=tol, class_weight=class_weight, warm_start=True)


def _fit(model, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def _weighted_log_loss(probs: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> float:
    picked = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    sample = np.ones(len(y)) if weights is None else weights[y]
    return float(-(sample * np.log(picked)).sum() / sample.sum())


def _folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Stratified folds over the training images, or None when a class has a single image."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y)[np.bincount(y) > 0].min())
    if smallest < 2:
        return None
    folds = min(MAX_FOLDS if len(y) < 1000 else 3, smallest)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def _fold_path(x: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, held_rows: np.ndarray,
               grid: list[float], weights: np.ndarray | None, num_classes: int) -> tuple[list[float], list]:
    """One fold's held-out log loss at each strength of `grid`, and the solution (coef, intercept) at each.

    The strengths are solved in the grid's order, strongest penalty first, each from the previous one's
    solution: neighbouring strengths have nearby optima, so every solve after the first takes a fraction
    of a cold start's iterations, and the first (most regularised) is the quickest cold start there is.
    """
    x_train, y_train, x_held, y_held = x[train_rows], labels[train_rows], x[held_rows], labels[held_rows]
    model = _solver(grid[0], weights, CV_TOL)
    losses, solutions = [], []
    for C in grid:
        # no catch_warnings here: it swaps process-wide state and folds run on threads; the caller silences
        # the search's convergence warnings (only the ranking of the strengths is kept from it)
        model.set_params(C=C).fit(x_train, y_train)
        losses.append(_weighted_log_loss(_full_probs(model, x_held, num_classes), y_held, weights))
        solutions.append((model.coef_.copy(), model.intercept_.copy()))
    return losses, solutions


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0,
              balance: bool = False, threads: int | None = None) -> Probe:
    """The converged, cross-validated linear head for `features` (n × d) and `labels` (n,).

    `threads`: how many folds are solved side by side (default: the usable cores); BLAS is held to one
    thread whatever it is, so the result does not depend on it.
    """
    # scikit-learn first: it loads SciPy's BLAS and its OpenMP runtime, and threadpoolctl limits only the
    # libraries already loaded (L-BFGS's own vector updates run in SciPy's BLAS, unlimited they cost 10x)
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    threads = max(1, usable_cores() if threads is None else int(threads))
    with threadpool_limits(limits=1):  # BLAS and OpenMP, for the whole fit: see the module's docstring
        return _fit_probe(features, labels, num_classes, seed, balance, threads, started)


def _fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, balance: bool,
               threads: int, started: float) -> Probe:
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.int64)
    centre = features.mean(0)
    spread = features.std(0)
    # Each feature is scaled by its own spread, but never by less than STD_FLOOR of the typical one: a
    # nearly constant channel would otherwise get a weight hundreds of times the others in the folded
    # head, and int8's per-row weight scale would round every other weight of that row to a few levels.
    std = np.maximum(spread, STD_FLOOR * max(float(np.sqrt((spread**2).mean())), 1e-8))
    x = (features - centre) / std
    weights = class_weights(labels, num_classes, balance) if balance else None
    grid = [c / len(labels) for c in C_GRID_PER_IMAGE]

    rng = np.random.default_rng(seed)
    cv_rows = np.arange(len(labels))
    if len(cv_rows) > CV_IMAGES:
        cv_rows = np.sort(rng.choice(cv_rows, CV_IMAGES, replace=False))
    folds = _folds(labels[cv_rows], seed)
    losses: list[float] = []
    best_loss = best_error = None
    start = None  # the final fit's starting point: the folds' mean solution at the chosen strength
    workers = 1
    if folds is None:
        chosen = grid[len(grid) // 2]
        rule = "a class has a single training image: no cross-validation; middle of the grid"
    else:
        x32 = x.astype(np.float32)  # the search only ranks strengths: single precision is 3x faster
        workers = min(threads, len(folds))
        jobs = [(cv_rows[train_rows], cv_rows[held_rows]) for train_rows, held_rows in folds]

        def solve(job: tuple[np.ndarray, np.ndarray]) -> tuple[list[float], list]:
            # OpenMP's thread count belongs to the calling thread: fit_probe's limit does not reach the pool's
            with threadpool_limits(limits=1, user_api="openmp"):
                return _fold_path(x32, labels, *job, grid, weights, num_classes)

        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
            warnings.simplefilter("ignore", ConvergenceWarning)
            # one fold per thread: the solvers spend their time in BLAS, which releases the GIL
            paths = list(pool.map(solve, jobs))
        per_fold = np.array([fold_losses for fold_losses, _ in paths])
        mean = per_fold.mean(0)
        error = per_fold.std(0, ddof=1) / np.sqrt(len(folds))
        best = int(np.argmin(mean))
        # one-standard-error rule: the strongest penalty whose loss is within one standard error of the best
        index = int(np.flatnonzero(mean <= mean[best] + error[best])[0])
        chosen = grid[index]
        start = (np.mean([solutions[index][0] for _, solutions in paths], axis=0),
                 np.mean([solutions[index][1] for _, solutions in paths], axis=0))
        losses = mean.tolist()
        best_loss, best_error = float(mean[best]), float(error[best])
        rule = (f"{len(folds)}-fold stratified cross-validation on the training features: the strongest L2 penalty "
                f"within one standard error of the lowest log loss")

    model = _solver(chosen, weights, FINAL_TOL)
    # the folds are stratified, so every fold trained on the classes of the cross-validation rows; a start
    # fits the final problem only when those are all the training classes (a sample of a large folder can
    # miss a rare one)
    warm = start is not None and len(np.unique(labels[cv_rows])) == len(np.unique(labels))
    if warm:
        model.coef_, model.intercept_ = start[0].astype(np.float64), start[1].astype(np.float64)
    final, converged = _fit(model, x, labels)
    coef = np.zeros((num_classes, x.shape[1]))
    intercept = np.zeros(num_classes)
    present = final.classes_
    if len(present) == 2 and num_classes >= 2:  # binary: sklearn keeps one row; softmax needs both, ±half
        coef[present[1]], coef[present[0]] = final.coef_[0] / 2, -final.coef_[0] / 2
        intercept[present[1]], intercept[present[0]] = final.intercept_[0] / 2, -final.intercept_[0] / 2
    else:
        coef[present], intercept[present] = final.coef_, final.intercept_
    if len(present) < num_classes:  # a class absent from training can never win
        intercept[np.setdiff1d(np.arange(num_classes), present)] = -1e4
    weight = coef / std
    bias = intercept - (coef * (centre / std)).sum(1)
    train_top1 = float((final.predict(x) == labels).mean())
    train_log_loss = _weighted_log_loss(_full_probs(final, x, num_classes), labels, None)
    record = {
        "method": "L2 logistic regression (L-BFGS) on standardised, cached eval-mode features",
        "C": chosen,
        "l2_per_image": round(1.0 / (chosen * len(labels)), 6),
        "grid": grid,
        "cv_log_loss": [round(v, 5) for v in losses],
        "cv_best_log_loss": None if best_loss is None else round(best_loss, 5),
        "cv_best_log_loss_se": None if best_error is None else round(best_error, 5),
        "rule": rule,
        "folds": 0 if folds is None else len(folds),
        "cv_images": int(len(cv_rows)),
        "iterations": int(np.max(final.n_iter_)),
        "warm_start": warm,
        "converged": bool(converged),
        "balanced_class_weights": bool(balance),
        "train_top1": round(train_top1, 5),
        "train_log_loss": round(train_log_loss, 5),
        "threads": workers,
        "blas_threads": 1,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Probe(weight.astype(np.float32), bias.astype(np.float32), record)


def _full_probs(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba with a column for every class, also those absent from a fold's training part."""
    probs = np.zeros((len(x), num_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs
