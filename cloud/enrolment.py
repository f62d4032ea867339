"""Enrolling and revoking edge devices: the ledger first (the authority ingest checks), then
the fleet registry, then the enrolment file the operator hands to the device.

The file carries public keys only — the cloud's ingest key (acks), custodian key (data-key
wrapping), metadata key (the envelope metadata ingest reads) and model-signing key — so copying it over a USB stick or a ticket is safe.
"""

from __future__ import annotations

import time
from pathlib import Path

from ledger.client import LedgerClient
from ledger.genesis import Genesis
from medchain.identity import RecipientKey, RecipientPublicKey, SigningKey, VerifyKey
from ledger.transactions import DeviceEnrolled, DeviceRevoked
from medchain.protocol import Enrollment

from cloud.config import CloudConfig, ConfigError
from cloud.errors import FleetError
from cloud.fleet import FleetRegistry

__all__ = ["enroll", "revoke", "operator_client"]


def operator_client(config: CloudConfig) -> LedgerClient:
    if config.operator_key is None:
        raise ConfigError("[ledger] operator_key is not set: enrolment needs the operator's key")
    client = LedgerClient(config.genesis, SigningKey.load(config.operator_key), "operator")
    client.start()
    return client


def enroll(config: CloudConfig, fleet: FleetRegistry, *, device_id: str, public_key: VerifyKey,
           site: str, group: str, profile: str, ledger: LedgerClient | None = None,
           now_ms: int | None = None) -> Enrollment:
    """Enrol a device everywhere and return its enrolment record (write it with to_json)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    own = ledger is None
    ledger = ledger or operator_client(config)
    try:
        result = ledger.submit(DeviceEnrolled(device_id, public_key.raw, site, group))
    finally:
        if own:
            ledger.close()
    if not result.committed:
        raise FleetError(f"ledger refused to enrol {device_id!r}: {result.reason}")
    try:
        fleet.enrol(device_id, public_key, site=site, group=group, profile=profile, now_ms=now_ms)
    except FleetError:
        if fleet.get(device_id).public_key != public_key:  # re-enrolling the same key is fine
            raise
    return Enrollment(
        device_id=device_id,
        device_key=public_key.raw,
        ingest_key=SigningKey.load(config.ingest_key).public.raw,
        custodian_key=RecipientPublicKey.load(config.custodian_key).raw,
        meta_key=RecipientKey.load(config.meta_key).public.raw,
        model_key=SigningKey.load(config.model_key).public.raw,
        issued_ms=now_ms,
        validators=tuple(Genesis.load(config.genesis).validator_keys()),
    )


def revoke(config: CloudConfig, fleet: FleetRegistry, device_id: str, reason: str,
           ledger: LedgerClient | None = None) -> None:
    own = ledger is None
    ledger = ledger or operator_client(config)
    try:
        result = ledger.submit(DeviceRevoked(device_id, reason))
    finally:
        if own:
            ledger.close()
    if not result.committed:
        raise FleetError(f"ledger refused to revoke {device_id!r}: {result.reason}")
    fleet.revoke(device_id)


def write_enrollment(enrollment: Enrollment, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(enrollment.to_json() + "\n")
    return path
