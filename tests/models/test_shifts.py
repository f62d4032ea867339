"""Acquisition shifts for the out-of-distribution check."""

import numpy as np
import pytest

from models.errors import TransformError
from models.shifts import SHIFTS, Shift, apply_shift


def _images(dtype=np.uint8):
    rng = np.random.default_rng(0)
    x = rng.integers(40, 200, (5, 16, 16)).astype(dtype)
    x[:, 4:12, 4:12] = 230
    return x


@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: s.label)
def test_each_shift_changes_the_image_and_keeps_its_type(shift):
    x = _images()
    y = apply_shift(x, shift, (0.0, 255.0))
    assert y.shape == x.shape and y.dtype == x.dtype and not np.array_equal(x, y)
    assert np.array_equal(y, apply_shift(x, shift, (0.0, 255.0)))  # deterministic


def test_shifts_do_what_they_say():
    x = _images()
    assert apply_shift(x, Shift("brightness", 0.1), (0.0, 255.0)).mean() > x.mean()
    assert apply_shift(x, Shift("contrast", 0.5), (0.0, 255.0)).std() < x.std()
    assert apply_shift(x, Shift("gamma", 1.5), (0.0, 255.0)).mean() < x.mean()
    rough = lambda a: np.abs(np.diff(a.astype(float), axis=2)).mean()  # noqa: E731
    assert rough(apply_shift(x, Shift("blur", 1.0), (0.0, 255.0))) < rough(x)
    assert rough(apply_shift(x, Shift("downsample", 2.0), (0.0, 255.0))) < rough(x)


def test_images_without_a_fixed_range_use_their_own():
    x = _images(np.float64) * 10 + 1000
    y = apply_shift(list(x), Shift("gamma", 0.7))
    assert isinstance(y, tuple) and y[0].min() >= x[0].min() - 1e-6 and y[0].max() <= x[0].max() + 1e-6


def test_bad_shifts_are_refused():
    with pytest.raises(TransformError, match="unknown shift"):
        Shift("fog", 1.0)
    with pytest.raises(TransformError, match="positive"):
        Shift("gamma", 0.0)
