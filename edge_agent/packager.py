"""The packager: the sink between the DICOM node and the uplink.

For each de-identified instance it takes the model-ready tensor and metadata record
(:mod:`edge_agent.preparation`: made beside de-identification in the node's worker process,
or here when the instance comes without them) and seals three parts into one envelope — the
de-identified DICOM file unchanged (lossless), the tensor (``.npy``), the metadata (JSON) —
which it puts in the durable outbox under the next sequence number. The node deletes its spooled copy
only after this returns, and the outbox remembers the pseudonymous SOP Instance UID, so a
redelivery after a crash never becomes a second envelope.

What ingest must read without the custodian's key (pseudonymous ids, modality, consent
flags, and the serving model's prediction when one ran, so the cloud can commit it to the
ledger) is sealed in the header for the ingest's metadata key: nothing clinical is in clear
text on the broker. The diagnosis label, calibration and descriptors stay in the parts,
readable by the custodian only. A prediction that fails is noted and never holds an image back.
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

from medchain.identity import RecipientPublicKey, SigningKey
from medchain.protocol import encode
from medchain.sealing import DEFAULT_CHUNK_SIZE, new_object_key, package
from models.modality import ModalityConfig, modality_values

from edge_agent.outbox import Outbox, Sealed
from edge_agent.preparation import Preparation, Preparer
from edge_agent.records import RecordStore
from edge_agent.sink import DeidentifiedInstance

__all__ = ["Packager", "PackagerStats", "MEDIA_TYPES"]

log = logging.getLogger(__name__)

MEDIA_TYPES = {"dicom": "application/dicom", "tensor": "application/x-npy", "meta": "application/json"}


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
        meta_key: RecipientPublicKey,
        preprocess: Mapping[str, ModalityConfig] | None = None,
        records: RecordStore | None = None,
        clock: Callable[[], float] = time.time,
        on_enqueued: Callable[[], None] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        predict: Callable[[str, np.ndarray], dict | None] | None = None,
        serves: Callable[[str], bool] | None = None,
    ):
        self.outbox = outbox
        self._predict = predict
        # whether ``predict`` would answer for a modality: the frame it needs is decoded here
        # only then (None: always try)
        self._serves = serves
        self.device_id = device_id
        self._key = device_key
        self._custodian = custodian
        self._meta_key = meta_key
        self.preparer = Preparer.of(preprocess)
        self._records = records
        self._clock = clock
        self._on_enqueued = on_enqueued
        self._chunk_size = chunk_size
        self.stats = PackagerStats()

    def backpressure(self, queued_bytes: int = 0) -> str | None:
        """For the DICOM node: why it should answer Out of Resources now, or None.
        ``queued_bytes`` (received, not yet packaged) is reserved in the outbox's bounds: were
        the spool allowed to take the disk space the outbox keeps free, nothing spooled could
        ever be packaged, and nothing released, again."""
        return self.outbox.full_reason(queued_bytes)

    def accept(self, instance: DeidentifiedInstance) -> None:
        parts, sealed_meta = self.build(instance)

        def seal_as(sequence: int) -> Sealed:
            env = package(parts, new_object_key(self._custodian), device_id=self.device_id,
                          sequence=sequence, signer=self._key, created_ms=int(self._clock() * 1000),
                          meta=sealed_meta, meta_recipient=self._meta_key, media_types=MEDIA_TYPES, chunk_size=self._chunk_size)
            return Sealed(env.envelope_id, encode(env), env.header.digest())

        if self.outbox.enqueue(seal_as, key=instance.sop_instance_uid) is None:
            self.stats.redelivered += 1
            return
        self.stats.packaged += 1
        if self._on_enqueued:
            self._on_enqueued()

    @staticmethod
    def _frame(instance: DeidentifiedInstance, prep: Preparation, ds) -> np.ndarray:
        """The middle kept frame as modality values: what the serving model is given."""
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(instance.dicom))
        kept = prep.kept_frames
        return modality_values(ds)[kept[len(kept) // 2]]

    def _prediction(self, instance: DeidentifiedInstance, frame: Callable[[], np.ndarray],
                    meta: dict) -> dict | None:
        try:
            prediction = self._predict(instance.modality, frame())
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
        """The parts to seal and the metadata ingest reads (sealed for its key, never in clear
        text on the broker); pure apart from the records lookup."""
        ds = None
        prep = instance.preparation
        if prep is None:  # not prepared beside de-identification: parse the file and do it here
            ds = pydicom.dcmread(io.BytesIO(instance.dicom))
            prep = self.preparer.prepare(ds, instance.modality)
        if prep.error:
            self.stats.without_tensor += 1
            log.warning("no tensor for instance %s (%s): %s", instance.sop_instance_uid,
                        instance.modality, prep.error)
        consent = self._records.consent(instance.patient_token) if self._records else {}
        label = None
        if self._records and instance.accession_pseudonym:
            label = self._records.label(instance.patient_token, instance.accession_pseudonym)
        meta = {**instance.meta(), **prep.record, "device_id": self.device_id,
                "consent": consent, "label": label, "deid": instance.deid_summary()}
        parts = {"dicom": instance.dicom}
        prediction = None
        if prep.tensor is not None:
            parts["tensor"] = prep.tensor
            if self._predict is not None and (self._serves is None or self._serves(instance.modality)):
                prediction = self._prediction(instance, lambda: self._frame(instance, prep, ds), meta)
        if prediction is not None:
            meta["prediction"] = prediction
        parts["meta"] = json.dumps(meta, sort_keys=True).encode()
        sealed_meta = {
            "modality": instance.modality,
            "patient_token": instance.patient_token,
            "study_uid": instance.study_uid,
            "series_uid": instance.series_uid,
            "sop_instance_uid": instance.sop_instance_uid,
            "accession_pseudonym": instance.accession_pseudonym or "",
            "consent": consent,
            "has_tensor": "tensor" in parts,
        }
        if instance.study_date is not None:  # shifted by the patient's date shift: listed by the cloud
            sealed_meta["study_date"] = instance.study_date
        if prediction is not None:
            sealed_meta["prediction"] = prediction
        return parts, sealed_meta
