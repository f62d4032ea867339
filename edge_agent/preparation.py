"""The model-ready side of a de-identified instance: tensor, descriptors and metadata record.

Computed where the de-identified dataset is already parsed and its pixels already checked —
the node's worker process — so that the packager in the edge's main process neither parses
the file a second time nor spends that process (which also answers the scanner and feeds the
uplink) on filters. A packager given an instance without one computes it itself, with this
same code. The preprocessing is the one implementation training and inference use
(:mod:`models.modality`), configured per modality by the device profile.

Pure: a dataset and configs in, a :class:`Preparation` out; pixels that cannot be prepared
(an unusual layout) give a preparation without a tensor and the error's class name, never an
exception, because the lossless file must travel anyway.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from models.modality import ModalityConfig, config_for, modality_values, prepare

__all__ = ["Preparation", "Preparer", "CALIBRATION_KEYWORDS", "ACQUISITION_KEYWORDS"]

# device calibration and acquisition geometry, copied when the de-identified header has them
CALIBRATION_KEYWORDS = (
    "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "KVP", "XRayTubeCurrent", "ExposureTime", "Exposure", "FilterType", "ConvolutionKernel",
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "FlipAngle", "TransducerFrequency",
    "BitsStored", "PhotometricInterpretation", "Manufacturer", "ManufacturerModelName",
)
ACQUISITION_KEYWORDS = ("AcquisitionDate", "AcquisitionTime", "StudyDate", "ContentDate")


def _jsonable(value):
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Preparation:
    """``record``: the metadata record (acquisition, resolution, calibration and, with a
    tensor, the preprocessing chain, config, kept frames and descriptors; JSON-ready).
    ``tensor``: the model-ready tensor as ``.npy`` bytes, None without pixels or when they
    could not be prepared (``error`` then names the exception class, never its text)."""

    record: dict
    tensor: bytes | None = None
    error: str | None = None

    @property
    def kept_frames(self) -> list[int]:
        return list(self.record.get("kept_frames", ()))


@dataclass(frozen=True)
class Preparer:
    """Per-modality preprocessing configs (the profile's ``[preprocess.*]``; defaults fill
    the rest). Small and picklable: it travels to the worker process with each object."""

    configs: tuple[tuple[str, ModalityConfig], ...] = ()

    @classmethod
    def of(cls, configs: Mapping[str, ModalityConfig] | None) -> Preparer:
        return cls(tuple(sorted((configs or {}).items())))

    def config_for(self, modality: str) -> ModalityConfig:
        return dict(self.configs).get(modality) or config_for(modality)

    def prepare(self, ds: Dataset, modality: str) -> Preparation:
        """The preparation of one de-identified dataset of ``modality``."""
        record = {
            "acquisition": {k: str(ds.get(k, "") or "") for k in ACQUISITION_KEYWORDS},
            "resolution": {"rows": int(ds.get("Rows", 0) or 0), "columns": int(ds.get("Columns", 0) or 0),
                           "frames": int(ds.get("NumberOfFrames", 1) or 1)},
            "calibration": {k: _jsonable(ds.get(k)) for k in CALIBRATION_KEYWORDS if ds.get(k) is not None},
        }
        if "PixelData" not in ds:
            return Preparation(record)
        cfg = self.config_for(modality)
        try:
            prepared = prepare(modality_values(ds), cfg)
        except Exception as exc:  # an unusual pixel layout: the lossless file travels anyway
            return Preparation({**record, "preprocess_error": exc.__class__.__name__},
                               error=exc.__class__.__name__)
        record.update({
            "preprocess": prepared.chain,
            "modality_config": cfg.to_config(),
            "kept_frames": list(prepared.kept_frames),
            "descriptors": {"hog": prepared.hog.tolist(), "wavelet": prepared.wavelet.tolist()},
        })
        return Preparation(record, _npy(prepared.tensor))
