"""Data sources for training and evaluation, loaded into memory as raw images and labels.

* any MedMNIST-layout ``.npz`` (``{split}_images`` / ``{split}_labels`` for train, val, test;
  2D, grey ``(N, H, W)`` or ``(N, H, W, 1)`` or RGB ``(N, H, W, 3)``, any number of classes,
  any size, any numeric dtype);
* a folder of DICOM files with a labels CSV (``file,label`` and optionally ``patient`` and
  ``split``); without a ``split`` column the folder is split by patient so no patient is in
  two splits.

Every source comes with a manifest (what was read: counts, shapes, content digests) whose
SHA-256 goes into the model card, so a model can be traced to the exact data it saw.
torch-free: evaluation and the edge load data without it.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medchain.canonical import canonical_bytes
from models.errors import DatasetError

__all__ = ["Split", "DataSource", "SPLITS", "load_npz", "load_dicom_folder", "load_source",
           "patient_split"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split: raw images (an array when they share a shape, else a tuple of arrays),
    integer labels and, where known, the patient of each image."""

    name: str
    images: np.ndarray | tuple[np.ndarray, ...]
    labels: np.ndarray
    patients: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSource:
    """What a data source holds and the facts the recipe derives its settings from."""

    kind: str
    splits: dict[str, Split]
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    intensity_range: tuple[float, float] | None
    manifest: dict = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(canonical_bytes(self.manifest)).hexdigest()

    def split(self, name: str) -> Split:
        if name not in self.splits or len(self.splits[name]) == 0:
            have = ", ".join(s for s in self.splits if len(self.splits[s])) or "none"
            raise DatasetError(f"{self.kind} source has no {name!r} split (has: {have})")
        return self.splits[name]


def _labels(raw: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(raw)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetError(f"{where}: labels of shape {labels.shape} look multi-label; "
                           "only single-label classification is supported")
    if labels.size and (not np.issubdtype(labels.dtype, np.number) or np.any(labels < 0)
                        or np.any(labels != np.round(labels))):
        raise DatasetError(f"{where}: labels must be non-negative integers")
    return labels.astype(np.int64)


def _npz_images(raw: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(raw.dtype, np.number) or raw.dtype == np.bool_:
        raise DatasetError(f"{where}: images must be numeric, got {raw.dtype}")
    if raw.ndim == 3:
        return raw
    if raw.ndim == 4 and raw.shape[3] in (1, 3):
        return raw[..., 0] if raw.shape[3] == 1 else raw
    raise DatasetError(f"{where}: images of shape {raw.shape} are not 2D grey (N, H, W) or "
                       "RGB (N, H, W, 3); 3D volumes are not supported")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _intensity_range(dtype: np.dtype, images: np.ndarray) -> tuple[float, float] | None:
    """A fixed range for the whole source when its dtype gives one; None means per-image."""
    if dtype == np.uint8:
        return (0.0, 255.0)
    if np.issubdtype(dtype, np.floating) and images.size and images.min() >= 0 and images.max() <= 1:
        return (0.0, 1.0)
    return None


def load_npz(path: str | Path, class_names: tuple[str, ...] | None = None) -> DataSource:
    """Load a MedMNIST-layout ``.npz`` (all of its splits that are present)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    splits: dict[str, Split] = {}
    manifest: dict = {"kind": "npz", "splits": {}}
    for name in SPLITS:
        ik, lk = f"{name}_images", f"{name}_labels"
        if ik not in arrays and lk not in arrays:
            continue
        if ik not in arrays or lk not in arrays:
            raise DatasetError(f"{path}: has one of {ik}/{lk} but not the other")
        images = _npz_images(arrays[ik], f"{path}:{ik}")
        labels = _labels(arrays[lk], f"{path}:{lk}")
        if len(images) != len(labels):
            raise DatasetError(f"{path}: {len(images)} {name} images but {len(labels)} labels")
        splits[name] = Split(name, images, labels)
        manifest["splits"][name] = {
            "count": len(labels), "shape": list(images.shape[1:]), "dtype": str(images.dtype),
            "images_sha256": _digest(images), "labels_sha256": _digest(labels),
        }
    if not splits:
        raise DatasetError(f"{path}: no train/val/test images in it (expected MedMNIST keys "
                           "such as train_images, train_labels)")
    shapes = {s.images.shape[1:] for s in splits.values()}
    if len({sh[:2] for sh in shapes}) != 1 or len({len(sh) for sh in shapes}) != 1:
        raise DatasetError(f"{path}: splits disagree on image shape {sorted(shapes)}")
    first = next(iter(splits.values())).images
    top = max(int(s.labels.max(initial=-1)) for s in splits.values()) + 1
    names = _class_names(arrays, class_names, top, path)
    ref = splits.get("train", next(iter(splits.values())))
    return DataSource("npz", splits, names, 3 if first.ndim == 4 else 1,
                      tuple(int(x) for x in first.shape[1:3]),
                      _intensity_range(first.dtype, ref.images), manifest)


def _class_names(arrays: dict, given: tuple[str, ...] | None, top: int, path: Path) -> tuple[str, ...]:
    if given is None and "class_names" in arrays:
        given = tuple(str(x) for x in np.asarray(arrays["class_names"]).ravel())
    if given is None:
        given = tuple(f"class_{i}" for i in range(max(top, 2)))
    if len(given) < top:
        raise DatasetError(f"{path}: labels go up to {top - 1} but {len(given)} class names given")
    if len(given) < 2:
        raise DatasetError(f"{path}: need at least two classes")
    return tuple(given)


def patient_split(patients: list[str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> list[str]:
    """Assign each item a split so that all items of one patient share it.

    Patients are shuffled with ``seed`` and cut by the fractions of *patients*; with at
    least three patients, each split gets at least one. Pure and deterministic.
    """
    unique = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(unique))
    n = len(unique)
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = max(n - n_val - n_test, 0)
    chosen: dict[str, str] = {}
    for rank, idx in enumerate(order):
        chosen[unique[idx]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return [chosen[p] for p in patients]


def _read_dicom(path: Path, where: str) -> tuple[np.ndarray, str | None]:
    """Pixels and PatientID of one file; errors name ``where`` (a CSV row), never the file
    name, which exports sometimes build from patient names."""
    import pydicom  # heavy; only DICOM sources need it

    from models.modality import modality_values  # the edge's reader: same values both sides

    try:
        ds = pydicom.dcmread(path)
        values = modality_values(ds)  # (frames, H, W): modality LUT, MONOCHROME1, colour
    except Exception as exc:  # pydicom raises many types for bad files
        raise DatasetError(f"{where}: unreadable DICOM image ({type(exc).__name__})") from None
    if values.ndim != 3:
        raise DatasetError(f"{where}: pixel array of shape {values.shape} is not a 2D image")
    pixels = values[len(values) // 2]  # cine or multi-frame: the middle frame stands for the series
    patient = str(getattr(ds, "PatientID", "") or "") or None
    return pixels, patient


def load_dicom_folder(folder: str | Path, labels_csv: str | Path | None = None,
                      seed: int = 0) -> DataSource:
    """Load the DICOM files a CSV labels (``file,label[,patient][,split]``; default
    ``FOLDER/labels.csv``). Labels may be integers or class names (sorted for indices)."""
    folder = Path(folder)
    csv_path = Path(labels_csv) if labels_csv else folder / "labels.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: labels CSV not found")
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DatasetError(f"{csv_path}: needs a header with at least 'file' and 'label' columns")
    raw_labels = [r["label"].strip() for r in rows]
    if all(lbl.isdigit() for lbl in raw_labels):
        ints = [int(x) for x in raw_labels]
        names = tuple(f"class_{i}" for i in range(max(max(ints) + 1, 2)))
    else:
        names = tuple(sorted(set(raw_labels)))
        ints = [names.index(x) for x in raw_labels]
    images, patients, entries = [], [], []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        path = folder / row["file"]
        where = f"{csv_path.name} row {number}"
        if not path.is_file():
            raise DatasetError(f"{where}: the listed file is missing")
        pixels, tag_patient = _read_dicom(path, where)
        images.append(pixels)
        patients.append((row.get("patient") or "").strip() or tag_patient or row["file"])
        entries.append([row["file"], hashlib.sha256(path.read_bytes()).hexdigest()])
    if "split" in rows[0] and all((r.get("split") or "").strip() for r in rows):
        assigned = [r["split"].strip() for r in rows]
        bad = sorted(set(assigned) - set(SPLITS))
        if bad:
            raise DatasetError(f"{csv_path}: unknown split names {bad}")
        leaks = {p for p in patients if len({a for a, q in zip(assigned, patients) if q == p}) > 1}
        if leaks:
            raise DatasetError(f"{csv_path}: {len(leaks)} patient(s) appear in more than one split")
    else:
        assigned = patient_split(patients, seed=seed)
    channels = 3 if any(img.ndim == 3 and img.shape[2] in (3, 4) for img in images) else 1
    sizes = Counter(img.shape[:2] for img in images)
    size = sizes.most_common(1)[0][0]
    splits = {}
    for name in SPLITS:
        idx = [i for i, a in enumerate(assigned) if a == name]
        splits[name] = Split(name, tuple(images[i] for i in idx),
                             np.asarray([ints[i] for i in idx], np.int64),
                             tuple(patients[i] for i in idx))
    manifest = {"kind": "dicom", "class_names": list(names),
                "files": [[f, d, ints[i], assigned[i]] for i, (f, d) in enumerate(entries)]}
    return DataSource("dicom", splits, names, channels, (int(size[0]), int(size[1])), None, manifest)


def load_source(path: str | Path, labels_csv: str | Path | None = None, seed: int = 0) -> DataSource:
    """An ``.npz`` file or a DICOM folder, by what ``path`` is."""
    path = Path(path)
    if path.is_dir():
        return load_dicom_folder(path, labels_csv, seed=seed)
    return load_npz(path)
