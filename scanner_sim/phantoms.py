"""Synthetic pixel data per modality, with a lesion that is absent, benign or malignant.

Deterministic: every function takes a ``numpy.random.Generator``; the same seed draws the
same image. Lesions follow the textbook look: benign is smooth and round (a soft-edged disc),
malignant is irregular and spiculated (a lobulated border with radial spicules).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LABELS", "lesion_mask", "ct_slice", "mr_slice", "radiograph", "mammogram", "ultrasound_cine"]

LABELS = ("healthy", "benign", "malignant")


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:rows, :cols].astype(np.float32)
    return y / rows - 0.5, x / cols - 0.5


def lesion_mask(rows: int, cols: int, label: str, rng: np.random.Generator,
                centre: tuple[float, float] | None = None, radius: float | None = None) -> np.ndarray:
    """A float mask in [0, 1]: zeros for healthy, a soft disc for benign, a spiculated blob
    for malignant. ``centre`` is (y, x) in [-0.5, 0.5]; ``radius`` a fraction of the width."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}")
    if label == "healthy":
        return np.zeros((rows, cols), np.float32)
    y, x = _grid(rows, cols)
    cy, cx = centre if centre is not None else (rng.uniform(-0.12, 0.12), rng.uniform(-0.15, 0.15))
    r0 = radius if radius is not None else rng.uniform(0.03, 0.06)
    dy, dx = y - cy, x - cx
    dist = np.hypot(dy, dx)
    if label == "benign":
        return np.clip((r0 - dist) / (0.2 * r0) + 0.5, 0, 1).astype(np.float32)
    theta = np.arctan2(dy, dx)
    border = r0 * (1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6.28)) + 0.15 * np.sin(7 * theta + rng.uniform(0, 6.28)))
    spicules = np.zeros_like(dist)
    for angle in rng.uniform(-np.pi, np.pi, size=int(rng.integers(8, 14))):
        width = rng.uniform(0.04, 0.08)
        length = r0 * rng.uniform(1.6, 2.6)
        ray = np.exp(-(np.angle(np.exp(1j * (theta - angle))) / width) ** 2)
        spicules = np.maximum(spicules, ray * (dist < length))
    body = np.clip((border - dist) / (0.1 * r0) + 0.5, 0, 1)
    return np.maximum(body, 0.8 * spicules * (dist > 0.5 * r0)).astype(np.float32)


def ct_slice(label: str, rng: np.random.Generator, size: int = 512, z: float = 0.0) -> np.ndarray:
    """Stored values (int16, HU + 1024 with RescaleIntercept -1024) of a chest CT slice."""
    y, x = _grid(size, size)
    hu = np.full((size, size), -1000.0, np.float32)
    hu[(x / 0.42) ** 2 + (y / 0.32) ** 2 < 1] = 40.0
    lung_scale = 1.0 - 0.3 * abs(z)
    for cx in (-0.17, 0.17):
        hu[((x - cx) / (0.13 * lung_scale)) ** 2 + (y / (0.22 * lung_scale)) ** 2 < 1] = -850.0
    hu[((x) / 0.03) ** 2 + ((y + 0.2) / 0.03) ** 2 < 1] = 700.0  # spine
    mask = lesion_mask(size, size, label, rng, centre=(rng.uniform(-0.1, 0.1), rng.choice([-0.17, 0.17])),
                       radius=rng.uniform(0.025, 0.045))
    hu = hu * (1 - mask) + 45.0 * mask
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    return np.clip(hu + 1024, 0, 4095).astype(np.int16)


def mr_slice(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A T2-like head slice, uint16 in 0..4095."""
    y, x = _grid(size, size)
    img = np.zeros((size, size), np.float32)
    head = (x / 0.4) ** 2 + (y / 0.45) ** 2
    img[head < 1] = 900.0
    img[head < 0.8] = 1400.0
    img[((x) / 0.08) ** 2 + (y / 0.18) ** 2 < 1] = 2600.0  # ventricles
    mask = lesion_mask(size, size, label, rng)
    img = img * (1 - mask) + 3000.0 * mask
    img += rng.normal(0, 40, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


def radiograph(label: str, rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """A chest radiograph (CR/DX), uint16 12-bit, bright bone and mediastinum, dark lungs."""
    y, x = _grid(size, size)
    img = np.full((size, size), 3200.0, np.float32)
    for cx in (-0.18, 0.18):
        img[((x - cx) / 0.16) ** 2 + ((y + 0.02) / 0.32) ** 2 < 1] = 900.0
    img += 500 * np.cos(np.pi * x) ** 8
    mask = lesion_mask(size, size, label, rng, centre=(rng.uniform(-0.15, 0.1), rng.choice([-0.18, 0.18])))
    img = img * (1 - mask) + 2200.0 * mask
    img += rng.normal(0, 30, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


def mammogram(label: str, rng: np.random.Generator, rows: int = 512, cols: int = 416) -> np.ndarray:
    """A mediolateral-oblique-like breast on a dark background, uint16 12-bit."""
    y, x = _grid(rows, cols)
    img = np.full((rows, cols), 80.0, np.float32)
    breast = ((x + 0.5) / 0.8) ** 2 + (y / 0.48) ** 2 < 1
    img[breast] = 1800.0 + 600 * rng.random(int(breast.sum())).astype(np.float32) * 0.2
    mask = lesion_mask(rows, cols, label, rng, centre=(rng.uniform(-0.15, 0.15), rng.uniform(-0.35, -0.05)))
    img = img * (1 - mask) + 3300.0 * mask * breast + img * mask * (~breast)
    img += rng.normal(0, 25, img.shape).astype(np.float32)
    return np.clip(img, 0, 4095).astype(np.uint16)


def ultrasound_cine(label: str, rng: np.random.Generator, frames: int = 8, rows: int = 240,
                    cols: int = 320) -> np.ndarray:
    """A sector-shaped B-mode cine loop, RGB uint8 of shape (frames, rows, cols, 3); a few
    frames repeat (a probe held still), which a later stage drops as redundant."""
    y, x = np.mgrid[:rows, :cols].astype(np.float32)
    apex_x, depth = cols / 2, rows * 0.95
    r = np.hypot(x - apex_x, y)
    theta = np.arctan2(x - apex_x, y)
    sector = (r < depth) & (np.abs(theta) < 0.6)
    mask = lesion_mask(rows, cols, label, rng, centre=(0.1, rng.uniform(-0.1, 0.1)), radius=0.08)
    out = np.zeros((frames, rows, cols, 3), np.uint8)
    speckle = rng.rayleigh(40, size=(rows, cols)).astype(np.float32)
    for f in range(frames):
        if f % 3 == 2:  # a repeated frame
            out[f] = out[f - 1]
            continue
        shift = int(rng.integers(-3, 4))
        tissue = np.roll(speckle, shift, axis=0) * (0.6 + 0.4 * np.sin(r / 18 + f))
        tissue = tissue * (1 - 0.85 * mask)  # lesions are hypoechoic
        grey = np.clip(tissue * sector, 0, 255).astype(np.uint8)
        out[f] = grey[..., None]
    return out
