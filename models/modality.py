"""Modality-aware preprocessing of DICOM pixels: what the edge runs on every image, built
from the same registered transforms (:mod:`models.transforms`) that training and inference
run, so the chain recorded beside each tensor is the chain a model card can carry.

Two halves. :func:`modality_values` reads a dataset into *modality values*: the modality LUT
applied (CT stored values -> Hounsfield units through rescale slope/intercept), MONOCHROME1
inverted so larger always means denser, colour (ultrasound) converted to grey, frames first.
:func:`prepare` then runs the modality's chain (:meth:`ModalityConfig.chain`), cheap steps
first: min-max on the modality's extrema (the profile's ``window``, in modality units),
resize to the model's input (bilinear for CT/MR/US, bicubic for CR/DX/MG), *then* the heavy
filter at model resolution (:class:`Denoise`: Gaussian, or non-local means for CT/MR); then
HOG and wavelet descriptors. Cine loops first drop frames that correlate above a threshold
with the last kept frame. No torch here: edge devices import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import dataclasses
from typing import ClassVar

import cv2
import numpy as np
import pywt
from skimage.feature import hog

from models.errors import TransformError
from models.transforms import Compose, Resize, ScaleIntensity, ToChannelsFirst, Transform, register

__all__ = [
    "Denoise",
    "modality_values",
    "ModalityConfig",
    "DEFAULTS",
    "config_for",
    "Prepared",
    "prepare",
    "hog_descriptor",
    "wavelet_descriptor",
    "keep_distinct_frames",
]

XRAY = ("CR", "DX", "MG", "DR", "RF", "XA")
_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}
DENOISERS = ("none", "gaussian", "nlm")


@register
@dataclasses.dataclass(frozen=True)
class Denoise(Transform):
    """Gaussian blur or non-local means on a [0, 1] image, clipped back to [0, 1] (a bicubic
    resize before it may overshoot). Run it after the resize: at 128 x 128 NLM with 3-pixel
    patches and a 7-pixel search costs ~1.7 ms, at 512 x 512 with OpenCV's defaults ~30 ms."""

    method: str = "gaussian"
    sigma: float = 0.8
    strength: float = 6.0
    patch: int = 3
    search: int = 7
    name: ClassVar[str] = "Denoise"

    def __post_init__(self) -> None:
        if self.method not in DENOISERS:
            raise TransformError(f"Denoise: method must be one of {DENOISERS}, got {self.method!r}")
        if self.patch % 2 == 0 or self.search % 2 == 0 or self.search < self.patch:
            raise TransformError("Denoise: patch and search must be odd, search >= patch")

    def __call__(self, image, rng=None):
        img = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
        if self.method == "gaussian":
            img = cv2.GaussianBlur(img, (0, 0), self.sigma)
        elif self.method == "nlm":  # OpenCV's NLM works on 8-bit images
            u8 = np.round(img * 255).astype(np.uint8)
            img = cv2.fastNlMeansDenoising(u8, None, self.strength, self.patch, self.search)
            img = img.astype(np.float32) / 255.0
        return img


@dataclass(frozen=True, slots=True)
class ModalityConfig:
    """How one modality is prepared; serializable (``to_config``) into the model card."""

    size: int = 128
    interpolation: str = "bilinear"
    window: tuple[float, float] = (0.0, 4095.0)  # (low, high) in modality units
    denoise: str = "gaussian"  # "none", "gaussian", "nlm"
    gaussian_sigma: float = 0.8
    nlm_strength: float = 6.0
    hog_cells: int = 4  # cells per side at model resolution
    wavelet: str = "haar"
    wavelet_levels: int = 2
    cine_correlation: float = 0.98

    def chain(self) -> Compose:
        """The registered transforms this config stands for: (H, W) values -> (1, S, S)."""
        return Compose([
            ScaleIntensity(self.window[0], self.window[1]),
            Resize(self.size, self.size, self.interpolation),
            Denoise(self.denoise, self.gaussian_sigma, self.nlm_strength),
            ToChannelsFirst(),
        ])

    def __post_init__(self):
        if self.interpolation not in _INTERP or self.denoise not in DENOISERS:
            raise ValueError(f"unknown interpolation {self.interpolation!r} or denoise {self.denoise!r}")
        if not self.window[0] < self.window[1] or self.size < 8:
            raise ValueError(f"window {self.window} must be (low, high) with low < high, size >= 8")

    def to_config(self) -> dict:
        return {**asdict(self), "window": list(self.window)}

    @classmethod
    def from_config(cls, data: dict) -> ModalityConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "window" in known:
            known["window"] = tuple(float(v) for v in known["window"])
        return cls(**known)


DEFAULTS: dict[str, ModalityConfig] = {
    "CT": ModalityConfig(window=(-1000.0, 1000.0), denoise="nlm"),
    "MR": ModalityConfig(window=(0.0, 4095.0), denoise="nlm"),
    "US": ModalityConfig(window=(0.0, 255.0), denoise="gaussian"),
    **{m: ModalityConfig(interpolation="bicubic", window=(0.0, 4095.0)) for m in XRAY},
}


def config_for(modality: str, size: int | None = None) -> ModalityConfig:
    cfg = DEFAULTS.get(modality.upper(), ModalityConfig())
    return replace(cfg, size=size) if size else cfg


def modality_values(ds) -> np.ndarray:
    """A pydicom dataset's pixels as float32 (frames, H, W) modality values."""
    from pydicom.pixels import apply_modality_lut

    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1
    if frames == 1:
        arr = arr[None]
    if colour:
        arr = np.stack([_grey(f) for f in arr])
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        bits = int(getattr(ds, "BitsStored", 16) or 16)
        arr = (2**bits - 1) - arr.astype(np.int64)
    values = apply_modality_lut(arr, ds) if not colour else arr
    return np.asarray(values, dtype=np.float32)


# -- steps ----------------------------------------------------------------------------------


def _grey(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 3 and frame.shape[-1] in (3, 4):  # RGB(A) ultrasound
        return cv2.cvtColor(np.ascontiguousarray(frame[..., :3]), cv2.COLOR_RGB2GRAY)
    return frame


def hog_descriptor(image: np.ndarray, cfg: ModalityConfig) -> np.ndarray:
    cell = max(2, image.shape[0] // cfg.hog_cells)
    return hog(image, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2),
               feature_vector=True).astype(np.float32)


def wavelet_descriptor(image: np.ndarray, cfg: ModalityConfig) -> np.ndarray:
    """Mean energy of every sub-band of a ``wavelet_levels``-level 2-D decomposition."""
    coeffs = pywt.wavedec2(image, cfg.wavelet, level=cfg.wavelet_levels)
    bands = [coeffs[0]] + [b for level in coeffs[1:] for b in level]
    return np.array([float(np.mean(np.square(b))) for b in bands], dtype=np.float32)


def keep_distinct_frames(frames: np.ndarray, threshold: float) -> list[int]:
    """Indices of frames kept: each differs (Pearson r <= threshold) from the last kept."""
    kept = [0]
    last = frames[0].astype(np.float32).ravel()
    for i in range(1, len(frames)):
        cur = frames[i].astype(np.float32).ravel()
        a, b = last - last.mean(), cur - cur.mean()
        denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
        r = float(np.dot(a, b)) / denom if denom else 1.0
        if r <= threshold:
            kept.append(i)
            last = cur
    return kept


# -- the whole chain ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepared:
    """The model-ready output: ``tensor`` is (frames, 1, size, size) float32 in [0, 1];
    ``chain`` is the transform config that made it (what a model card records)."""

    tensor: np.ndarray
    hog: np.ndarray
    wavelet: np.ndarray
    kept_frames: tuple[int, ...]
    chain: dict = field(default_factory=dict)


def prepare(values: np.ndarray, cfg: ModalityConfig) -> Prepared:
    """Modality values, (frames, H, W) or (H, W), -> :class:`Prepared`."""
    frames = values[None] if values.ndim == 2 else values
    kept = keep_distinct_frames(frames, cfg.cine_correlation) if len(frames) > 1 else [0]
    chain = cfg.chain()
    tensor = np.stack([chain(frames[i]) for i in kept]).astype(np.float32)
    first = tensor[0, 0]
    return Prepared(tensor, hog_descriptor(first, cfg), wavelet_descriptor(first, cfg),
                    tuple(kept), chain.to_config())
