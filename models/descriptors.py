"""The structural descriptors as a network branch: ``F_desc`` of ``Z = [F_cnn || F_trans || F_desc]``.

The edge computes HOG and wavelet descriptors per image (:mod:`models.modality`); here the
same two descriptors are computed inside the graph, from the model's own input, with fixed
(untrained) filters, so the exported ONNX model still takes one input and every runtime that
runs it (evaluate, the edge, the bench) feeds it nothing new:

- HOG: image gradients from ``[-1, 0, 1]`` filters, each pixel's gradient magnitude voting
  into ``bins`` unsigned orientations (a soft vote, ``max(0, cos 2(theta - theta_k))^8``,
  written with products of the gradient so that no atan2 is needed), averaged over a
  ``cells x cells`` grid and L2-normalised per cell;
- wavelet: the mean energy of every sub-band of a ``levels``-level 2-D Haar decomposition
  (the sub-bands :func:`models.modality.wavelet_descriptor` averages, for even sizes), as
  ``log1p``.

The vector is normalised (LayerNorm) and projected to ``dim`` features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DescriptorBranch", "hog_cells", "haar_energies"]

_SHARPNESS = 8  # power of the orientation vote: a gradient votes mostly into its nearest bins


def hog_cells(grey: torch.Tensor, cells: int, bins: int) -> torch.Tensor:
    """``(N, bins * cells * cells)`` orientation histograms of a ``(N, 1, H, W)`` batch."""
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
    gy = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
    # clamped, not "+ 1e-12": the ONNX exporter's optimizer folds a tiny added constant away,
    # and flat regions then divide 0 by 0 in the exported graph (not in PyTorch)
    mag2 = torch.clamp_min(gx * gx + gy * gy, 1e-12)
    mag = torch.sqrt(mag2)
    cos2, sin2 = (gx * gx - gy * gy) / mag2, 2 * gx * gy / mag2  # cos 2theta, sin 2theta
    angles = torch.arange(bins, dtype=grey.dtype, device=grey.device) * (math.pi / bins)
    ck, sk = torch.cos(2 * angles).view(1, bins, 1, 1), torch.sin(2 * angles).view(1, bins, 1, 1)
    votes = mag * torch.relu(cos2 * ck + sin2 * sk) ** _SHARPNESS  # (N, bins, H, W)
    h, w = votes.shape[-2:]
    votes = F.pad(votes, (0, -w % cells, 0, -h % cells))  # any size: cells of equal pixels
    hist = F.avg_pool2d(votes, (-(-h // cells), -(-w // cells)))
    hist = hist / torch.sqrt((hist * hist).sum(dim=1, keepdim=True) + 1e-6)
    return hist.flatten(1)


def haar_energies(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``(N, C * (1 + 3 * levels))`` mean sub-band energies, coarsest approximation first,
    then (horizontal, vertical, diagonal) details from the coarsest level to the finest,
    as :func:`pywt.wavedec2` orders them."""
    n, c = x.shape[:2]
    filt = torch.tensor([[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]],
                        dtype=x.dtype, device=x.device).mul(0.5).unsqueeze(1)  # (4, 1, 2, 2)
    approx = x.reshape(n * c, 1, *x.shape[2:])
    details = []
    for _ in range(levels):
        h, w = approx.shape[-2:]
        approx = approx[..., : h - h % 2, : w - w % 2]
        bands = F.conv2d(approx, filt, stride=2)
        details.append((bands[:, 1:] ** 2).mean(dim=(2, 3)))  # (N*C, 3)
        approx = bands[:, :1]
    energies = torch.cat([(approx**2).mean(dim=(2, 3)), *reversed(details)], dim=1)
    return energies.reshape(n, -1)


class DescriptorBranch(nn.Module):
    """HOG + Haar-energy descriptor of the input, normalised and projected to ``dim``."""

    def __init__(self, in_channels: int, dim: int, cells: int = 4, bins: int = 9, levels: int = 2) -> None:
        super().__init__()
        self.cells, self.bins, self.levels = cells, bins, levels
        width = bins * cells * cells + in_channels * (1 + 3 * levels)
        self.project = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(dim=1, keepdim=True)
        raw = torch.cat([hog_cells(grey, self.cells, self.bins),
                         torch.log1p(haar_energies(x, self.levels))], dim=1)
        return self.project(raw)
