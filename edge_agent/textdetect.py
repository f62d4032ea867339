"""Burned-in text found in the pixels: a text-detection model on ONNX Runtime, behind a cheap
stroke gate, and blanking of exactly what it found.

The model is PP-OCRv6's text detector (a DB segmentation network) as shipped, in ONNX, in the
``rapidocr`` wheel; only its file is used, through the edge's own ONNX Runtime. Running it on
a whole 512 x 512 frame costs far more than the edge can spend per image, so by default
(``mode="cascade"``) :mod:`edge_agent.textgate` first finds rows of character-like strokes
and the model only looks around those, at a scale that suits their height: a frame without
such a row never reaches the model. Small frames, colour frames (ultrasound) and frames too
busy for the gate go to the model whole, as every frame does in ``mode="full"``. Figures,
settings and limits: docs/burned_in.md.

Pure apart from the model session, created lazily once per process and shared by every
detector with the same model file and thread count. Boxes are in pixel coordinates of the
frame given; no text is ever read, logged or returned.
"""

from __future__ import annotations

import importlib.resources
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from edge_agent.errors import ConfigError, DeidError
from edge_agent.textgate import Row, text_rows

__all__ = [
    "TextBox",
    "DetectorSettings",
    "TextDetector",
    "FramePlan",
    "InstanceText",
    "plan_frames",
    "detect_frames",
    "render",
    "blank_boxes",
    "MODEL_FILE",
]

MODEL_FILE = "PP-OCRv6_det_small.onnx"  # in rapidocr's wheel, under rapidocr/models/
MODES = ("cascade", "full")
_STRIDE = 32  # the network's input sides must be multiples of this


@dataclass(frozen=True, slots=True)
class TextBox:
    """A rectangle of detected text: columns ``x``.., rows ``y``.., in the frame's pixels;
    ``score`` is the model's mean text probability inside it."""

    x: int
    y: int
    width: int
    height: int
    score: float

    def grown(self, margin: int, rows: int, cols: int) -> TextBox:
        """This box widened by ``margin`` pixels on every side, clipped to the frame."""
        x0, y0 = max(0, self.x - margin), max(0, self.y - margin)
        x1, y1 = min(cols, self.x + self.width + margin), min(rows, self.y + self.height + margin)
        return TextBox(x0, y0, max(0, x1 - x0), max(0, y1 - y0), self.score)


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """How text is looked for. Defaults are the measured choice (docs/burned_in.md)."""

    mode: str = "cascade"
    threads: int = 1  # ONNX Runtime intra-op threads: the worker shares the edge's cores
    # gate (cascade mode)
    stroke_contrast: float = 0.15  # a stroke differs from its surroundings by this share of the range
    stroke_width: int = 14  # strokes up to this wide are seen (the morphology kernel is one more)
    min_text_height: int = 5  # px
    max_text_height: float = 0.3  # share of the frame's longest side (and at least 24 px)
    context: float = 3.0  # model crops extend this many text heights left and right of a row ...
    context_rows: float = 1.0  # ... and this many above and below
    whole_below: int = 160 * 160  # frames with fewer pixels than this go to the model whole
    whole_colour: bool = True  # colour frames (ultrasound: speckle, colour flow) go whole
    small_text: int = 12  # candidates lower than this are upscaled for the model ...
    upscale: float = 2.0  # ... by this factor
    large_text: int = 40  # candidates higher than this are downscaled to it
    # model
    full_side: int = 736  # a frame the model sees whole has its longest side resized to this ...
    max_upscale: float = 2.0  # ... but is never enlarged more than this
    prob_threshold: float = 0.3  # DB: a pixel is text above this probability
    box_threshold: float = 0.5  # DB: a region is text when its mean probability is above this
    unclip: float = 1.6  # DB: regions are grown by area * unclip / perimeter (the model shrinks them)
    # a box narrower than this times its height is no row of three or more characters (what the
    # gate looks for); docs/burned_in.md has what it cost and what it saved
    min_aspect: float = 1.8
    min_context: int = 8  # px of context around a candidate, at least
    row_to_box: float = 2.5  # a box found in a crop is at most this many candidate heights high
    max_marks: int = 1500  # more character-like marks than this in one frame: look at it whole

    def __post_init__(self) -> None:
        checks = (
            (self.mode in MODES, f"mode must be one of {MODES}"),
            (isinstance(self.threads, int) and self.threads >= 1, "threads must be >= 1"),
            (0.0 < self.stroke_contrast < 1.0, "stroke_contrast must be in (0, 1)"),
            (1 <= self.stroke_width <= 64, "stroke_width must be in 1..64"),
            (1 <= self.min_text_height <= self.large_text, "min_text_height must be in 1..large_text"),
            (0.0 < self.max_text_height <= 1.0, "max_text_height must be in (0, 1]"),
            (self.context >= 0.0 and self.context_rows >= 0.0, "context must be >= 0"),
            (self.upscale >= 1.0 and self.max_upscale >= 1.0, "upscale and max_upscale must be >= 1"),
            (self.min_aspect >= 0.0 and self.min_context >= 0, "min_aspect, min_context must be >= 0"),
            (self.row_to_box > 0.0, "row_to_box must be > 0"),
            (self.max_marks >= 3 and self.whole_below >= 0, "max_marks >= 3, whole_below >= 0"),
            (self.full_side >= _STRIDE, f"full_side must be >= {_STRIDE}"),
            (0.0 < self.prob_threshold < 1.0 and 0.0 < self.box_threshold < 1.0,
             "prob_threshold and box_threshold must be in (0, 1)"),
            (self.unclip > 0.0, "unclip must be > 0"),
        )
        for ok, reason in checks:
            if not ok:
                raise ConfigError(f"text detector settings: {reason}")


# -- the model session, once per process -----------------------------------------------------

_sessions: dict[tuple[str, int], object] = {}
_sessions_lock = threading.Lock()


def _default_model() -> Path:
    return Path(str(importlib.resources.files("rapidocr") / "models" / MODEL_FILE))


def _session(path: Path, threads: int):
    key = (str(path), threads)
    session = _sessions.get(key)
    if session is None:
        with _sessions_lock:
            session = _sessions.get(key)
            if session is None:
                session = _sessions[key] = _load(path, threads)
    return session


def _load(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # missing file, not a model: the instance cannot be checked
        raise DeidError(f"text detection model {path.name} could not be loaded "
                        f"({exc.__class__.__name__})") from None


# -- rendering -------------------------------------------------------------------------------


def render(frame: np.ndarray, photometric: str = "MONOCHROME2") -> np.ndarray:
    """One frame as an 8-bit picture, as a display shows it at full range: grey (H, W) from
    any integer or float dtype, min-max over the frame (MONOCHROME1 inverted); colour
    (H, W, 3) kept as RGB, scaled the same way unless already 8-bit."""
    f = np.asarray(frame)
    if f.ndim not in (2, 3) or (f.ndim == 3 and f.shape[2] not in (3, 4)) or 0 in f.shape:
        raise DeidError(f"text detection needs one frame (rows, columns[, 3]), got shape {f.shape}")
    if f.ndim == 3:
        f = f[..., :3]
        if f.dtype == np.uint8:
            return np.ascontiguousarray(f)
    if f.dtype == np.bool_:
        out = f.astype(np.uint8) * 255
    else:
        if f.dtype.kind == "f":
            f = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
        if f.dtype.kind not in "iuf":
            raise DeidError(f"text detection cannot read pixels of dtype {f.dtype}")
        if f.dtype.itemsize > 4 or f.dtype == np.uint32:
            f = f.astype(np.float64)
        out = cv2.normalize(np.ascontiguousarray(f), None, 0, 255, cv2.NORM_MINMAX, cv2.CV_8U)
    if photometric == "MONOCHROME1" and out.ndim == 2:
        out = 255 - out
    return out


@dataclass(frozen=True, slots=True)
class _Crop:
    """Where the model looks: ``area`` of the frame, resized by ``scale``; ``text_h`` is the
    highest candidate row inside, which bounds the height of a box found there."""

    area: Row
    scale: float
    text_h: int


def _crops(cands: list[Row], s: DetectorSettings, rows: int, cols: int) -> list[_Crop]:
    """Each candidate row with context around it, at the scale that suits its text height;
    overlapping crops of one scale merged."""
    out: list[_Crop] = []
    for c in sorted(cands, key=lambda r: (r.y, r.x)):
        scale = s.upscale if c.h < s.small_text else (s.large_text / c.h if c.h > s.large_text else 1.0)
        px, py = int(max(s.min_context, s.context * c.h)), int(max(s.min_context, s.context_rows * c.h))
        x0, y0 = max(0, c.x - px), max(0, c.y - py)
        r = Row(x0, y0, min(cols, c.x + c.w + px) - x0, min(rows, c.y + c.h + py) - y0)
        for i, o in enumerate(out):
            if o.scale == scale and _overlap(o.area, r):
                x0, y0 = min(o.area.x, r.x), min(o.area.y, r.y)
                x1, y1 = max(o.area.x + o.area.w, r.x + r.w), max(o.area.y + o.area.h, r.y + r.h)
                out[i] = _Crop(Row(x0, y0, x1 - x0, y1 - y0), scale, max(o.text_h, c.h))
                break
        else:
            out.append(_Crop(r, scale, c.h))
    return out


def _overlap(a: Row, b: Row) -> bool:
    return a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h and b.y < a.y + a.h


# -- the model --------------------------------------------------------------------------------


def _probability(session, img: np.ndarray) -> np.ndarray:
    rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
    x = (rgb.astype(np.float32) * (1 / 127.5) - 1.0).transpose(2, 0, 1)[None]
    return session.run(None, {session.get_inputs()[0].name: x})[0][0, 0]


def _model_boxes(session, img: np.ndarray, scale: float, s: DetectorSettings,
                 max_h: float) -> list[TextBox]:
    """Boxes of ``img`` (a frame or a crop) found by the model at ``scale``, in ``img``'s pixels."""
    rows, cols = img.shape[:2]
    rh = max(_STRIDE, int(round(rows * scale / _STRIDE)) * _STRIDE)
    rw = max(_STRIDE, int(round(cols * scale / _STRIDE)) * _STRIDE)
    interp = cv2.INTER_AREA if rh < rows else cv2.INTER_LINEAR
    prob = _probability(session, cv2.resize(img, (rw, rh), interpolation=interp))
    mask = cv2.dilate((prob > s.prob_threshold).astype(np.uint8), np.ones((2, 2), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    sx, sy = cols / rw, rows / rh
    out = []
    for i in range(1, n):
        x, y, w, h, _area = stats[i]
        if min(w, h) < 3:
            continue
        window = labels[y:y + h, x:x + w] == i
        score = float(prob[y:y + h, x:x + w][window].mean())
        if score < s.box_threshold:
            continue
        d = w * h * s.unclip / (2 * (w + h))  # DB's unclip distance for a rectangle
        x0, y0 = max(0, int((x - d) * sx)), max(0, int((y - d) * sy))
        x1, y1 = min(cols, int(np.ceil((x + w + d) * sx))), min(rows, int(np.ceil((y + h + d) * sy)))
        bw, bh = x1 - x0, y1 - y0
        # the network also answers large uniform regions (an organ, a skull) with "text";
        # a text line is lower than max_h and, with two or more characters, wider than high
        if bh > max_h or bw < s.min_aspect * bh:
            continue
        out.append(TextBox(x0, y0, bw, bh, round(score, 3)))
    return out


# -- detection --------------------------------------------------------------------------------


class TextDetector:
    """Finds burned-in text in frames. Cheap to build and to pickle (a worker process gets
    its own copy); the model session is made on first use and shared in the process."""

    def __init__(self, settings: DetectorSettings | None = None, model: Path | None = None) -> None:
        self.settings = settings or DetectorSettings()
        self.model = Path(model) if model else _default_model()

    def load(self) -> float:
        """Create the model session now (else the first detection does); seconds it took,
        0.0 when this process already had it."""
        if (str(self.model), self.settings.threads) in _sessions:
            return 0.0
        t0 = time.perf_counter()
        _session(self.model, self.settings.threads)
        return time.perf_counter() - t0

    def detect(self, frame: np.ndarray, photometric: str = "MONOCHROME2") -> tuple[TextBox, ...]:
        """Text boxes in one frame: (rows, columns) grey of any dtype, or (rows, columns, 3)
        RGB; ``photometric`` as in the dataset (MONOCHROME1 is shown inverted)."""
        return self.detect_rendered(render(frame, photometric))

    def detect_rendered(self, img: np.ndarray) -> tuple[TextBox, ...]:
        """Text boxes in a frame already :func:`render`-ed to 8 bits."""
        s = self.settings
        rows, cols = img.shape[:2]
        max_h = max(24.0, s.max_text_height * max(rows, cols))
        whole = (s.mode == "full" or rows * cols < s.whole_below or (img.ndim == 3 and s.whole_colour))
        cands = None if whole else text_rows(img, s.stroke_contrast, s.stroke_width,
                                             s.min_text_height, max_h, s.max_marks)
        if cands is None:  # whole frame: by choice, or too busy for the gate to tell
            scale = min(s.max_upscale, s.full_side / max(rows, cols))
            return tuple(_model_boxes(_session(self.model, s.threads), img, scale, s, max_h))
        if not cands:
            return ()
        session = _session(self.model, s.threads)
        boxes: list[TextBox] = []
        for crop in _crops(cands, s, rows, cols):
            r = crop.area
            # a box much higher than the row that brought the model here is a blob, not text
            limit = min(max_h, s.row_to_box * crop.text_h)
            for b in _model_boxes(session, img[r.y:r.y + r.h, r.x:r.x + r.w], crop.scale, s, limit):
                boxes.append(TextBox(b.x + r.x, b.y + r.y, b.width, b.height, b.score))
        return tuple(boxes)


# -- frames of an instance ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FramePlan:
    """Which images of a multi-frame instance the detector looks at: each frame in ``frames``
    on its own, and one per-pixel ``combine`` ("median" or "max") of the frames in
    ``combined``. Burned-in text is static: it keeps its value in a median of frames while
    the anatomy under it moves and blurs away."""

    frames: tuple[int, ...]
    combined: tuple[int, ...] = ()
    combine: str = "median"

    def __post_init__(self) -> None:
        if not self.frames and not self.combined:
            raise ConfigError("frame plan: nothing to look at")
        if self.combine not in ("median", "max"):
            raise ConfigError("frame plan: combine must be 'median' or 'max'")


def plan_frames(count: int, sampled: int = 8) -> FramePlan:
    """The measured default: the first frame, plus the median of up to ``sampled`` evenly
    spaced frames when there are several (two model-sized looks per instance, whatever its
    length)."""
    if count < 1:
        raise DeidError(f"text detection: an instance has {count} frames")
    if count == 1:
        return FramePlan((0,))
    picks = np.unique(np.round(np.linspace(0, count - 1, min(count, sampled))).astype(int))
    return FramePlan((0,), tuple(int(i) for i in picks))


@dataclass(frozen=True, slots=True)
class InstanceText:
    """Text found in an instance: ``boxes``, the union over every image looked at, is what
    blanking covers in every frame; ``looked_at`` counts those images."""

    boxes: tuple[TextBox, ...]
    looked_at: int


def _stack(pixels: np.ndarray, frames: int) -> np.ndarray:
    arr = np.asarray(pixels)
    stack = arr[None] if frames == 1 else arr
    if frames < 1 or len(stack) != frames or stack.ndim not in (3, 4):
        raise DeidError(f"text detection: pixel array of shape {arr.shape} does not hold {frames} frame(s)")
    return stack


def detect_frames(detector: TextDetector, pixels: np.ndarray, photometric: str, frames: int = 1,
                  plan: FramePlan | None = None) -> InstanceText:
    """Text in an instance's decoded pixels, shaped as pydicom's ``pixel_array``: (rows,
    cols[, 3]) for one frame, (frames, rows, cols[, 3]) for ``frames`` > 1."""
    stack = _stack(pixels, frames)
    plan = plan or plan_frames(frames)
    if any(not 0 <= i < frames for i in plan.frames + plan.combined):
        raise DeidError(f"text detection: frame plan names a frame outside 0..{frames - 1}")
    images = [render(stack[i], photometric) for i in plan.frames]
    if plan.combined:
        picked = np.stack([render(stack[i], photometric) for i in plan.combined])
        merged = np.median(picked, axis=0) if plan.combine == "median" else picked.max(axis=0)
        images.append(merged.astype(np.uint8))
    return InstanceText(tuple(b for img in images for b in detector.detect_rendered(img)), len(images))


# -- blanking ----------------------------------------------------------------------------------


def blank_boxes(pixels: np.ndarray, boxes: tuple[TextBox, ...], frames: int = 1,
                margin: int = 2) -> np.ndarray:
    """A copy of ``pixels`` (shaped as for :func:`detect_frames`) with every box, grown by
    ``margin`` pixels and clipped to the frame, set to zero in every frame and sample;
    every other pixel unchanged."""
    stack = _stack(pixels, frames)
    if margin < 0:
        raise DeidError("blanking: margin must be >= 0")
    out = stack.copy()
    rows, cols = out.shape[1:3]
    for b in boxes:
        g = b.grown(margin, rows, cols)
        out[:, g.y:g.y + g.height, g.x:g.x + g.width] = 0
    return out if frames > 1 else out[0]
