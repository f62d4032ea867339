"""Burned-in text detection on real pixel data: text drawn into real frames is found where it
was drawn, truly clean frames give no box, every pixel layout the edge receives is read, and
blanking zeroes exactly the boxes."""

from __future__ import annotations

import pickle
import warnings

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file

from edge_agent.errors import ConfigError, DeidError
from edge_agent.textdetect import (
    DetectorSettings,
    FramePlan,
    TextBox,
    TextDetector,
    blank_boxes,
    detect_frames,
    plan_frames,
    render,
)
from scanner_sim import phantoms


def _frame(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(get_testdata_file(name)).pixel_array


@pytest.fixture(scope="module")
def detector() -> TextDetector:
    d = TextDetector()
    d.load()
    return d


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    """A real 512 x 512 head CT (int16, no text in it)."""
    return _frame("693_UNCR.dcm")


def draw(frame: np.ndarray, text: str, org: tuple[int, int], value, height: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """``frame`` with ``text`` drawn at ``value`` (baseline-left corner ``org``), and its ink."""
    ink = np.zeros(frame.shape[:2], np.uint8)
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, height, 1)
    cv2.putText(ink, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 1, 1, cv2.LINE_8)
    out = frame.copy()
    out[ink.astype(bool)] = value
    return out, ink.astype(bool)


def covered(boxes, shape) -> np.ndarray:
    m = np.zeros(shape[:2], bool)
    for b in boxes:
        m[b.y:b.y + b.height, b.x:b.x + b.width] = True
    return m


def assert_found_only(boxes, inks, shape):
    cov = covered(boxes, shape)
    for ink in inks:
        assert cov[ink].mean() >= 0.9, f"only {cov[ink].mean():.2f} of a line covered"
    union = np.logical_or.reduce(inks)
    for b in boxes:  # no box away from the text
        assert union[b.y:b.y + b.height, b.x:b.x + b.width].any(), b


def test_text_drawn_on_a_real_ct_is_found_where_it_was_drawn(detector, ct):
    img, corner = draw(ct, "DOE^JANE 045Y", (12, 490), ct.max())
    img, centre = draw(img, "ID: 84736251", (190, 250), ct.min(), height=11)  # dark on the brain
    boxes = detector.detect(img)
    assert_found_only(boxes, [corner, centre], img.shape)


def test_text_drawn_on_a_real_mr_is_found_where_it_was_drawn(detector):
    mr = _frame("MR-SIEMENS-DICOM-WithOverlays.dcm")  # 484 x 484 uint16, 12 bits stored
    img, top = draw(mr, "20240117 14:23:05", (300, 24), 4095, height=10)
    img, body = draw(img, "ACC A123456789", (150, 300), int(mr.max()))
    assert_found_only(detector.detect(img), [top, body], img.shape)


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "JPEG2000_UNC.dcm"])
def test_a_truly_clean_real_frame_gives_no_box(detector, name):
    assert detector.detect(_frame(name)) == ()


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "MR2_UNCR.dcm"])
def test_whole_frame_mode_drops_what_the_network_says_of_a_skull_or_an_organ(name):
    # on whole clean frames the network marks large uniform regions as text; the box shape
    # (no higher than 0.3 of the frame, wider than high) is what keeps them out
    assert TextDetector(DetectorSettings(mode="full")).detect(_frame(name)) == ()


def test_clean_phantoms_of_each_modality_give_no_box(detector):
    rng = np.random.default_rng(3)
    for frame in (phantoms.ct_slice("malignant", rng), phantoms.radiograph("benign", rng),
                  phantoms.mammogram("malignant", rng), phantoms.mr_slice("healthy", rng)):
        assert detector.detect(frame) == ()


def test_uint16_monochrome1_float_and_rgb_frames_are_read(detector, ct):
    as_u16 = (ct.astype(np.int32) - ct.min()).astype(np.uint16)
    # MONOCHROME1: 0 shows white, so scanners burn text at the bottom of the range
    img, ink = draw(as_u16, "SMITH^JOHN", (300, 40), 0)
    assert_found_only(detector.detect(img, "MONOCHROME1"), [ink], img.shape)
    hu = ct.astype(np.float32) * 1.0 - 1024.0
    img, ink = draw(hu, "20240117", (20, 40), float(hu.max()))
    assert_found_only(detector.detect(img), [ink], img.shape)
    rgb = np.repeat(render(ct)[120:360, 100:420, None], 3, axis=2)
    img, ink = draw(rgb, "ACC A12345", (10, 225), (255, 255, 0))
    assert_found_only(detector.detect(img, "RGB"), [ink], img.shape)


def test_static_text_on_a_moving_cine_is_found_and_blanked_in_every_frame(detector):
    rng = np.random.default_rng(0)
    base = phantoms.mr_slice("malignant", rng, size=320)
    frames = np.stack([np.roll(base, shift, axis=(0, 1)) for shift in rng.integers(-12, 12, (12, 2))])
    ink = None
    for i in range(len(frames)):
        frames[i], ink = draw(frames[i], "KOWALSKI^ANNA", (150, 300), 4095, height=12)
    plan = plan_frames(len(frames))
    assert plan.frames == (0,) and plan.combined[0] == 0 and plan.combined[-1] == 11
    found = detect_frames(detector, frames, "MONOCHROME2", len(frames))
    assert found.looked_at == 2
    assert_found_only(found.boxes, [ink], frames.shape[1:])
    blanked = blank_boxes(frames, found.boxes, len(frames))
    assert not blanked[:, ink].any()
    assert detect_frames(detector, blanked, "MONOCHROME2", len(frames)).boxes == ()


def test_blanking_zeroes_the_detected_boxes_and_nothing_else(detector, ct):
    img, ink = draw(ct, "GARCIA^MARIA 1975", (300, 30), ct.max())
    boxes = detector.detect(img)
    out = blank_boxes(img, boxes, margin=3)
    inside = covered([b.grown(3, *img.shape) for b in boxes], img.shape)
    assert (out[inside] == 0).all() and not out[ink].any()
    assert np.array_equal(out[~inside], img[~inside])
    assert img[ink].all()  # the input is left alone


boxes_st = st.lists(st.builds(TextBox, st.integers(-5, 40), st.integers(-5, 30), st.integers(0, 20),
                              st.integers(0, 20), st.just(1.0)), max_size=5)


@given(boxes=boxes_st, margin=st.integers(0, 4), frames=st.integers(1, 3), colour=st.booleans())
def test_blanking_never_changes_a_pixel_outside_the_grown_boxes(boxes, margin, frames, colour):
    shape = (frames, 24, 32) + ((3,) if colour else ())
    pixels = np.arange(1, np.prod(shape) + 1, dtype=np.int32).reshape(shape)
    pixels = pixels if frames > 1 else pixels[0]
    out = blank_boxes(pixels, tuple(boxes), frames, margin)
    inside = covered([b.grown(margin, 24, 32) for b in boxes], (24, 32))
    stack_in, stack_out = (pixels, out) if frames > 1 else (pixels[None], out[None])
    assert np.array_equal(stack_out[:, ~inside], stack_in[:, ~inside])
    assert (stack_out[:, inside] == 0).all()


def test_the_detector_travels_to_a_worker_and_errors_name_no_pixel_values(detector, ct):
    copy = pickle.loads(pickle.dumps(detector))
    img, ink = draw(ct, "DOE^JOHN", (20, 40), ct.max())
    assert copy.detect(img) == detector.detect(img)
    with pytest.raises(DeidError, match=r"shape \(4, 5, 6, 7\)"):
        detector.detect(np.zeros((4, 5, 6, 7)))
    with pytest.raises(DeidError, match="does not hold 3 frame"):
        detect_frames(detector, np.zeros((2, 8, 8)), "MONOCHROME2", 3)
    with pytest.raises(ConfigError, match="mode"):
        DetectorSettings(mode="guess")
    with pytest.raises(ConfigError, match="combine"):
        FramePlan((0,), (0, 1), "mean")
    with pytest.raises(DeidError, match="could not be loaded"):
        TextDetector(model=__file__).load()
