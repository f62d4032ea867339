"""The packager: the sink between the DICOM node and the uplink.

For each de-identified instance it prepares the model-ready tensor (the one preprocessing
implementation, :mod:`models.modality`, configured per modality by the device profile),
collects the metadata record, and seals three parts into one envelope — the de-identified
DICOM file unchanged (lossless), the tensor (``.npy``), the metadata (JSON) — which it puts
in the durable outbox under the next sequence number. The node deletes its spooled copy
only after this returns, and the outbox remembers the pseudonymous SOP Instance UID, so a
redelivery after a crash never becomes a second envelope.

The signed header carries only what the cloud must read without the key (pseudonymous ids,
modality, consent flags, and the serving model's prediction when one ran, so the cloud can
commit it to the ledger); the diagnosis label, calibration and descriptors stay inside the
encryption. A prediction that fails is noted and never holds an image back.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pydicom

from ledger.identity import RecipientPublicKey, SigningKey
from medchain.protocol import encode
from medchain.sealing import DEFAULT_CHUNK_SIZE, new_object_key, package
from models.modality import ModalityConfig, config_for, modality_values, prepare

from edge_agent.outbox import Outbox
from edge_agent.records import RecordStore
from edge_agent.sink import DeidentifiedInstance

__all__ = ["Packager", "PackagerStats", "MEDIA_TYPES", "CALIBRATION_KEYWORDS"]

log = logging.getLogger(__name__)

MEDIA_TYPES = {"dicom": "application/dicom", "tensor": "application/x-npy", "meta": "application/json"}

# device calibration and acquisition geometry, copied when the de-identified header has them
CALIBRATION_KEYWORDS = (
    "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "KVP", "XRayTubeCurrent", "ExposureTime", "Exposure", "FilterType", "ConvolutionKernel",
    "MagneticFieldStrength", "RepetitionTime", "EchoTime", "FlipAngle", "TransducerFrequency",
    "BitsStored", "PhotometricInterpretation", "Manufacturer", "ManufacturerModelName",
)


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


@dataclass(slots=True)
class PackagerStats:
    packaged: int = 0
    redelivered: int = 0
    without_tensor: int = 0
    predicted: int = 0
    prediction_failed: int = 0


class Packager:
    """A :class:`~edge_agent.sink.Sink`; see the module docstring."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        device_id: str,
        device_key: SigningKey,
        custodian: RecipientPublicKey,
        preprocess: Mapping[str, ModalityConfig] | None = None,
        records: RecordStore | None = None,
        clock: Callable[[], float] = time.time,
        on_enqueued: Callable[[], None] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        predict: Callable[[str, np.ndarray], dict | None] | None = None,
    ):
        self.outbox = outbox
        self._predict = predict
        self.device_id = device_id
        self._key = device_key
        self._custodian = custodian
        self._preprocess = dict(preprocess or {})
        self._records = records
        self._clock = clock
        self._on_enqueued = on_enqueued
        self._chunk_size = chunk_size
        self.stats = PackagerStats()

    def config_for(self, modality: str) -> ModalityConfig:
        return self._preprocess.get(modality) or config_for(modality)

    def backpressure(self) -> str | None:
        """For the DICOM node: why it should answer Out of Resources now, or None."""
        return self.outbox.full_reason()

    def accept(self, instance: DeidentifiedInstance) -> None:
        parts, header_meta = self.build(instance)

        def seal_as(sequence: int) -> tuple[str, bytes]:
            env = package(parts, new_object_key(self._custodian), device_id=self.device_id,
                          sequence=sequence, signer=self._key, created_ms=int(self._clock() * 1000),
                          meta=header_meta, media_types=MEDIA_TYPES, chunk_size=self._chunk_size)
            return env.envelope_id, encode(env)

        if self.outbox.enqueue(seal_as, key=instance.sop_instance_uid) is None:
            self.stats.redelivered += 1
            return
        self.stats.packaged += 1
        if self._on_enqueued:
            self._on_enqueued()

    def _prediction(self, instance: DeidentifiedInstance, frame: np.ndarray, meta: dict) -> dict | None:
        try:
            prediction = self._predict(instance.modality, frame)
        except Exception as exc:  # a model problem must never hold an image back
            meta["prediction_error"] = exc.__class__.__name__
            self.stats.prediction_failed += 1
            log.warning("prediction failed for instance %s: %s", instance.sop_instance_uid,
                        exc.__class__.__name__)
            return None
        if prediction is not None:
            self.stats.predicted += 1
        return prediction

    def build(self, instance: DeidentifiedInstance) -> tuple[dict[str, bytes], dict]:
        """The parts to seal and the header metadata (pure apart from the records lookup)."""
        ds = pydicom.dcmread(io.BytesIO(instance.dicom))
        consent = self._records.consent(instance.patient_token) if self._records else {}
        label = None
        if self._records and instance.accession_pseudonym:
            label = self._records.label(instance.patient_token, instance.accession_pseudonym)
        meta = {
            **instance.meta(),
            "device_id": self.device_id,
            "acquisition": {k: str(ds.get(k, "") or "") for k in
                            ("AcquisitionDate", "AcquisitionTime", "StudyDate", "ContentDate")},
            "resolution": {"rows": int(ds.get("Rows", 0) or 0), "columns": int(ds.get("Columns", 0) or 0),
                           "frames": int(ds.get("NumberOfFrames", 1) or 1)},
            "calibration": {k: _jsonable(ds.get(k)) for k in CALIBRATION_KEYWORDS if ds.get(k) is not None},
            "consent": consent,
            "label": label,
        }
        parts = {"dicom": instance.dicom}
        prediction = None
        if "PixelData" in ds:
            cfg = self.config_for(instance.modality)
            try:
                values = modality_values(ds)
                prepared = prepare(values, cfg)
            except Exception as exc:  # an unusual pixel layout: ship the lossless file anyway
                meta["preprocess_error"] = exc.__class__.__name__
                self.stats.without_tensor += 1
                log.warning("no tensor for instance %s (%s): %s", instance.sop_instance_uid,
                            instance.modality, exc.__class__.__name__)
            else:
                parts["tensor"] = _npy(prepared.tensor)
                meta["preprocess"] = prepared.chain
                meta["modality_config"] = cfg.to_config()
                meta["kept_frames"] = list(prepared.kept_frames)
                meta["descriptors"] = {"hog": prepared.hog.tolist(), "wavelet": prepared.wavelet.tolist()}
                if self._predict is not None:
                    frame = values[prepared.kept_frames[len(prepared.kept_frames) // 2]]
                    prediction = self._prediction(instance, frame, meta)
        if prediction is not None:
            meta["prediction"] = prediction
        parts["meta"] = json.dumps(meta, sort_keys=True).encode()
        header_meta = {
            "kind": "image",
            "modality": instance.modality,
            "patient_token": instance.patient_token,
            "study_uid": instance.study_uid,
            "series_uid": instance.series_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "accession_pseudonym": instance.accession_pseudonym or "",
            "consent": consent,
            "has_tensor": "tensor" in parts,
        }
        if prediction is not None:
            header_meta["prediction"] = prediction
        return parts, header_meta
