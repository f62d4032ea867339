"""Classification metrics and the decision/calibration fitted on the validation split.

Binary tasks report precision, recall and F1 of class 1 (the finding); with more than two
classes they are macro averages. ROC AUC is one-vs-rest macro for C > 2. The threshold and
temperature are only ever fitted on validation outputs; callers pass them on to test.
numpy + scikit-learn, no torch.
"""

from __future__ import annotations

import numpy as np

from models.card import decide
from models.errors import ModelError

__all__ = ["classification_metrics", "choose_threshold", "fit_temperature", "softmax"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, np.int64).ravel()
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] < 2:
        raise ModelError(f"metrics need (N,) labels and (N, C>=2) probabilities, got "
                         f"{labels.shape} and {probs.shape}")
    if labels.size == 0:
        raise ModelError("metrics need at least one example")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ModelError(f"labels outside 0..{probs.shape[1] - 1}")
    return labels, probs


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           decision: dict | None = None) -> dict:
    """accuracy, precision, recall, f1, auc, confusion matrix (rows: true, columns: predicted).

    ``auc`` is None when it is undefined (a class absent from ``labels``).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels, probs = _check(labels, probs)
    c = probs.shape[1]
    pred = decide(probs, decision)
    average = "binary" if c == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, labels=list(range(c)) if c > 2 else None, average=average, zero_division=0)
    auc = None
    if len(np.unique(labels)) == c:
        if c == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            p = probs / probs.sum(axis=1, keepdims=True)
            auc = float(roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=list(range(c))))
    return {
        "n": int(labels.size),
        "accuracy": float(np.mean(pred == labels)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auc": auc,
        "average": average,
        "confusion_matrix": confusion_matrix(labels, pred, labels=list(range(c))).tolist(),
    }


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold on P(class 1) that maximises validation accuracy.

    Candidates are midpoints between consecutive distinct scores, both extremes and 0.5;
    ties go to the candidate nearest 0.5, so an uninformative validation set leaves the
    default alone.
    """
    labels, probs = _check(labels, probs)
    if probs.shape[1] != 2:
        raise ModelError("a decision threshold applies to two classes only")
    score = probs[:, 1]
    s = np.unique(score)
    mid = (s[:-1] + s[1:]) / 2
    mid = np.where(mid > s[:-1], mid, s[1:])  # two adjacent subnormals have no midpoint between them
    candidates = np.concatenate([[0.5, s[0], np.nextafter(s[-1], np.inf)], mid])
    order = np.argsort(score)
    sorted_scores, sorted_labels = score[order], labels[order]
    # predictions >= t are positive: accuracy = negatives below t + positives at/above t
    neg_below = np.concatenate([[0], np.cumsum(sorted_labels == 0)])
    pos_total = int(np.sum(labels == 1))
    pos_below = np.concatenate([[0], np.cumsum(sorted_labels == 1)])
    k = np.searchsorted(sorted_scores, candidates, side="left")
    acc = (neg_below[k] + pos_total - pos_below[k]) / labels.size
    best = np.flatnonzero(acc == acc.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature minimising validation negative log-likelihood (a calibration
    that leaves argmax untouched); searched on a log grid from 0.05 to 20 and refined."""
    labels = np.asarray(labels, np.int64).ravel()
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] != labels.size or labels.size == 0:
        raise ModelError("fit_temperature needs (N, C) logits and N labels")

    def nll(t: float) -> float:
        zt = z / t
        m = zt.max(axis=1)
        lse = m + np.log(np.exp(zt - m[:, None]).sum(axis=1))
        return float(np.mean(lse - zt[np.arange(labels.size), labels]))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = min(grid, key=nll)
    fine = best * np.exp(np.linspace(-0.06, 0.06, 25))
    return float(min(fine, key=nll))
