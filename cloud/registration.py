"""Ingest's two questions to the ledger: is this device enrolled, and register this image.

:class:`LedgerDirectory` answers device lookups from the ledger (the authority on enrolment
and revocation), cached for a few seconds so a burst of envelopes from one device costs one
query. :class:`LedgerRegistrar` turns a verified envelope's signed header and opened metadata
into an ``IMAGE_REGISTERED`` transaction and returns once f + 1 validators report it committed;
the ledger is idempotent by envelope id, so a resend after a crash is answered with the
original record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ledger.client import LedgerClient
from medchain.identity import VerifyKey
from ledger.errors import TransactionInvalid
from ledger.transactions import ImageRegistered, parse
from medchain.protocol import Envelope

from cloud.catalog import Receipt
from cloud.errors import RegistrationRefused
from cloud.ingest import DeviceRecord

__all__ = ["LedgerDirectory", "LedgerRegistrar", "RegistrationRefused", "image_transaction"]

PURPOSES = ("diagnosis", "research", "training", "sharing")


def _name(value, fallback: str = "unknown") -> str:
    text = str(value or "").strip()
    return text if text else fallback


def image_transaction(envelope: Envelope, meta: Mapping[str, Any],
                      policy: str = "default") -> ImageRegistered:
    """The ``IMAGE_REGISTERED`` for an envelope, from its signed header and the
    (de-identified) metadata sealed in it."""
    header = envelope.header
    consent = meta.get("consent") or {}
    return ImageRegistered(
        envelope_id=header.object_id,
        merkle_root=header.merkle_root,
        patient=_name(meta.get("patient_token")),
        study_uid=_name(meta.get("study_uid")),
        series_uid=_name(meta.get("series_uid")),
        instance_uid=_name(meta.get("sop_instance_uid")),
        modality=_name(meta.get("modality"), "OT"),
        consent=tuple(p for p in PURPOSES if consent.get(p) is True),
        policy=policy,
        device_id=header.device_id,
        sequence=header.sequence,
        study_date=_date(meta.get("study_date")),
    )


def _date(value) -> str | None:
    """The sealed metadata's (shifted) study date when it is one, YYYYMMDD; else none."""
    return value if isinstance(value, str) and len(value) == 8 and value.isdigit() else None


class LedgerRegistrar:
    def __init__(self, client: LedgerClient, policy: str = "default"):
        self.client = client
        self.policy = policy

    def check(self, envelope: Envelope, meta: Mapping[str, Any]) -> None:
        """Refuse, before anything is stored, what the ledger could never accept."""
        try:
            parse(image_transaction(envelope, meta, self.policy).to_wire())
        except TransactionInvalid as exc:
            raise RegistrationRefused(f"cannot be registered: {exc}") from None

    def register(self, envelope: Envelope, meta: Mapping[str, Any]) -> Receipt:
        result = self.client.submit(image_transaction(envelope, meta, self.policy))
        if not result.committed:
            raise RegistrationRefused(f"ledger refused the registration: {result.reason}")
        record = result.output.get("record") if result.output.get("duplicate") else None
        if record and record.get("height") is not None:
            return Receipt(int(record["height"]), int(record.get("index", -1)))
        return Receipt(result.height, result.index)


class LedgerDirectory:
    def __init__(self, client: LedgerClient, ttl_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, DeviceRecord | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, device_id: str) -> DeviceRecord | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(device_id)
        if hit and now - hit[0] < self.ttl_s:
            return hit[1]
        status = self.client.device(device_id)
        record = None
        if status.public_key is not None and (status.enrolled or status.revoked):
            record = DeviceRecord(device_id, VerifyKey(status.public_key), revoked=status.revoked)
        with self._lock:
            self._cache[device_id] = (now, record)
        return record

    def forget(self, device_id: str) -> None:
        """Drop a cached answer (after an operator enrolled or revoked the device)."""
        with self._lock:
            self._cache.pop(device_id, None)
