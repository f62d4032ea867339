"""KNN and SVM baselines on exactly the hybrid's split and preprocessing output.

Each baseline sees the same preprocessed ``(N, C, H, W)`` arrays the hybrid sees, flattened;
its own pipeline (PCA to at most 64 components, then the classifier) is fitted on the train
split only, its hyper-parameter is chosen on validation accuracy, and for two classes its
decision threshold is chosen on validation exactly as the hybrid's is. The SVM is cubic in
the number of examples, so it trains on a seeded stratified subsample when the train split
is larger than ``max_train`` (recorded in the result).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.errors import ModelError
from models.metrics import choose_threshold

__all__ = ["BaselineResult", "BASELINES", "fit_baseline", "decision_rule", "stratified_subsample"]


@dataclass(frozen=True)
class BaselineResult:
    name: str
    params: dict
    decision: dict
    val_probs: np.ndarray
    train_count: int
    seconds: float
    estimator: object
    num_classes: int

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities over all classes for preprocessed ``(N, C, H, W)`` images."""
        return _full_probs(self.estimator, x.reshape(len(x), -1), self.num_classes)


def _knn(k: int, seed: int, labels: np.ndarray):
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=k, weights="distance")


def _svm(c: float, seed: int, labels: np.ndarray):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    # Platt scaling on 5 stratified folds gives the probabilities that ROC AUC needs; a
    # small train split (a few dozen consented images) gets as many folds as its rarest
    # class allows, and libsvm's own Platt scaling when that class has a single example
    folds = min(5, int(np.bincount(labels).compress(np.bincount(labels) > 0).min()))
    if folds < 2:
        return SVC(C=c, kernel="rbf", gamma="scale", probability=True, random_state=seed)
    return CalibratedClassifierCV(SVC(C=c, kernel="rbf", gamma="scale", random_state=seed),
                                  method="sigmoid", cv=folds, ensemble=False)


# name -> (estimator factory, hyper-parameter grid, largest train subsample)
BASELINES: dict[str, tuple[Callable, dict, int | None]] = {
    "knn": (_knn, {"k": (5, 11, 21)}, None),
    "svm": (_svm, {"c": (1.0, 10.0)}, 10_000),
}


def stratified_subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` examples keeping class proportions (seeded, sorted)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(limit * len(idx) / len(labels))))
        keep.append(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


def _full_probs(est, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over all classes, even those the (subsampled) train split lacked."""
    p = est.predict_proba(x)
    out = np.zeros((len(x), num_classes))
    out[:, est.classes_] = p
    return out


def fit_baseline(name: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                 y_val: np.ndarray, num_classes: int, seed: int = 0,
                 threshold: str = "validation") -> BaselineResult:
    """Fit baseline ``name`` on train, choose its parameter on validation and, for two
    classes, its threshold as the hybrid's (``"validation"``: chosen on validation;
    ``"calibrated"``: 0.5)."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline

    factory, grid, limit = BASELINES[name]
    t0 = time.perf_counter()
    idx = stratified_subsample(y_train, limit, seed) if limit else np.arange(len(y_train))
    xt, yt = x_train[idx].reshape(len(idx), -1), y_train[idx]
    xv = x_val.reshape(len(x_val), -1)
    (param, values), = grid.items()
    best = None
    for value in values:
        if name == "knn" and value >= len(xt):
            continue
        n_comp = min(64, xt.shape[1], len(xt))
        est = make_pipeline(PCA(n_components=n_comp, random_state=seed), factory(value, seed, yt))
        est.fit(xt, yt)
        probs = _full_probs(est, xv, num_classes)
        acc = float(np.mean(probs.argmax(1) == y_val))
        if best is None or acc > best[0]:
            best = (acc, value, est, probs)
    if best is None:  # a train split smaller than every k
        est = make_pipeline(factory(1, seed, yt)).fit(xt, yt)
        best = (0.0, 1, est, _full_probs(est, xv, num_classes))
    _, value, est, val_probs = best
    decision = decision_rule(threshold, y_val, val_probs, num_classes)
    return BaselineResult(name, {param: value}, decision, val_probs, len(idx),
                          time.perf_counter() - t0, est, num_classes)


def decision_rule(threshold: str, y_val: np.ndarray, val_probs: np.ndarray, num_classes: int) -> dict:
    """The card's decision: argmax for C > 2; for two classes a threshold on P(class 1),
    chosen on validation (``"validation"``) or 0.5 on calibrated probabilities
    (``"calibrated"``), which does not chase the noise of a small validation split."""
    if num_classes != 2:
        return {"rule": "argmax"}
    if threshold == "calibrated":
        return {"rule": "threshold", "threshold": 0.5}
    if threshold == "validation":
        return {"rule": "threshold", "threshold": choose_threshold(y_val, val_probs)}
    raise ModelError(f"unknown threshold rule {threshold!r} (calibrated or validation)")
