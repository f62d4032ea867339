"""A person's access to images: request (the ledger decides), status, fetch (eqs. 6, 8, 9).

The requester is a ledger principal with a role, an Ed25519 signing key (its ledger key)
and an X25519 recipient key, both registered by an operator with ``PRINCIPAL_SET``.

* :meth:`Requester.request` files ``ACCESS_REQUESTED`` (action ``request``) per image under
  its own key: the contract decides by role × consent and writes the audit entry, granted
  or denied. A denial carries the contract's reason and nothing else.
* :meth:`Requester.fetch` asks the custodian (:mod:`cloud.custodian_access`) to re-wrap the
  granted images' data keys to the requester's X25519 key, reads the ciphertext from the
  store (ciphertext is not secret), checks each envelope's id and Merkle root against the
  ledger's ``IMAGE_REGISTERED`` record (with its verified receipt) and the device's
  signature, decrypts locally and writes ``<envelope id>.dcm`` files. An image that fails
  any check writes nothing.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from cloud.access_protocol import FetchReply, FetchRequest
from cloud.custodian_access import REQUEST_ACTION
from cloud.errors import AccessRefused
from cloud.objectstore import ObjectStore
from ledger.client import LedgerClient
from medchain.durable import durable_write
from medchain.errors import MedChainError
from medchain.identity import RecipientKey, SigningKey, VerifyKey
from medchain.protocol import Envelope
from medchain.sealing import open_with_data_key, unwrap_key_for_principal

__all__ = [
    "AccessConfig",
    "Decision",
    "Fetched",
    "Gateway",
    "LedgerGateway",
    "Requester",
    "latest_grants",
    "load_access_config",
    "open_requester",
]


@dataclass(frozen=True)
class Decision:
    """The ledger's decision on one image: its reason when denied, its audit entry id."""

    envelope_id: str
    granted: bool
    reason: str
    audit_id: int


@dataclass(frozen=True)
class Fetched:
    """One image fetched (``path`` of the DICOM file written) or not (``refused``: why)."""

    envelope_id: str
    path: Path | None = None
    refused: str | None = None
    audit_id: int | None = None


def latest_grants(entries: Iterable[dict], purpose: str,
                  envelope_ids: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """From a principal's audit entries: (envelope id, audit id) of its latest granted
    request per image for ``purpose`` (only ``envelope_ids`` when given), oldest first."""
    latest: dict[str, int] = {}
    for e in entries:
        if e["action"] == REQUEST_ACTION and e["purpose"] == purpose and e["granted"]:
            latest[e["image"].hex()] = e["id"]
    if envelope_ids is not None:
        return [(i, latest[i]) for i in envelope_ids if i in latest]
    return sorted(latest.items(), key=lambda kv: kv[1])


class Gateway(Protocol):
    """How a requester reaches the ledger, the custodian and the store: directly
    (:class:`LedgerGateway`) or through the HTTP API (:class:`cloud.api_client.HttpGateway`)."""

    def decide(self, name: str, envelope_ids: Sequence[str], purpose: str) -> list[Decision]: ...

    def audit(self, name: str) -> list[dict]: ...

    def custodian(self, data: bytes) -> bytes: ...

    def envelope(self, envelope_id: str) -> Envelope: ...

    def registered(self, envelope_id: str) -> tuple[bytes | None, bytes | None]: ...

    def registered_many(self, envelope_ids: Sequence[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
        """:meth:`registered` for many at once where the gateway can batch; the images it
        leaves out are asked one by one."""
        ...

    def studies(self, **filters: str) -> list[dict]: ...


class LedgerGateway:
    """The ledger (the client of the principal itself, or of one that acts on behalf of
    others: the API's), the custodian's socket (``custodian``: one frame in, one out) and
    the store."""

    def __init__(self, ledger: LedgerClient, custodian: Callable[[bytes], bytes], store: ObjectStore):
        self.ledger, self._custodian, self.store = ledger, custodian, store
        self._devices: dict[str, bytes | None] = {}

    def decide(self, name: str, envelope_ids: Sequence[str], purpose: str) -> list[Decision]:
        decisions = self.ledger.access_many(name, [bytes.fromhex(e) for e in envelope_ids],
                                            purpose, REQUEST_ACTION)
        return [Decision(e, d.granted, d.reason, int(d.audit["id"]))
                for e, d in zip(envelope_ids, decisions)]

    def audit(self, name: str) -> list[dict]:
        return self.ledger.audit(user=name)

    def custodian(self, data: bytes) -> bytes:
        return self._custodian(data)

    def envelope(self, envelope_id: str) -> Envelope:
        return self.store.get(envelope_id)

    def registered(self, envelope_id: str) -> tuple[bytes | None, bytes | None]:
        """The Merkle root the ledger registered (from the verified receipt) and the
        registering device's public key; None for what the ledger does not know."""
        return self._root_and_device(self.ledger.image(bytes.fromhex(envelope_id)))

    def registered_many(self, envelope_ids: Sequence[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
        """:meth:`registered` for many images: their receipts in batched queries (each block's
        proofs built once), each verified here."""
        proofs = self.ledger.images([bytes.fromhex(e) for e in envelope_ids])
        return {e: self._root_and_device(p) for e, p in zip(envelope_ids, proofs)}

    def _root_and_device(self, proof) -> tuple[bytes | None, bytes | None]:
        if proof is None:
            return None, None
        device_id = proof.record["device_id"]
        if device_id not in self._devices:  # the key that signed what the ledger registered
            self._devices[device_id] = self.ledger.device(device_id).public_key
        return proof.record["merkle_root"], self._devices[device_id]

    def studies(self, **filters: str) -> list[dict]:
        return self.ledger.studies(**filters)


class Requester:
    """One principal's side: ``key`` signs its fetches, ``recipient`` opens the keys the
    custodian re-wraps to it."""

    def __init__(self, gateway: Gateway, name: str, key: SigningKey, recipient: RecipientKey, *,
                 clock: Callable[[], float] = time.time, workers: int = 8):
        self.gateway, self.name, self._key, self._recipient = gateway, name, key, recipient
        self._clock, self.workers = clock, workers

    def request(self, envelope_ids: Sequence[str], purpose: str) -> list[Decision]:
        return self.gateway.decide(self.name, list(envelope_ids), purpose)

    def request_study(self, study: str, purpose: str) -> list[Decision]:
        """Every image of a study (all its series), each decided and audited on its own."""
        ids = [e for s in self.gateway.studies(study=study) for series in s["series"].values() for e in series]
        return self.request(ids, purpose) if ids else []

    def request_series(self, series: str, purpose: str) -> list[Decision]:
        """Every image of one series (its uid as the ledger registered it: the edge's
        pseudonym of the SeriesInstanceUID), each decided and audited on its own."""
        ids = [e for s in self.gateway.studies(series=series) for e in s["series"].get(series, [])]
        return self.request(ids, purpose) if ids else []

    def status(self) -> list[dict]:
        """This principal's audit entries (requests and fetches), oldest first."""
        return self.gateway.audit(self.name)

    def fetch(self, grants: Sequence[tuple[str, int]], purpose: str, out_dir: Path, *,
              part: str = "dicom") -> list[Fetched]:
        """Fetch and decrypt the granted images; :class:`AccessRefused` when the custodian
        refuses the whole request (bad signature, replay, no recipient key)."""
        if not grants:
            return []
        request = FetchRequest.new(self.name, purpose, grants, now_ms=int(self._clock() * 1000))
        reply = FetchReply.decode(self.gateway.custodian(request.signed(self._key)))
        if reply.error is not None:
            raise AccessRefused(f"custodian: {reply.error}")
        granted = [i.envelope_id for i in reply.items if i.wrapped_key is not None]
        try:  # the ledger's records of all of them, with verified receipts, in a few queries
            records = self.gateway.registered_many(granted) if granted else {}
        except MedChainError:
            records = {}  # each image then asks for its own below
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda item: self._one(item, Path(out_dir), part, records),
                                 reply.items))

    def _one(self, item, out_dir: Path, part: str, records: dict) -> Fetched:
        if item.wrapped_key is None:
            return Fetched(item.envelope_id, refused=item.refused, audit_id=item.audit_id)
        try:
            data = self._open(item.envelope_id, item.wrapped_key, part, records.get(item.envelope_id))
        except (MedChainError, KeyError) as exc:
            return Fetched(item.envelope_id, refused=f"failed verification ({type(exc).__name__})",
                           audit_id=item.audit_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = durable_write(out_dir / f"{item.envelope_id}.dcm", data, mode=0o600)
        return Fetched(item.envelope_id, path, audit_id=item.audit_id)

    def _open(self, envelope_id: str, wrapped: bytes, part: str,
              record: tuple[bytes | None, bytes | None] | None) -> bytes:
        envelope = self.gateway.envelope(envelope_id)
        header = envelope.header
        root, device = record if record is not None else self.gateway.registered(envelope_id)
        if envelope.envelope_id != envelope_id or root is None or root != header.merkle_root:
            raise _NotRegistered(f"envelope {envelope_id} is not the one the ledger registered")
        if device is None:
            raise _NotRegistered(f"envelope {envelope_id}: device unknown on the ledger")
        data_key = unwrap_key_for_principal(wrapped, header.object_id, self.name, self._recipient)
        return open_with_data_key(envelope, data_key, VerifyKey(device), names=[part])[part]


class _NotRegistered(MedChainError):
    """Internal: the stored envelope is not the ledger's record."""


# -- a person's configuration and the shell that opens it ---------------------------------------

@dataclass(frozen=True)
class AccessConfig:
    """``access.toml``::

        [principal]  name, key (Ed25519, its ledger key), recipient (X25519 private key)
        [ledger]     genesis
        [custodian]  socket
        [store]      url
    """

    name: str
    key: Path
    recipient: Path
    genesis: Path
    socket: Path
    store_url: str


def load_access_config(path: str | Path) -> AccessConfig:
    from medchain.errors import ConfigError
    from medchain.settings import ConfigFile

    f = ConfigFile(path, ConfigError, "access configuration")
    section = f.section
    p = section("principal")
    name, key, recipient = p.str("name"), p.path("key"), p.path("recipient")
    p.done()
    s = section("ledger")
    genesis = s.path("genesis")
    s.done()
    s = section("custodian")
    sock = s.path("socket")
    s.done()
    s = section("store")
    url = s.str("url")
    s.done()
    f.done()
    return AccessConfig(name, key, recipient, genesis, sock, f.url(url))


@contextmanager
def open_requester(config: AccessConfig, key: Path | None = None) -> Iterator[Requester]:
    """A :class:`Requester` with a started ledger client, the custodian's socket and the
    store (``key`` overrides the configured signing key file)."""
    from cloud.custodian_service import ask_custodian
    from cloud.objectstore import open_store

    signing = SigningKey.load(key or config.key)
    with LedgerClient(config.genesis, signing, config.name) as ledger:
        gateway = LedgerGateway(ledger, partial(ask_custodian, config.socket), open_store(config.store_url))
        yield Requester(gateway, config.name, signing, RecipientKey.load(config.recipient))
