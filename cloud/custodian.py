"""The custodian: the only code in the cloud that decrypts an image for a purpose.

Holding the custodian key is not permission. For every image it is asked for, the custodian
files ``ACCESS_REQUESTED`` on the ledger in the name of the principal it acts for; the
contract decides by role policy and the patient's current consent, and writes an audit entry
whether it grants or denies. Only granted images are opened; denied ones are reported with
the contract's reason. Requests go out together (:meth:`LedgerClient.access_many`) in
batches, so hundreds of images cost a few ledger blocks, not minutes.

An image that was granted but cannot be opened (its ciphertext missing or corrupt, its
device unknown, a bad signature) is counted, never half-used: nothing of it is returned.
Nor is a stored object that is not the one granted: the custodian unwraps a data key only
if the object's id is the granted envelope id and its Merkle root is the one in the
ledger's ``IMAGE_REGISTERED`` record (which the access decision carries, agreed by f + 1
validators), so another image's envelope filed under this one's name, or content the ledger
never registered, is refused with a warning and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ledger.client import LedgerClient
from ledger.errors import LedgerError
from medchain.identity import RecipientKey, VerifyKey
from medchain.errors import MedChainError
from medchain.sealing import KeyUnwrapper, open_envelope

from cloud.catalog import CatalogEntry
from cloud.errors import CloudError, ObjectMismatch
from cloud.objectstore import ObjectStore

__all__ = ["Custodian", "Released", "AccessReport", "AccessFailed"]

DEFAULT_BATCH = 128
SWAPPED = "stored object is another image's"
UNREGISTERED = "stored object is not the one the ledger registered"

log = logging.getLogger(__name__)


class AccessFailed(CloudError):
    """The ledger could not decide the access requests (unreachable, or it refused them)."""


@dataclass(frozen=True)
class Released:
    """One granted image's decrypted parts, with the audit entry that granted it."""

    entry: CatalogEntry
    parts: dict[str, bytes]
    audit_id: int


@dataclass
class AccessReport:
    """What happened to each image asked for: granted, denied (by the contract's reason),
    or granted but unreadable (by why). ``denied_ids`` keeps (envelope id, reason)."""

    requested: int = 0
    granted: int = 0
    denied: Counter = field(default_factory=Counter)
    unreadable: Counter = field(default_factory=Counter)
    denied_ids: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: AccessReport) -> None:
        self.requested += other.requested
        self.granted += other.granted
        self.denied.update(other.denied)
        self.unreadable.update(other.unreadable)
        self.denied_ids.extend(other.denied_ids)

    @property
    def opened(self) -> int:
        return self.granted - sum(self.unreadable.values())

    def summary(self) -> str:
        def by(counter: Counter) -> str:
            return ", ".join(f"{n} {reason}" for reason, n in counter.most_common())
        text = f"{self.requested} requested, {self.granted} granted"
        if self.denied:
            text += f", {sum(self.denied.values())} denied ({by(self.denied)})"
        if self.unreadable:
            text += f"; {sum(self.unreadable.values())} granted but unreadable ({by(self.unreadable)})"
        return text

    def to_dict(self) -> dict:
        return {"requested": self.requested, "granted": self.granted, "opened": self.opened,
                "denied": dict(self.denied), "unreadable": dict(self.unreadable)}


class Custodian:
    """Decrypts stored envelopes for ``user`` only where the ledger grants it.

    ``ledger`` must be the client of the principal named ``user``, or of one whose role may
    act on behalf of others (the ``custodian`` principal, in the custodian process:
    :mod:`cloud.custodian_service`). ``key``: the custodian key, or a key backend
    (:mod:`cloud.keybackend`) that unwraps data keys without handing the key out.
    """

    def __init__(self, ledger: LedgerClient, store: ObjectStore, key: RecipientKey | KeyUnwrapper, *,
                 user: str, batch: int = DEFAULT_BATCH):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.ledger, self.store, self._key, self.user, self.batch = ledger, store, key, user, batch
        self._devices: dict[str, VerifyKey | None] = {}

    def release(self, entries: Iterable[CatalogEntry], purpose: str, *,
                names: Sequence[str] | None = None,
                action: str = "read") -> tuple[list[Released], AccessReport]:
        """Ask the ledger about every entry, open the granted ones (only the ``names``
        parts; all by default). Returns them in the order given, and the report."""
        entries = list(entries)
        released: list[Released] = []
        report = AccessReport()
        for start in range(0, len(entries), self.batch):
            chunk = entries[start:start + self.batch]
            try:
                decisions = self.ledger.access_many(
                    self.user, [bytes.fromhex(e.envelope_id) for e in chunk], purpose, action)
            except (LedgerError, TimeoutError) as exc:
                raise AccessFailed(f"the ledger did not decide {len(chunk)} access request(s) "
                                   f"for {purpose!r}: {exc}") from None
            report.requested += len(chunk)
            for entry, decision in zip(chunk, decisions):
                if not decision.granted:
                    report.denied[decision.reason] += 1
                    report.denied_ids.append((entry.envelope_id, decision.reason))
                    continue
                report.granted += 1
                try:
                    parts = self._open(entry, names, decision.merkle_root)
                except _Unreadable as why:
                    report.unreadable[str(why)] += 1
                    continue
                released.append(Released(entry, parts, int(decision.audit["id"])))
        return released, report

    def _device_key(self, device_id: str) -> VerifyKey | None:
        if device_id not in self._devices:
            status = self.ledger.device(device_id)
            self._devices[device_id] = (VerifyKey(status.public_key)
                                        if status.public_key is not None else None)
        return self._devices[device_id]

    def _open(self, entry: CatalogEntry, names: Sequence[str] | None,
              registered_root: bytes | None) -> dict[str, bytes]:
        device = self._device_key(entry.device_id)
        if device is None:
            raise _Unreadable("device unknown on the ledger")
        try:
            envelope = self.store.get(entry.envelope_id)
        except ObjectMismatch:
            log.warning("envelope %s: the store holds another envelope under its id; "
                        "not released", entry.envelope_id)
            raise _Unreadable(SWAPPED) from None
        except MedChainError as exc:  # missing, corrupt or undecodable in storage
            raise _Unreadable(f"not readable from the store ({type(exc).__name__})") from None
        if envelope.envelope_id != entry.envelope_id:  # a store that does not check
            log.warning("envelope %s: the store returned envelope %s; not released",
                        entry.envelope_id, envelope.envelope_id)
            raise _Unreadable(SWAPPED)
        if registered_root is None or envelope.header.merkle_root != registered_root:
            log.warning("envelope %s: stored Merkle root differs from the ledger's "
                        "IMAGE_REGISTERED record; not released", entry.envelope_id)
            raise _Unreadable(UNREGISTERED)
        try:
            return open_envelope(envelope, self._key, device, names=names)
        except KeyError:
            raise _Unreadable("lacks a requested part") from None
        except MedChainError as exc:  # signature, Merkle root, tag: never say more
            raise _Unreadable(f"failed verification ({type(exc).__name__})") from None


class _Unreadable(Exception):
    """Internal: why a granted image could not be opened (a short, PHI-free reason)."""
