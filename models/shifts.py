"""Acquisition shifts for an out-of-distribution check, applied at test time only.

Another scanner or another site changes how an image looks, not what it shows: its
brightness, contrast, gamma (detector response), sharpness, resolution and noise. Each
:class:`Shift` maps a *raw* image (what a source holds, before the model card's chain) to
the same image as such a device might have recorded it, in the raw dtype and range, so the
card's chain runs unchanged after it. Pure and deterministic (the noise is seeded per image
index). Training never sees them; the pipeline scores the held-out split under each.
torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from models.errors import TransformError

__all__ = ["Shift", "SHIFTS", "apply_shift"]

_KINDS = ("brightness", "contrast", "gamma", "blur", "downsample", "noise")


@dataclass(frozen=True)
class Shift:
    """One shift: ``kind`` and its ``amount`` (an offset, a factor, an exponent, a sigma in
    pixels, a downsampling factor, a noise sigma; intensities as fractions of the range)."""

    kind: str
    amount: float

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TransformError(f"unknown shift {self.kind!r} (known: {', '.join(_KINDS)})")
        if self.kind in ("contrast", "gamma", "blur", "downsample", "noise") and not self.amount > 0:
            raise TransformError(f"shift {self.kind} needs a positive amount")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.amount:g}"

    def on_unit(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The shift on a float image in [0, 1], ``(H, W)`` or ``(H, W, C)``."""
        h, w = img.shape[:2]
        if self.kind == "brightness":
            out = img + self.amount
        elif self.kind == "contrast":
            out = img.mean() + self.amount * (img - img.mean())
        elif self.kind == "gamma":
            out = np.power(np.clip(img, 0, 1), self.amount)
        elif self.kind == "blur":
            out = cv2.GaussianBlur(img, (0, 0), self.amount, borderType=cv2.BORDER_REFLECT_101)
        elif self.kind == "downsample":
            small = cv2.resize(img, (max(1, round(w / self.amount)), max(1, round(h / self.amount))),
                               interpolation=cv2.INTER_AREA)
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        else:
            out = img + rng.normal(0.0, self.amount, img.shape)
        return np.clip(out.reshape(img.shape), 0.0, 1.0)


# the default battery: mild enough that a radiologist would still read every image
SHIFTS: tuple[Shift, ...] = (
    Shift("brightness", 0.1), Shift("contrast", 0.7), Shift("gamma", 0.7), Shift("gamma", 1.5),
    Shift("blur", 1.0), Shift("downsample", 2.0), Shift("noise", 0.05),
)


def _range(img: np.ndarray, fixed: tuple[float, float] | None) -> tuple[float, float]:
    if fixed is not None:
        return fixed
    lo, hi = float(img.min()), float(img.max())
    return (lo, hi if hi > lo else lo + 1.0)


def apply_shift(images, shift: Shift, intensity_range: tuple[float, float] | None = None,
                seed: int = 0):
    """``images`` (an array or a sequence of raw images) as ``shift`` would record them,
    same dtype; intensities are taken relative to ``intensity_range`` (the source's fixed
    range) or, without one, to each image's own min..max."""
    out = []
    for i, raw in enumerate(images):
        a = np.asarray(raw)
        lo, hi = _range(a, intensity_range)
        unit = (a.astype(np.float32) - lo) / (hi - lo)
        shifted = shift.on_unit(unit, np.random.default_rng([seed, i])) * (hi - lo) + lo
        if np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            shifted = np.clip(np.round(shifted), info.min, info.max)
        out.append(shifted.astype(a.dtype))
    if isinstance(images, np.ndarray):
        return np.stack(out) if out else images.copy()
    return tuple(out)
