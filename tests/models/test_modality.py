"""Modality-aware preprocessing: modality values from real files, ranges, shapes, scales,
and cine frame dropping."""

import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydicom.data import get_testdata_file

from models.modality import (
    Denoise,
    ModalityConfig,
    config_for,
    keep_distinct_frames,
    modality_values,
    prepare,
)
from models.transforms import from_config


@given(arrays(np.float32, (40, 50), elements=st.floats(-3000, 5000, width=32)),
       st.sampled_from(["CT", "MR", "CR", "DX", "MG", "US", "OT"]))
def test_output_is_model_ready_for_any_input(values, modality):
    cfg = config_for(modality, size=32)
    out = prepare(values, cfg)
    assert out.tensor.shape == (1, 1, 32, 32) and out.tensor.dtype == np.float32
    assert np.isfinite(out.tensor).all() and 0.0 <= out.tensor.min() and out.tensor.max() <= 1.0
    assert out.hog.ndim == 1 and out.wavelet.ndim == 1 and np.isfinite(out.wavelet).all()


def test_ct_is_read_in_hounsfield_units_and_windowed():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = modality_values(ds)
    stored = ds.pixel_array.astype(np.float32)
    np.testing.assert_allclose(hu[0], stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    scale = config_for("CT").chain().transforms[0]
    unit = scale(np.array([[-1000.0, 0.0, 1000.0, 3000.0]]))
    np.testing.assert_allclose(unit, [[0.0, 0.5, 1.0, 1.0]])


def test_monochrome1_is_inverted_so_denser_is_larger():
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = modality_values(ds)
    np.testing.assert_array_equal(values[0], (2**ds.BitsStored - 1) - ds.pixel_array.astype(np.float32))


def test_colour_frames_become_grey_frames():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    values = modality_values(ds)
    assert values.shape == (2, ds.Rows, ds.Columns)
    single = pydicom.dcmread(get_testdata_file("US1_J2KR.dcm"))
    assert modality_values(single).shape == (1, single.Rows, single.Columns)


def test_interpolation_and_denoise_per_modality():
    assert config_for("CT").interpolation == "bilinear" == config_for("US").interpolation
    assert config_for("MR").interpolation == "bilinear"
    assert {config_for(m).interpolation for m in ("CR", "DX", "MG")} == {"bicubic"}
    assert config_for("CT").denoise == "nlm" == config_for("MR").denoise


def test_cine_drops_redundant_frames():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (2, 32, 32)).astype(np.float32)
    out = prepare(np.stack([a, a, a, b, b, a]), config_for("US", size=16))
    assert out.kept_frames == (0, 3, 5)
    assert out.tensor.shape == (3, 1, 16, 16)


def test_frame_dropping_threshold():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(16, 16))
    noisy = base + rng.normal(scale=0.05, size=(16, 16))
    assert keep_distinct_frames(np.stack([base, noisy]), 0.98) == [0]
    assert keep_distinct_frames(np.stack([base, noisy]), 0.999999) == [0, 1]


def test_config_round_trip_and_validation():
    cfg = config_for("CT", size=96)
    assert ModalityConfig.from_config(cfg.to_config()) == cfg
    with pytest.raises(ValueError):
        ModalityConfig(denoise="magic")
    with pytest.raises(ValueError):
        ModalityConfig(window=(10.0, 10.0))


def test_deterministic():
    x = np.random.default_rng(2).normal(0, 300, (128, 128)).astype(np.float32)
    a, b = prepare(x, config_for("CT")), prepare(x, config_for("CT"))
    assert np.array_equal(a.tensor, b.tensor) and np.array_equal(a.hog, b.hog)


def test_the_recorded_chain_rebuilds_and_reproduces_the_tensor():
    x = np.random.default_rng(3).normal(0, 300, (100, 90)).astype(np.float32)
    out = prepare(x, config_for("CT", size=48))
    again = from_config(out.chain)(x)
    np.testing.assert_array_equal(again, out.tensor[0])
    assert [t["name"] for t in out.chain["transforms"]] == ["ScaleIntensity", "Resize", "Denoise", "ToChannelsFirst"]


@pytest.mark.parametrize("method", ["none", "gaussian", "nlm"])
def test_denoise_keeps_range_and_shape(method):
    img = np.random.default_rng(4).random((32, 32)).astype(np.float32) * 1.2 - 0.1
    out = Denoise(method)(img)
    assert out.shape == (32, 32) and 0.0 <= out.min() and out.max() <= 1.0
    with pytest.raises(Exception):
        Denoise("median")
