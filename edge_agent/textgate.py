"""The cheap first look for burned-in text: rows of character-like strokes in an 8-bit picture.

Morphology and connected components only (well under the model's cost per frame); what it
finds is where :mod:`edge_agent.textdetect` runs the text-detection model. Tuned for recall:
a row here is a place worth a look, not a finding.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["Row", "text_rows"]


@dataclass(frozen=True, slots=True)
class Row:
    """A candidate row of text: columns ``x``..``x + w``, rows ``y``..``y + h``."""

    x: int
    y: int
    w: int
    h: int


def text_rows(img: np.ndarray, contrast: float, stroke_width: int, min_height: int,
              max_height: float, max_marks: int) -> list[Row] | None:
    """Straight rows of three or more character-like marks in an 8-bit picture: strokes up to
    ``stroke_width`` wide that differ from their surroundings by ``contrast`` of the range
    (top-hat for bright text, black-hat for dark, per colour channel), ``min_height`` to
    ``max_height`` px high, side by side. None when more than ``max_marks`` such marks make
    the frame too busy to tell (speckle, texture)."""
    channels = [img] if img.ndim == 2 else [img[..., c] for c in range(3)]
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (stroke_width + 1, stroke_width + 1))
    threshold = int(np.ceil(contrast * 255.0))
    found: list[Row] = []
    for op in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT):  # bright text, dark text
        stroke = None
        for channel in channels:
            m = cv2.morphologyEx(channel, op, kernel)
            stroke = m if stroke is None else np.maximum(stroke, m)
        marks = cv2.threshold(stroke, threshold - 1, 1, cv2.THRESH_BINARY)[1]
        if cv2.countNonZero(marks) < 3 * min_height:
            continue
        rows_found = _rows_of_marks(marks, min_height, max_height, max_marks)
        if rows_found is None:
            return None
        found.extend(rows_found)
    return found


def _blobs(marks: np.ndarray) -> np.ndarray:
    """(x, y, w, h, area) float rows of the 8-connected blobs of a binary image."""
    n, labels = cv2.connectedComponents(marks, connectivity=8)
    if n < 2:
        return np.zeros((0, 5), np.float32)
    points = cv2.findNonZero(marks).reshape(-1, 2)  # (x, y) of every mark: cheaper than np.nonzero
    xs, ys = points[:, 0], points[:, 1]
    lab = labels[ys, xs]
    order = np.argsort(lab, kind="stable")
    lab, ys, xs = lab[order], ys[order], xs[order]
    starts = np.searchsorted(lab, np.arange(1, n))
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    area = np.diff(np.append(starts, len(lab)))
    return np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1, area], axis=1).astype(np.float32)


def _rows_of_marks(marks: np.ndarray, min_height: int, max_height: float, max_marks: int) -> list[Row] | None:
    """Rows of blobs: each a character (no wider than 2.5 heights) or, counting as several,
    touching characters (wider, with gaps inside); None when there are too many to link."""
    blobs = _blobs(marks)
    if len(blobs) == 0:
        return []
    x, y, w, h, area = blobs.T
    fill = area / (w * h)
    sized = (h >= min_height) & (h <= max_height)
    single = sized & (w <= 2.5 * h) & (fill >= 0.12) & ((fill <= 0.9) | (w <= 0.4 * h))
    touching = sized & (w > 2.5 * h) & (fill >= 0.2) & (fill <= 0.75)
    keep = single | touching
    if keep.sum() < 2:
        return []
    if keep.sum() > max_marks:
        return None
    weight = np.where(touching, np.floor(w / (0.7 * h)), 1.0)[keep]
    x, y, w, h = x[keep], y[keep], w[keep], h[keep]
    cy = y + h / 2
    hi = np.maximum(h[:, None], h[None, :])
    lo = np.minimum(h[:, None], h[None, :])
    gap = np.maximum(x[None, :] - (x + w)[:, None], x[:, None] - (x + w)[None, :])
    top, bottom = y, y + h  # characters of a line share their top (capitals) or their baseline
    aligned = (np.abs(top[:, None] - top[None, :]) <= 0.2 * hi) | (np.abs(bottom[:, None] - bottom[None, :]) <= 0.2 * hi)
    link = aligned & (np.abs(cy[:, None] - cy[None, :]) <= 0.4 * hi) & (hi <= 1.8 * lo) & (gap <= 1.2 * hi)
    np.fill_diagonal(link, False)
    if not link.any():
        return []
    out = []
    for members in _groups(link, weight):
        out.extend(_straight_rows(members, x, y, w, h, weight))
    return out


def _straight_rows(members, x, y, w, h, weight) -> list[Row]:
    """A linked group (which may chain several rows, or text and speckle, through neighbours)
    cut into straight rows: bands of centres half a text height tall, then runs of blobs
    without a gap wider than a text height; a row needs three or more characters."""
    typical = float(np.median(h[members]))
    by_cy = members[np.argsort((y + h / 2)[members], kind="stable")]
    bands, start = [], 0
    cy = (y + h / 2)[by_cy]
    for i in range(1, len(by_cy) + 1):
        if i == len(by_cy) or cy[i] - cy[start] > 0.5 * typical:
            bands.append(by_cy[start:i])
            start = i
    out = []
    for band in bands:
        band = band[np.argsort(x[band], kind="stable")]
        ends = np.maximum.accumulate((x + w)[band])
        cuts = np.nonzero(x[band][1:] - ends[:-1] > 1.2 * typical)[0] + 1
        for row in np.split(band, cuts):
            if len(row) < 2 or weight[row].sum() < 3:
                continue
            gx0, gy0 = x[row].min(), y[row].min()
            gx1, gy1 = (x + w)[row].max(), (y + h)[row].max()
            if gy1 - gy0 > 1.6 * float(np.median(h[row])) or gx1 - gx0 < 1.5 * (gy1 - gy0):
                continue  # a slanted chain (a staircase edge), not a line of text
            out.append(Row(int(gx0), int(gy0), int(gx1 - gx0), int(gy1 - gy0)))
    return out


def _groups(link: np.ndarray, weight: np.ndarray) -> list[np.ndarray]:
    """Connected groups of a symmetric adjacency matrix whose weights add up to three or
    more, as index arrays."""
    n, labels = connected_components(csr_matrix(link), directed=False)
    heavy = np.nonzero(np.bincount(labels, weights=weight, minlength=n) >= 3)[0]
    return [np.nonzero(labels == g)[0] for g in heavy]
