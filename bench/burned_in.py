"""Recall, false positives and cost of burned-in text detection on a labelled set built here.

    python bench/burned_in.py [--seed 0] [--overlays 6] [--quick | --smoke] [--mode cascade|full]

The set is built at run time, nothing is stored: real pixel data from pydicom's test files
(CT, MR, CR, NM, US, RGB, secondary captures) and from the scanner simulator's phantoms (the
only MG and DX here, and the 512 x 512 CT that bench/ingest.py sends), each

* clean, as it is, where it truly carries no text (checked by eye; a file that already shows
  text, such as every ultrasound here, the CR with its "R" marker and the SMPTE test
  patterns, is labelled ``real-text`` and counts for image recall, never as clean);
* with 1-3 overlaid lines of fake identifying text (names as PN "DOE^JANE", dates, times,
  patient IDs, accession numbers, ages) in Hershey and DejaVu fonts, 7 to 40 px high (scaled
  up on large frames), at corners, edges and the centre, drawn at the top of the stored
  range, at the frame's maximum, at mid-grey or at its minimum (dark on bright).

A line is found when the union of the detected boxes covers >= 80 % of its visible ink (the
drawn pixels that changed by >= 15 % of the frame's range); lines under 10 px, or with less
than half their ink visible, are reported apart and not counted for the targets. Image
recall: an overlaid image is found when at least one of its counted lines is (what a
quarantine needs); "every line" is what blanking needs. False positive: a clean image with
any box. Ultrasound sources (which carry text already) also get overlays. Then the frame
plans on overlaid cines, and clean phantom series as bench/ingest.py sends them. Times are
the process's CPU (what the edge's shared cores pay), not wall time.

Baseline, measured in the same run: the model alone on whole frames (``mode="full"``, what
the cascade saves work against) on the single-frame overlaid images; the ratios are the
cascade's line recall and CPU per image over the whole-frame model's on those images.
Exit status 1 when a target is missed (see Targets). ``--quick``: a few images (CI-sized,
targets enforced); ``--smoke``: the quick set, the baseline on 6 images, targets reported
but not enforced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verdict import Verdict, add_smoke  # noqa: E402  (bench/verdict.py)

from edge_agent.textdetect import (  # noqa: E402
    DetectorSettings, FramePlan, TextDetector, detect_frames, plan_frames)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TTF = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf",
       "DejaVuSansCondensed.ttf")
HERSHEY = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
           cv2.FONT_HERSHEY_COMPLEX)
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "top", "bottom", "left",
             "right", "centre")
INTENSITIES = ("top", "max", "mid", "min")
HEIGHTS = (7, 8, 9, 10, 12, 14, 16, 20, 24, 32, 40)
LEGIBLE_CONTRAST = 0.15
SMALL = 10  # px: lines at least this high count for the targets


@dataclass(frozen=True)
class Targets:
    """Set after measuring (docs/burned_in.md): the model alone, on whole frames at 736 px,
    finds 0.94 of the images and lines here; the cascade holds that within about 0.02."""

    image_recall: float = 0.93  # overlaid images (lines >= 10 px, legible) with a line found
    line_recall: float = 0.90  # such lines found
    clean_fp: float = 0.05  # clean images (real and phantom) with any box
    series_fp: float = 0.03  # phantom slices like bench/ingest.py's with any box
    recall_vs_whole: float = 0.95  # line recall over the whole-frame model's, same images
    cpu_vs_whole: float = 0.50  # CPU per image over the whole-frame model's, same images (they carry text)


TARGETS = Targets()


# -- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Frames of one image as decoded: (F, H, W) grey in stored values or (F, H, W, 3) RGB."""

    name: str
    modality: str
    frames: np.ndarray
    photometric: str  # MONOCHROME1, MONOCHROME2 or RGB (colour spaces converted on load)
    bits_stored: int
    signed: bool
    label: str  # "clean", "real-text" or "phantom"


CLEAN = {  # name: (modality, crop as (y0, y1, x0, x1) or None)
    "693_UNCR.dcm": ("CT", None), "J2K_pixelrep_mismatch.dcm": ("CT", None),
    "bad_sequence.dcm": ("CT", None), "explicit_VR-UN.dcm": ("CT", None),
    "CT_small.dcm": ("CT", None), "eCT_Supplemental.dcm": ("CT", None),
    "MR-SIEMENS-DICOM-WithOverlays.dcm": ("MR", None), "MR2_UNCR.dcm": ("MR", None),
    "emri_small.dcm": ("MR", None), "RG1_UNCR.dcm": ("CR", None),
    "JPEG2000_UNC.dcm": ("NM", None), "image_dfl.dcm": ("OT", None),
    # the Doppler sector of an ultrasound, inside its frame lines: clean RGB pixels
    "US1_UNCR.dcm": ("US", (200, 345, 95, 340)),
}
REAL_TEXT = {
    "US1_UNCR.dcm": "US", "OBXXXX1A.dcm": "US", "JPGLosslessP14SV1_1s_1f_8b.dcm": "US",
    "gdcm-US-ALOKA-16.dcm": "US", "examples_palette.dcm": "US", "examples_ybr_color.dcm": "US",
    "RG3_UNCR.dcm": "CR", "GDCMJ2K_TextGBR.dcm": "OT", "mlut_18.dcm": "OT", "vlut_04.dcm": "OT",
}
QUICK_CLEAN = ("693_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "US1_UNCR.dcm")
QUICK_TEXT = ("US1_UNCR.dcm", "GDCMJ2K_TextGBR.dcm")


def _read(name: str) -> tuple[np.ndarray, str, int, bool]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut, convert_color_space

    ds = dcmread(get_testdata_file(name))
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        arr, photometric = apply_color_lut(arr, ds), "RGB"
    elif photometric.startswith("YBR"):
        if photometric in ("YBR_FULL", "YBR_FULL_422") and arr.dtype == np.uint8:
            arr = convert_color_space(arr, photometric, "RGB")
        photometric = "RGB"
    if frames == 1:
        arr = arr[None]
    return arr, photometric, int(ds.BitsStored), bool(int(ds.get("PixelRepresentation", 0)))


def load_sources(quick: bool, seed: int) -> list[Source]:
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (modality, crop) in CLEAN.items():
            if quick and name not in QUICK_CLEAN:
                continue
            arr, photometric, bits, signed = _read(name)
            if crop:
                arr = np.ascontiguousarray(arr[:, crop[0]:crop[1], crop[2]:crop[3]])
            out.append(Source(name + (":crop" if crop else ""), modality, arr, photometric, bits,
                              signed, "clean"))
        for name, modality in REAL_TEXT.items():
            if quick and name not in QUICK_TEXT:
                continue
            arr, photometric, bits, signed = _read(name)
            out.append(Source(name, modality, arr, photometric, bits, signed, "real-text"))
    out.extend(_phantoms(seed, count=1 if quick else 3))
    return out


def _phantoms(seed: int, count: int) -> list[Source]:
    from scanner_sim import phantoms

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        out.append(Source(f"phantom-ct-{i}", "CT", phantoms.ct_slice(str(rng.choice(phantoms.LABELS)), rng)[None],
                          "MONOCHROME2", 12, True, "phantom"))
        out.append(Source(f"phantom-mr-{i}", "MR", phantoms.mr_slice(str(rng.choice(phantoms.LABELS)), rng)[None],
                          "MONOCHROME2", 12, False, "phantom"))
        out.append(Source(f"phantom-dx-{i}", "DX", phantoms.radiograph(str(rng.choice(phantoms.LABELS)), rng)[None],
                          "MONOCHROME2", 12, False, "phantom"))
        out.append(Source(f"phantom-mg-{i}", "MG", phantoms.mammogram(str(rng.choice(phantoms.LABELS)), rng)[None],
                          "MONOCHROME2", 12, False, "phantom"))
    cine = phantoms.ultrasound_cine(str(rng.choice(phantoms.LABELS)), rng)
    out.append(Source("phantom-us-cine", "US", cine, "RGB", 8, False, "phantom"))
    return out


# -- overlays --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One overlaid text line: its bounding box, ink and how it was drawn (never the text)."""

    x: int
    y: int
    width: int
    height: int
    ink: np.ndarray = field(repr=False)  # bool (H, W): drawn pixels that stand out (visible)
    font: str
    intensity: str
    position: str
    visible: float  # share of the drawn pixels that changed by >= 15 % of the frame's range


@dataclass(frozen=True)
class Sample:
    source: Source
    frames: np.ndarray
    lines: tuple[Line, ...]
    kind: str  # "overlay", "clean", "real-text"


def fake_text(rng: np.random.Generator) -> str:
    first = ("JANE", "JOHN", "MARIA", "WEI", "AHMED", "OLGA", "PIERRE", "YUKI", "ANNA", "LUIS")
    last = ("DOE", "SMITH", "GARCIA", "MULLER", "NGUYEN", "KOWALSKI", "OKAFOR", "ROSSI", "BROWN")
    d = (int(rng.integers(1930, 2025)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    t = (int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    kind = int(rng.integers(0, 8))
    if kind == 0:
        return f"{rng.choice(last)}^{rng.choice(first)}"
    if kind == 1:
        return f"{d[0]}{d[1]:02d}{d[2]:02d}" if rng.random() < 0.5 else f"{d[2]:02d}/{d[1]:02d}/{d[0]}"
    if kind == 2:
        return f"{t[0]:02d}:{t[1]:02d}:{t[2]:02d}"
    if kind == 3:
        return f"ID: {int(rng.integers(10**6, 10**9))}" if rng.random() < 0.5 else \
            f"MRN {int(rng.integers(100, 999))}-{int(rng.integers(10, 99))}-{int(rng.integers(1000, 9999))}"
    if kind == 4:
        return f"ACC A{int(rng.integers(10**8, 10**9))}"
    if kind == 5:
        return f"{int(rng.integers(1, 99)):03d}Y {rng.choice(['F', 'M'])}"
    if kind == 6:
        return f"{rng.choice(last)}, {rng.choice(first)} {d[2]:02d}.{d[1]:02d}.{d[0]}"
    return f"{rng.choice(last)}^{rng.choice(first)}  {int(rng.integers(1, 99)):03d}Y"


def _ink_mask(text: str, height: int, font: str, width_limit: int) -> np.ndarray:
    """Anti-aliased (TTF) or aliased (Hershey) ink in [0, 1], cropped to the drawn pixels."""
    if font.endswith(".ttf"):
        from PIL import Image, ImageDraw, ImageFont

        f = ImageFont.truetype(str(FONT_DIR / font), size=max(4, round(height / 0.95)))
        left, top, right, bottom = f.getbbox(text)
        img = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(img).text((2 - left, 2 - top), text, fill=255, font=f)
        ink = np.asarray(img, np.float32) / 255.0
    else:
        face = int(font)
        scale = cv2.getFontScaleFromHeight(face, height, 1)
        thick = 1 if height < 20 else 2
        (w, h), base = cv2.getTextSize(text, face, scale, thick)
        img = np.zeros((h + base + 6, w + 6), np.uint8)
        cv2.putText(img, text, (3, h + 3), face, scale, 255, thick, cv2.LINE_8)
        ink = img.astype(np.float32) / 255.0
    ys, xs = np.nonzero(ink > 0)
    ink = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    if ink.shape[1] > width_limit:  # a long line on a narrow frame: keep what fits
        ink = ink[:, :width_limit]
    return ink


def _place(position: str, shape: tuple[int, int], size: tuple[int, int], rng) -> tuple[int, int]:
    h, w = shape
    th, tw = size
    pad_y, pad_x = int(rng.integers(2, max(3, h // 20))), int(rng.integers(2, max(3, w // 20)))
    y = {"top": pad_y, "bottom": h - th - pad_y}.get(position.split("-")[0], (h - th) // 2)
    x = {"left": pad_x, "right": w - tw - pad_x}.get(position.split("-")[-1], (w - tw) // 2)
    if position in ("left", "right"):
        y = int(rng.integers(h // 4, max(h // 4 + 1, 3 * h // 4 - th)))
    if position == "centre":
        y += int(rng.integers(-h // 8, h // 8 + 1))
        x += int(rng.integers(-w // 8, w // 8 + 1))
    return max(0, min(h - th, y)), max(0, min(w - tw, x))


def _value(src: Source, frame: np.ndarray, intensity: str, rng) -> np.ndarray:
    if src.photometric == "RGB":
        colours = {"top": (255, 255, 255), "max": (255, 255, 0), "mid": (128, 128, 128),
                   "min": (0, 255, 0)}
        top = 255 if frame.dtype == np.uint8 else float(frame.max())
        return np.array(colours[intensity], np.float64) * top / 255.0
    lo, hi = float(frame.min()), float(frame.max())
    stored_top = 2 ** (src.bits_stored - 1) - 1 if src.signed else 2 ** src.bits_stored - 1
    value = {"top": stored_top, "max": hi, "mid": (lo + hi) / 2, "min": lo}[intensity]
    if src.photometric == "MONOCHROME1" and intensity == "top":
        value = 0.0 if not src.signed else -(2 ** (src.bits_stored - 1))  # white on display
    return np.array(value, np.float64)


def overlay(src: Source, rng: np.random.Generator, lines: int) -> Sample:
    """The source with ``lines`` text lines drawn into every frame at the same place."""
    frames = src.frames.astype(np.float64)
    h, w = frames.shape[1:3]
    scale = max(1.0, max(h, w) / 640)  # large frames carry larger text in pixels
    drawn: list[Line] = []
    taken = np.zeros((h, w), bool)
    positions = rng.permutation(POSITIONS)
    intensity = str(rng.choice(INTENSITIES))  # one annotation value per image, as scanners draw
    for position in positions[:lines]:
        height = int(round(int(rng.choice(HEIGHTS)) * (scale if rng.random() < 0.7 else 1.0)))
        height = min(height, h // 3)
        fonts = TTF + tuple(str(f) for f in HERSHEY)
        font = str(rng.choice(fonts))
        ink = _ink_mask(fake_text(rng), height, font, width_limit=w - 4)
        th, tw = ink.shape
        if th >= h - 4:
            continue
        y, x = _place(str(position), (h, w), (th, tw), rng)
        if taken[y:y + th, x:x + tw].any():
            continue
        taken[y:y + th, x:x + tw] = True
        value = _value(src, frames[0], intensity, rng)
        region = frames[:, y:y + th, x:x + tw]
        before = region[0].copy()
        alpha = ink[None, :, :, None] if frames.ndim == 4 else ink[None]
        frames[:, y:y + th, x:x + tw] = region * (1 - alpha) + value * alpha
        change = np.abs(frames[0, y:y + th, x:x + tw] - before)
        change = change.max(axis=-1) if change.ndim == 3 else change
        span = float(np.ptp(src.frames[0])) or 1.0
        drawn_px = ink > 0.5
        visible = drawn_px & (change >= LEGIBLE_CONTRAST * span)
        mask = np.zeros((h, w), bool)
        mask[y:y + th, x:x + tw] = visible
        drawn.append(Line(x, y, tw, th, mask, font if font.endswith(".ttf") else f"hershey-{font}",
                          intensity, str(position), float(visible.sum() / max(1, drawn_px.sum()))))
    info = np.iinfo(src.frames.dtype) if src.frames.dtype.kind in "iu" else None
    if info:
        frames = np.clip(np.round(frames), info.min, info.max)
    return Sample(src, frames.astype(src.frames.dtype), tuple(drawn), "overlay")


def build_set(sources: list[Source], overlays: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for src in sources:
        if src.label == "real-text":
            out.append(Sample(src, src.frames, (), "real-text"))
            if src.modality != "US":
                continue
        else:
            out.append(Sample(src, src.frames, (), "clean"))
        for _ in range(overlays):
            out.append(overlay(src, rng, int(rng.integers(1, 4))))
    return out


# -- measurement ----------------------------------------------------------------------------


def covered(boxes, shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    for b in boxes:
        m[b.y:b.y + b.height, b.x:b.x + b.width] = True
    return m


@dataclass(frozen=True)
class Outcome:
    sample: Sample
    boxes: tuple
    seconds: float  # CPU
    found: tuple[bool, ...]  # per line: >= 80 % of its visible ink inside the boxes


def counted(line: Line) -> bool:
    """A line the targets count: at least SMALL px high, and at least half its ink visible."""
    return line.height >= SMALL and line.visible >= 0.5


def measure(detector: TextDetector, samples: list[Sample], plan=None) -> list[Outcome]:
    out = []
    for s in samples:
        frames = len(s.frames)
        pixels = s.frames if frames > 1 else s.frames[0]
        t0 = time.process_time()  # CPU time: what the edge's shared cores pay, steady under load
        boxes = detect_frames(detector, pixels, s.source.photometric, frames,
                              plan(frames) if plan else None).boxes
        seconds = time.process_time() - t0
        cov = covered(boxes, s.frames.shape[1:3])
        out.append(Outcome(s, boxes, seconds, tuple(bool(l.ink.any() and cov[l.ink].mean() >= 0.8)
                                                     for l in s.lines)))
    return out


def _share(flags) -> str:
    flags = list(flags)
    return f"{np.mean(flags):.3f} ({sum(flags)}/{len(flags)})" if flags else "-"


@dataclass(frozen=True)
class Figures:
    line_recall: float
    image_recall: float
    clean_fp: float


def report(outcomes: list[Outcome]) -> Figures:
    lines = [(o, l, f) for o in outcomes for l, f in zip(o.sample.lines, o.found)]
    counted_lines = [(o, l, f) for o, l, f in lines if counted(l)]
    print("\n## Recall per overlaid line (found: >= 80 % of its visible ink inside the boxes)")
    print(f"lines >= {SMALL} px, legible       {_share(f for _, _, f in counted_lines)}")
    for lo, hi in ((7, 10), (10, 14), (14, 24), (24, 10**6)):
        sel = [f for _, l, f in lines if lo <= l.height < hi and l.visible >= 0.5]
        print(f"  {lo:>2}-{min(hi, 999) - 1:<3} px                    {_share(sel)}")
    for key, values in (("modality", sorted({o.sample.source.modality for o in outcomes})),
                        ("intensity", INTENSITIES)):
        for v in values:
            sel = [f for o, l, f in counted_lines
                   if (o.sample.source.modality if key == "modality" else l.intensity) == v]
            if sel:
                print(f"  {key} {v:<12}         {_share(sel)}")
    fonts = sorted({l.font.split("-")[0] if l.font.startswith("hershey") else "ttf" for _, l, _ in lines})
    for font in fonts:
        sel = [f for _, l, f in counted_lines if (l.font.startswith("hershey") if font == "hershey" else l.font.endswith(".ttf"))]
        print(f"  font {font:<12}             {_share(sel)}")
    print(f"less than half the ink visible   {_share(f for _, l, f in lines if l.visible < 0.5)}  (not counted)")
    with_lines = [o for o in outcomes if any(counted(l) for l in o.sample.lines)]
    image_any = [any(f for l, f in zip(o.sample.lines, o.found) if counted(l)) for o in with_lines]
    image_all = [all(f for l, f in zip(o.sample.lines, o.found) if counted(l)) for o in with_lines]
    print("\n## Images")
    print(f"overlaid, a counted line found    {_share(image_any)}   (what quarantine needs)")
    print(f"overlaid, every counted line      {_share(image_all)}   (what blanking needs)")
    clean = [o for o in outcomes if o.sample.kind == "clean"]
    fp = [bool(o.boxes) for o in clean]
    print(f"clean, any box (false positive)   {_share(fp)}  {[o.sample.source.name for o in clean if o.boxes]}")
    real = [o for o in outcomes if o.sample.kind == "real-text"]
    print(f"real burned-in text, any box      {_share(bool(o.boxes) for o in real)}  "
          f"missed: {[o.sample.source.name for o in real if not o.boxes]}")
    stray = [o.sample.source.name for o in outcomes if o.sample.kind == "overlay"
             and o.sample.source.label != "real-text" for b in o.boxes
             if not any(b.x < l.x + l.width and l.x < b.x + b.width and b.y < l.y + l.height
                        and l.y < b.y + b.height for l in o.sample.lines)]
    print(f"boxes away from every line, images without real text: {len(stray)} {sorted(set(stray))}")
    print("\n## CPU time per image (one intra-op thread; process CPU, not wall)")
    groups: dict[str, list[float]] = {}
    for o in outcomes:
        h, w = o.sample.frames.shape[1:3]
        size = "512x512" if (h, w) == (512, 512) else ("<=640" if max(h, w) <= 640 else ">640")
        text = "clean" if o.sample.kind == "clean" else "text"
        groups.setdefault(f"{size:8s} {text:5s} {'phantom' if o.sample.source.label == 'phantom' else 'real'}",
                          []).append(o.seconds * 1000)
    for key in sorted(groups):
        ms = groups[key]
        print(f"  {key:24s} p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  (n={len(ms)})")
    return Figures(float(np.mean([f for _, _, f in counted_lines])), float(np.mean(image_any)),
                   float(np.mean(fp)))


def compare_plans(detector: TextDetector, samples: list[Sample]) -> None:
    """Multi-frame instances with the same text on every frame: which images to look at."""
    cines = [s for s in samples if len(s.frames) > 2 and s.kind == "overlay"]
    if not cines:
        return
    plans = {
        "first frame": lambda n: FramePlan((0,)),
        "median of 8": lambda n: FramePlan((), plan_frames(n).combined),
        "max of 8": lambda n: FramePlan((), plan_frames(n).combined, "max"),
        "first + median (default)": plan_frames,
        "every frame": lambda n: FramePlan(tuple(range(n))),
    }
    print(f"\n## Multi-frame ({len(cines)} overlaid cines: {sorted({s.source.name for s in cines})})")
    for name, plan in plans.items():
        out = measure(detector, cines, plan)
        found = [f for o in out for l, f in zip(o.sample.lines, o.found) if counted(l)]
        ms = [o.seconds * 1000 for o in out]
        print(f"  {name:26s} lines {_share(found)}  p50 {np.median(ms):6.1f} ms per instance")


def ingest_series(detector: TextDetector, count: int, seed: int) -> tuple[float, float]:
    """Clean phantom series as the scanner simulator sends them (512 x 512 CT, as in
    bench/ingest.py, then MR, CR, MG): mean cost per CT slice and share of slices with a box."""
    from scanner_sim.studies import generate_studies

    print(f"\n## Clean phantom series (scanner_sim, seed {seed})")
    shares = []
    ct_mean = 0.0
    for modality in ("CT", "MR", "CR", "MG"):
        frames = [ds.pixel_array for st in generate_studies(modality, count, seed=seed, images_per_study=1)
                  for ds in st.datasets][:count]
        ms, boxed = [], 0
        for f in frames:
            t0 = time.process_time()
            boxed += bool(detector.detect(f))
            ms.append((time.process_time() - t0) * 1000)
        shares.append((boxed, len(frames)))
        ct_mean = float(np.mean(ms)) if modality == "CT" else ct_mean
        print(f"  {modality} {frames[0].shape[0]}x{frames[0].shape[1]}: {len(frames)} slices, with a box "
              f"{boxed}; ms mean {np.mean(ms):.2f} p50 {np.percentile(ms, 50):.2f} p95 {np.percentile(ms, 95):.2f}")
    boxed, total = (sum(v) for v in zip(*shares))
    return ct_mean, boxed / total


def whole_frame_baseline(settings: dict, cascade: list[Outcome], limit: int | None
                         ) -> tuple[tuple[float, float], tuple[float, float], int]:
    """The baseline: the model on whole frames (``mode="full"``, the other settings as given)
    on the single-frame overlaid images with a counted line (the first ``limit``). Returns
    (line recall, mean CPU s) of the cascade and of the baseline on those images, and their
    number."""
    chosen = [o for o in cascade if o.sample.kind == "overlay" and len(o.sample.frames) == 1
              and any(counted(line) for line in o.sample.lines)][:limit]
    whole = TextDetector(DetectorSettings(**{**settings, "mode": "full"}))
    whole.load()
    base = measure(whole, [o.sample for o in chosen])

    def figures(outcomes: list[Outcome]) -> tuple[float, float]:
        found = [f for o in outcomes for line, f in zip(o.sample.lines, o.found) if counted(line)]
        return float(np.mean(found)), float(np.mean([o.seconds for o in outcomes]))

    return figures(chosen), figures(base), len(chosen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlays", type=int, default=6, help="overlaid variants per source image")
    ap.add_argument("--quick", action="store_true", help="a few images, for CI (< 30 s)")
    add_smoke(ap)
    ap.add_argument("--mode", choices=("cascade", "full"), default="cascade")
    ap.add_argument("--settings", default="{}", metavar="JSON",
                    help='DetectorSettings fields to change, e.g. \'{"min_aspect": 0.8}\'')
    args = ap.parse_args(argv)
    args.quick = args.quick or args.smoke
    settings = json.loads(args.settings)
    detector = TextDetector(DetectorSettings(**{**settings, "mode": args.mode}))
    load = detector.load()
    overlays = 4 if args.quick else args.overlays
    samples = build_set(load_sources(args.quick, args.seed), overlays, args.seed)
    kinds = {k: sum(s.kind == k for s in samples) for k in ("overlay", "clean", "real-text")}
    print(f"# Burned-in text: mode={args.mode} seed={args.seed} overlays={overlays} "
          f"quick={args.quick}; model load {load * 1000:.0f} ms")
    print(f"set: {len(samples)} images: {kinds}; "
          f"{sum(len(s.lines) for s in samples)} overlaid lines")
    outcomes = measure(detector, samples)
    figures = report(outcomes)
    if not args.quick:
        compare_plans(detector, samples)
    _, series_fp = ingest_series(detector, 12 if args.quick else 60, args.seed + 1)
    verdict = Verdict(args.smoke)
    print()
    if args.mode != "full":
        ours, whole, n = whole_frame_baseline(settings, outcomes, 6 if args.smoke else None)
        print(f"## Baseline: the model on whole frames, {n} single-frame overlaid images\n"
              f"line recall cascade {ours[0]:.3f}, whole frames {whole[0]:.3f}; CPU per image cascade "
              f"{ours[1] * 1000:.1f} ms, whole frames {whole[1] * 1000:.1f} ms")
        verdict.ratio("line recall cascade/whole frames", ours[0], whole[0], at_least=TARGETS.recall_vs_whole)
        verdict.ratio("CPU per image cascade/whole frames", ours[1], whole[1], at_most=TARGETS.cpu_vs_whole)
    else:
        print("## Baseline: this run is the whole-frame model itself (no ratio)")
    verdict.target(f"phantom series FP {series_fp:.3f} <= {TARGETS.series_fp}", series_fp <= TARGETS.series_fp)
    verdict.target(f"line recall {figures.line_recall:.3f} >= {TARGETS.line_recall}",
                   figures.line_recall >= TARGETS.line_recall)
    verdict.target(f"image recall {figures.image_recall:.3f} >= {TARGETS.image_recall}",
                   figures.image_recall >= TARGETS.image_recall)
    verdict.target(f"clean FP {figures.clean_fp:.3f} <= {TARGETS.clean_fp}", figures.clean_fp <= TARGETS.clean_fp)
    return verdict.exit_status()


if __name__ == "__main__":
    sys.exit(main())
