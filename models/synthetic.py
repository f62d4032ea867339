"""Small synthetic MedMNIST-layout data sets, for tests and demos that must not depend on
real data: class ``k`` is a noisy image with a bright blob placed at the ``k``-th of C
positions on a circle (and, for RGB, tinted by class), so a small model learns it in a few
epochs. Deterministic for a given seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["synthetic_images", "write_synthetic_npz", "write_dicom", "write_synthetic_dicom_folder"]


def synthetic_images(n: int, size: tuple[int, int] = (28, 28), channels: int = 1,
                     classes: int = 2, seed: int = 0, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (``(n, H, W)`` grey or ``(n, H, W, 3)`` RGB) and balanced labels."""
    rng = np.random.default_rng(seed)
    h, w = size
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, channels), np.float32)
    for i, k in enumerate(labels):
        angle = 2 * np.pi * k / classes + rng.normal(0, 0.15)
        cy = h / 2 + 0.28 * h * np.sin(angle) + rng.normal(0, 0.04 * h)
        cx = w / 2 + 0.28 * w * np.cos(angle) + rng.normal(0, 0.04 * w)
        r = 0.12 * min(h, w) * rng.uniform(0.8, 1.2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = 0.25 + 0.55 * blob + rng.normal(0, 0.08, (h, w))
        for c in range(channels):
            tint = 1.0 if channels == 1 else 0.7 + 0.3 * np.cos(2 * np.pi * (k + c) / max(classes, 3))
            out[i, :, :, c] = img * tint
    out = np.clip(out, 0, 1)
    if np.issubdtype(dtype, np.integer):
        out = np.round(out * np.iinfo(dtype).max)
    images = out.astype(dtype)
    return (images[..., 0] if channels == 1 else images), labels.astype(np.uint8)[:, None]


def write_synthetic_npz(path: str | Path, counts: dict[str, int] | None = None,
                        size: tuple[int, int] = (28, 28), channels: int = 1, classes: int = 2,
                        seed: int = 0, dtype=np.uint8) -> Path:
    """Write ``{split}_images`` / ``{split}_labels`` for each split in ``counts``."""
    counts = counts or {"train": 200, "val": 60, "test": 60}
    arrays = {}
    for i, (split, n) in enumerate(counts.items()):
        x, y = synthetic_images(n, size, channels, classes, seed=seed * 101 + i, dtype=dtype)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def write_dicom(path: str | Path, pixels: np.ndarray, patient_id: str,
                photometric: str = "MONOCHROME2", bits_stored: int = 16) -> Path:
    """A minimal Secondary Capture DICOM file holding a 2D uint16 grey image."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient_id, "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_synthetic_dicom_folder(folder: str | Path, n: int = 60, size: tuple[int, int] = (24, 24),
                                 class_names: tuple[str, ...] = ("benign", "malignant"),
                                 patients: int = 20, seed: int = 0) -> Path:
    """``n`` synthetic 12-bit DICOM images of ``patients`` patients and a ``labels.csv``
    (``file,label,patient``) naming their classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = synthetic_images(n, size, classes=len(class_names), seed=seed, dtype=np.uint16)
    lines = ["file,label,patient"]
    for i in range(n):
        write_dicom(folder / f"img{i}.dcm", x[i] >> 4, f"P{i % patients}", bits_stored=12)
        lines.append(f"img{i}.dcm,{class_names[int(y[i, 0])]},P{i % patients}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder
