"""Metrics, the validation-fitted threshold and temperature."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from models.card import decide
from models.errors import CardError, ModelError
from models.metrics import choose_threshold, classification_metrics, fit_temperature, softmax


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # predictions 0 1 0 1 1: tp=2 fp=1 fn=1 tn=1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["average"] == "binary"
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]] and m["n"] == 5
    tuned = classification_metrics(y, np.stack([1 - p1, p1], 1), {"rule": "threshold", "threshold": 0.3})
    assert tuned["confusion_matrix"] == [[1, 1], [0, 3]]


def test_multiclass_metrics_are_macro_and_auc_needs_every_class():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    m = classification_metrics(y, probs)
    assert m["average"] == "macro" and m["accuracy"] == 0.75
    assert m["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["auc"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert classification_metrics(np.array([0, 0]), probs[:2])["auc"] is None


def test_metric_inputs_are_checked():
    with pytest.raises(ModelError, match="labels outside"):
        classification_metrics(np.array([2]), np.array([[0.5, 0.5]]))
    with pytest.raises(ModelError, match="N, C>=2"):
        classification_metrics(np.array([0, 1]), np.array([[1.0], [0.0]]))
    with pytest.raises(ModelError, match="at least one"):
        classification_metrics(np.array([], int), np.zeros((0, 2)))
    with pytest.raises(CardError, match="unknown decision"):
        decide(np.array([[0.5, 0.5]]), {"rule": "vote"})
    with pytest.raises(CardError, match="two classes"):
        decide(np.ones((1, 3)) / 3, {"rule": "threshold", "threshold": 0.5})


@given(st.lists(st.tuples(st.integers(0, 1), st.floats(0, 1)), min_size=1, max_size=80))
@example([(0, 0.0), (1, 5e-324)])  # found by hypothesis in CI: the midpoint rounded to 0.0
def test_chosen_threshold_is_at_least_as_accurate_as_one_half(pairs):
    y = np.array([a for a, _ in pairs])
    p1 = np.array([b for _, b in pairs])
    probs = np.stack([1 - p1, p1], 1)
    t = choose_threshold(y, probs)
    acc = lambda th: np.mean((p1 >= th) == y)  # noqa: E731
    assert acc(t) >= acc(0.5)
    grid = np.concatenate([[0.0, 0.5, 1.01], p1])
    assert acc(t) >= max(acc(g) for g in grid) - 1e-12  # nothing beats it on this split


def test_temperature_recovers_overconfidence_and_keeps_argmax():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(z)])
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert np.array_equal(softmax(3 * z, t).argmax(1), z.argmax(1))
    with pytest.raises(ModelError):
        fit_temperature(z, y[:10])
