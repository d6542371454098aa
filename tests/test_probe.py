"""The probe's penalty search: warm-started along the penalty path, one BLAS thread, folds side by side.

Each check compares against what the search stands in for (a cold, one-estimator-per-strength search and a
cold final fit) or reads the thread limits from inside the fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import edgetl.probe as probe
from edgetl.machine import usable_cores
from edgetl.probe import C_GRID_PER_IMAGE, CV_TOL, FINAL_TOL, STD_FLOOR, fit_probe


def _overlapping(n_per_class: int = 60, classes: int = 4, dim: int = 30, seed: int = 0):
    """Classes that overlap, with some mislabelled images: the best penalty lies inside the grid."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, 1.5, (len(y), dim))
    flipped = rng.random(len(y)) < 0.08
    y = np.where(flipped, rng.integers(0, classes, len(y)), y)
    x = np.clip(x * rng.uniform(0.5, 3.0, dim) + 2.0, 0.0, None)  # non-negative, per-channel scales
    return x.astype(np.float32), y


def _standardised(x: np.ndarray) -> np.ndarray:
    """The probe's scaling: centred, each feature over its spread, floored at STD_FLOOR of the RMS spread."""
    x64 = x.astype(np.float64)
    spread = x64.std(0)
    return (x64 - x64.mean(0)) / np.maximum(spread, STD_FLOOR * np.sqrt((spread**2).mean()))


def _cold_search(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Mean and standard error of the held-out log loss per strength, one fresh estimator per fit."""
    grid = [c / len(y) for c in C_GRID_PER_IMAGE]
    x32 = _standardised(x).astype(np.float32)
    folds = probe._folds(y, seed)
    assert folds is not None
    per_fold = np.zeros((len(folds), len(grid)))
    for f, (train, held) in enumerate(folds):
        for i, C in enumerate(grid):
            model = LogisticRegression(C=C, tol=CV_TOL, max_iter=probe.MAX_ITER).fit(x32[train], y[train])
            picked = np.clip(model.predict_proba(x32[held])[np.arange(len(held)), y[held]], 1e-12, 1.0)
            per_fold[f, i] = -np.log(picked).mean()
    return per_fold.mean(0), per_fold.std(0, ddof=1) / np.sqrt(len(folds)), grid


@pytest.mark.parametrize("seed", [0, 1])
def test_warm_path_chooses_the_penalty_a_cold_search_chooses(seed: int) -> None:
    x, y = _overlapping(seed=seed)
    head = fit_probe(x, y, 4, seed=seed)
    mean, error, grid = _cold_search(x, y, seed)
    best = int(np.argmin(mean))
    assert 0 < best < len(grid) - 1, "the problem should put the best penalty inside the grid"
    cold_choice = grid[int(np.flatnonzero(mean <= mean[best] + error[best])[0])]
    warm = np.array(head.record["cv_log_loss"])
    # the warm-started solves reach the cold ones' held-out losses, well inside one standard error
    assert np.abs(warm - mean).max() < 0.25 * error.min()
    assert head.record["warm_start"] is True
    chosen = grid.index(head.record["C"])
    assert head.record["C"] == cold_choice or mean[chosen] <= mean[best] + error[best]


def test_warm_final_fit_matches_a_cold_fit_at_the_same_penalty() -> None:
    x, y = _overlapping(n_per_class=80, seed=2)
    head = fit_probe(x, y, 4, seed=0)
    assert head.record["converged"] and head.record["warm_start"]
    standard = _standardised(x)
    cold = LogisticRegression(C=head.record["C"], tol=FINAL_TOL, max_iter=probe.MAX_ITER).fit(standard, y)
    cold_top1 = float((cold.predict(standard) == y).mean())
    warm_top1 = float((head.logits(x).argmax(1) == y).mean())
    assert abs(warm_top1 - cold_top1) <= 0.01 and abs(head.record["train_top1"] - cold_top1) <= 0.01
    # the same optimum, not merely the same accuracy: class probabilities agree closely on every image
    logits = head.logits(x).astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert np.abs(probs - cold.predict_proba(standard)).max() < 1e-3


def test_the_path_takes_fewer_iterations_and_leaves_each_strength_converged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _overlapping(dim=120, seed=0)
    grid = [c / len(y) for c in C_GRID_PER_IMAGE]
    x32 = _standardised(x).astype(np.float32)
    train, held = probe._folds(y, 0)[0]
    path_iterations: list[int] = []

    class Counting(LogisticRegression):
        def fit(self, *args, **kwargs):
            super().fit(*args, **kwargs)
            path_iterations.append(int(self.n_iter_[0]))
            return self

    solver = probe._solver
    monkeypatch.setattr(probe, "_solver", lambda *args: Counting(**solver(*args).get_params()))
    _, solutions = probe._fold_path(x32, y, train, held, grid, None, 4)
    cold_iterations, restart_iterations = [], []
    for C, (coef, intercept) in zip(grid, solutions, strict=True):
        cold = LogisticRegression(C=C, tol=CV_TOL, max_iter=probe.MAX_ITER).fit(x32[train], y[train])
        cold_iterations.append(int(cold.n_iter_[0]))
        # the path's solution is the optimum at its own strength, not a leftover of the previous one:
        # started from it, L-BFGS finds nothing left to do
        again = LogisticRegression(C=C, tol=CV_TOL, max_iter=probe.MAX_ITER, warm_start=True)
        again.coef_, again.intercept_ = coef.copy(), intercept.copy()
        restart_iterations.append(int(again.fit(x32[train], y[train]).n_iter_[0]))
    assert len(path_iterations) == len(grid) and path_iterations[0] == cold_iterations[0]  # both start at zero
    assert sum(path_iterations[1:]) < 0.85 * sum(cold_iterations[1:])
    assert max(restart_iterations) <= 1


def test_folds_run_side_by_side_up_to_the_cap_and_the_result_does_not_depend_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _overlapping(seed=3)
    running, most, lock = 0, 0, threading.Lock()
    original = probe._fold_path

    def counted(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(probe, "_fold_path", counted)
    one = fit_probe(x, y, 4, threads=1)
    assert most == 1 and one.record["threads"] == 1
    most = 0
    two = fit_probe(x, y, 4, threads=2)
    assert 1 <= most <= 2 and two.record["threads"] == 2 and two.record["folds"] == 5
    np.testing.assert_array_equal(one.weight, two.weight)
    np.testing.assert_array_equal(one.bias, two.bias)
    assert one.record["cv_log_loss"] == two.record["cv_log_loss"]
    assert fit_probe(x, y, 4).record["threads"] == min(usable_cores(), 5)


_LIMITS_SCRIPT = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
before = [(lib["internal_api"], lib["filepath"], lib["num_threads"]) for lib in threadpool_info()]  # numpy's BLAS
import edgetl.probe as probe
assert "scipy.optimize" not in sys.modules  # the probe itself must bring in, then limit, scikit-learn's libraries
seen = []
original = probe._full_probs
def spying(model, x, num_classes):
    seen.append([(lib["internal_api"], lib["filepath"], lib["num_threads"]) for lib in threadpool_info()])
    return original(model, x, num_classes)
probe._full_probs = spying
rng = np.random.default_rng(0)
y = np.repeat(np.arange(3), 30)
x = (rng.normal(0, 1, (90, 12)) + y[:, None]).astype(np.float32)
head = probe.fit_probe(x, y, 3, threads=2)
after = [(lib["internal_api"], lib["filepath"], lib["num_threads"]) for lib in threadpool_info()]
print(json.dumps({"seen": seen, "before": before, "after": after, "record": head.record}))
"""


def test_blas_and_openmp_run_one_thread_during_the_fit_and_are_restored_after() -> None:
    # a fresh interpreter: SciPy's BLAS and scikit-learn's OpenMP are loaded by the probe's own import
    done = subprocess.run([sys.executable, "-c", _LIMITS_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "3", "OMP_NUM_THREADS": "3"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    inside = result["seen"]
    assert len(inside) == 5 * 7 + 1  # every held-out fold at every strength, then the training set once
    apis = {api for api, _, _ in inside[0]}
    assert "openblas" in apis or "mkl" in apis
    assert all(threads == 1 for snapshot in inside for _, _, threads in snapshot)
    # given back afterwards: OpenMP to the environment's 3, every BLAS to what numpy's had before the fit
    (blas_default,) = [threads for api, _, threads in result["before"] if api in ("openblas", "mkl")]
    assert {api: threads for api, _, threads in result["after"] if api == "openmp"} == {"openmp": 3}
    assert all(threads == blas_default for api, _, threads in result["after"] if api != "openmp")
    assert result["record"]["blas_threads"] == 1 and result["record"]["threads"] == 2


def test_a_class_missing_from_the_cross_validation_sample_gets_a_cold_final_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _overlapping(n_per_class=50, classes=3, seed=4)
    rare = np.array([0, 1])  # two images of a fourth class, outside the sample the search sees
    x = np.concatenate([x, x[rare] + 5.0])
    y = np.concatenate([y, [3, 3]])
    monkeypatch.setattr(probe, "CV_IMAGES", 100)
    sample = np.random.default_rng(4).choice(len(y), 100, replace=False)  # the probe's draw for seed 4
    assert not np.isin(sample, [len(y) - 2, len(y) - 1]).any()
    head = fit_probe(x, y, 4, seed=4)
    assert head.record["cv_images"] == 100 and head.record["folds"] > 0
    assert head.record["warm_start"] is False and head.record["converged"]
    assert (head.logits(x).argmax(1)[-2:] == 3).all()
