"""The one preprocessing implementation: config round trips, layouts, randomness, errors."""

import dataclasses
import json
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.errors import TransformError
from models.transforms import (TRANSFORMS, Compose, EnsureChannels, Normalize, PercentileScale,
                               RandomAffine, RandomFlip, RandomIntensity, Resize, ScaleIntensity, ToChannelsFirst,
                               Transform, apply_batch, channel_stats, from_config, register)

pos = st.floats(0.01, 100, allow_nan=False)
TRANSFORM_STRATEGY = st.one_of(
    st.builds(EnsureChannels, st.sampled_from([1, 3])),
    st.builds(ScaleIntensity, st.just(0.0), pos),
    st.builds(PercentileScale, st.floats(0, 40), st.floats(60, 100)),
    st.builds(Resize, st.integers(1, 64), st.integers(1, 64),
              st.sampled_from(["nearest", "bilinear", "bicubic", "area"])),
    st.builds(lambda m, s: Normalize((m,), (s,)), st.floats(-5, 5), pos),
    st.builds(ToChannelsFirst),
    st.builds(RandomAffine, st.floats(0, 45), st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0, 1)),
    st.builds(RandomFlip, st.sampled_from([1, 2]), st.floats(0, 1)),
    st.builds(RandomIntensity, st.floats(0, 0.9), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)


@given(st.lists(TRANSFORM_STRATEGY, max_size=6))
def test_config_round_trips_through_json(steps):
    chain = Compose(steps)
    text = json.dumps(chain.to_config())
    assert from_config(json.loads(text)) == chain
    assert Compose.from_config(json.loads(text)).to_config() == chain.to_config()


def _chain(channels, size):
    return Compose([EnsureChannels(channels), ScaleIntensity(0, 255), Resize(*size, "area"),
                    Normalize((0.5,) * channels, (0.25,) * channels), ToChannelsFirst()])


@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([0, 1, 3, 4]))
              .map(lambda s: s[:2] if s[2] == 0 else s)),
       st.sampled_from([1, 3]), st.integers(1, 32), st.integers(1, 32))
def test_any_image_becomes_float32_chw_of_the_model_size(image, channels, h, w):
    out = _chain(channels, (h, w))(image)
    assert out.shape == (channels, h, w) and out.dtype == np.float32
    assert np.all(np.isfinite(out))


def test_channel_mapping():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = EnsureChannels(3)(grey)
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[..., 2], grey)
    back = EnsureChannels(1)(rgb)
    assert back.shape == (3, 4, 1) and np.allclose(back[..., 0], grey, atol=1e-4)
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert EnsureChannels(3)(rgba).shape == (2, 2, 3)
    with pytest.raises(TransformError, match="cannot map 2"):
        EnsureChannels(1)(np.zeros((2, 2, 2)))
    with pytest.raises(TransformError, match=r"\(H, W\)"):
        EnsureChannels(1)(np.zeros((2, 2, 2, 2)))


def test_intensity_scaling():
    x = np.array([[0, 128, 255, 300]], np.int32)
    assert np.allclose(ScaleIntensity(0, 255)(x), [[0, 128 / 255, 1, 1]])
    assert np.array_equal(PercentileScale()(np.full((4, 4), 7.0)), np.zeros((4, 4)))
    ramp = PercentileScale(0, 100)(np.arange(16.0).reshape(4, 4))
    assert ramp.min() == 0 and ramp.max() == 1


def test_random_transforms_repeat_with_the_same_seed_only():
    x = np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)
    aug = Compose([RandomAffine(20, 0.2, 0.1), RandomFlip(2, 0.5), RandomIntensity(p=1.0)])
    a = aug(x, np.random.default_rng(5))
    assert np.array_equal(a, aug(x, np.random.default_rng(5)))
    assert not np.array_equal(a, aug(x, np.random.default_rng(6)))
    assert a.shape == x.shape and aug.is_random and not _chain(1, (4, 4)).is_random
    with pytest.raises(TransformError, match="needs an rng"):
        aug(x)
    assert np.array_equal(RandomFlip(1, 1.0)(x, np.random.default_rng(0)), x[:, ::-1])


@pytest.mark.parametrize("config, match", [
    ({"name": "Nope"}, "unknown transform"),
    ({"name": "Resize", "height": 4}, "bad parameters"),
    ({"name": "Resize", "height": 4, "width": 4, "interpolation": "lanczos9"}, "interpolation"),
    ({"name": "Normalize", "mean": [0.0], "std": [0.0]}, "positive"),
    ({"name": "Compose", "transforms": [], "extra": 1}, "exactly"),
    ({"transforms": []}, "'name'"),
    ("Resize", "'name'"),
    ({"name": "ScaleIntensity", "low": 1, "high": 1}, "must exceed"),
    ({"name": "RandomIntensity", "contrast": 1.5}, "contrast < 1"),
])
def test_bad_configs_are_refused_clearly(config, match):
    with pytest.raises(TransformError, match=match):
        from_config(config)


def test_runtime_mismatches_are_refused():
    with pytest.raises(TransformError, match="3 channels, stats have 1"):
        Normalize((0.0,), (1.0,))(np.zeros((2, 2, 3)))
    with pytest.raises(TransformError, match="add a Resize"):
        apply_batch(ToChannelsFirst(), [np.zeros((2, 2)), np.zeros((3, 3))])
    with pytest.raises(TransformError, match="no images"):
        apply_batch(ToChannelsFirst(), [])
    with pytest.raises(TransformError, match="not a Transform"):
        Compose([lambda x: x])


def test_new_transforms_plug_in_by_registering():
    @register
    @dataclasses.dataclass(frozen=True)
    class Invert(Transform):
        peak: float = 1.0
        name: ClassVar[str] = "TestInvert"

        def __call__(self, image, rng=None):
            return self.peak - image

    try:
        chain = from_config([{"name": "TestInvert", "peak": 2.0}, {"name": "ToChannelsFirst"}])
        assert np.array_equal(chain(np.ones((2, 2), np.float32)), np.ones((1, 2, 2)))
        with pytest.raises(TransformError, match="registered twice"):
            register(type("Other", (Invert,), {"name": "TestInvert"}))
    finally:
        TRANSFORMS.pop("TestInvert")


def test_channel_stats():
    batch = np.stack([np.full((2, 3, 3), v, np.float32) for v in (1.0, 3.0)])
    batch[:, 1] = 5.0
    mean, std = channel_stats(batch)
    assert mean == (2.0, 5.0) and std[0] == 1.0 and std[1] == 1e-6


def test_intensity_jitter_keeps_order_and_stays_finite():
    x = np.linspace(-2, 3, 64, dtype=np.float32).reshape(1, 8, 8)
    for seed in range(20):
        y = RandomIntensity(0.2, 0.1, 0.3, 1.0)(x, np.random.default_rng(seed))
        assert y.dtype == np.float32 and np.all(np.isfinite(y))
        assert np.all(np.diff(y.ravel()) > 0)  # monotone: what is brighter stays brighter
    assert np.array_equal(RandomIntensity(p=0.0)(x, np.random.default_rng(0)), x)


def test_edge_side_modules_do_not_import_torch():
    code = ("import sys, models, models.transforms, models.card, models.runtime, models.datasets, "
            "models.evaluate, models.splits, models.shifts, edge_agent.inference; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
