"""The ledger client: submit transactions, wait for f + 1 matching replies, ask questions.

:class:`AsyncLedgerClient` is the asyncio core; :class:`LedgerClient` runs one on a private
event-loop thread and offers the same calls as plain blocking methods, as a context manager::

    with LedgerClient(genesis, key, "ingest") as ledger:
        result = ledger.submit(ImageRegistered(...))       # blocks until f + 1 agree
        proof = ledger.image(envelope_id)                  # verified inclusion proof

A request goes to every validator (so a silent primary is noticed by the others); the client
resends the *same* signed request (same request id) until f + 1 validators reply with the
same result, and the ledger executes it once. A query is answered by each validator from its
own state; the client accepts an answer that f + 1 validators gave identically. Every reply
and answer is signed by its validator and checked against the genesis keys.

Each connection's ``Hello`` signs the nonce the validator sent first, so it cannot be
replayed on another. When the genesis records a CA the links are mutual TLS: the client
presents its certificate (``tls``, or by default ``<name>.crt`` and ``<name>.tls.key``
beside its key file) and checks each validator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medchain.canonical import canonical_bytes
from ledger.errors import (
    CertificateInvalid,
    LedgerError,
    LedgerUnavailable,
    MessageInvalid,
    PrincipalRefused,
    QueryFailed,
    ReadRefused,
    RETRY,
    REVOKED,
    SubmitTimeout,
)
from medchain.errors import ProofInvalid
from ledger.genesis import Genesis
from medchain.identity import SigningKey
from ledger.messages import (
    Hello,
    Query,
    QueryResult,
    Reply,
    Request,
    RequestBatch,
    decode_frame,
    encode_frame,
    sign_frame,
)
from ledger.quorum import Keyring
from ledger.receipts import TxReceipt
from ledger.transactions import AccessRequested, AuditRead, Transaction, parse
from ledger.tls import client_context, validator_cn
from ledger.transport import Link
from medchain.pki import Identity

__all__ = ["AsyncLedgerClient", "LedgerClient", "Result", "ImageProof", "AccessDecision",
           "DeviceStatus"]


@dataclass(frozen=True)
class Result:
    """A transaction's outcome as f + 1 validators reported it."""

    rid: int
    status: str           # committed | rejected
    reason: str
    height: int
    index: int
    state_root: bytes
    output: dict = field(default_factory=dict)
    attestations: dict[int, bytes] = field(default_factory=dict)  # validator -> audit signature

    @property
    def committed(self) -> bool:
        return self.status == "committed"


ImageProof = TxReceipt  # an image record with its verified receipt


@dataclass(frozen=True)
class AccessDecision:
    granted: bool
    reason: str
    audit: dict
    result: Result
    merkle_root: bytes | None = None  # the granted image's registered Merkle root


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    enrolled: bool      # enrolled and not revoked: its envelopes may be accepted
    revoked: bool
    public_key: bytes | None
    site: str | None = None
    group: str | None = None


def _load(genesis, key) -> tuple[Genesis, SigningKey]:
    if not isinstance(genesis, Genesis):
        genesis = Genesis.load(genesis)
    if not isinstance(key, SigningKey):
        key = SigningKey.load(key)
    return genesis, key


def _tls_identity(genesis: Genesis, key, name: str, tls: Identity | None) -> Identity | None:
    """The client's TLS certificate and key on a chain that runs TLS (None otherwise)."""
    if not genesis.tls:
        return None
    if tls is None and not isinstance(key, SigningKey):
        folder = Path(key).parent
        tls = Identity(folder / f"{name}.crt", folder / f"{name}.tls.key")
    if tls is None or not (Path(tls.cert).is_file() and Path(tls.key).is_file()):
        raise LedgerError(f"principal {name}: this chain runs mutual TLS and no certificate "
                          "and TLS key were given")
    return tls


def _decision(result: Result) -> AccessDecision:
    if not result.committed:
        raise QueryFailed(f"access request rejected: {result.reason}")
    out = result.output
    return AccessDecision(out["granted"], out["reason"], out["audit"], result,
                          out.get("merkle_root"))


def _fingerprint(value) -> bytes:
    return hashlib.sha256(canonical_bytes(value, check=False)).digest()  # decoded CBOR


class _Tally:
    """Replies gathered for one request or query: validator -> (fingerprint, payload)."""

    def __init__(self, need: int):
        self.need = need
        self.votes: dict[int, tuple[bytes, object]] = {}
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def add(self, sender: int, fingerprint: bytes, payload) -> None:
        self.votes[sender] = (fingerprint, payload)
        if self.done.done():
            return
        agreeing = [s for s, (fp, _) in self.votes.items() if fp == fingerprint]
        if len(agreeing) >= self.need:
            self.done.set_result({s: self.votes[s][1] for s in agreeing})


class AsyncLedgerClient:
    def __init__(self, genesis, key, name: str, *, retry_s: float = 1.0,
                 timeout_s: float = 30.0, connect_s: float = 10.0, tls: Identity | None = None):
        self.genesis, self.key = _load(genesis, key)
        tls = _tls_identity(self.genesis, key, name, tls)
        self.tls = client_context(self.genesis.tls_ca, tls) if tls is not None else None
        self.name = name
        self.keyring = Keyring(self.genesis.validator_keys())
        self.f = self.keyring.f
        self.retry_s, self.timeout_s, self.connect_s = retry_s, timeout_s, connect_s
        self.links: dict[int, Link] = {}
        self._submits: dict[int, _Tally] = {}
        self._queries: dict[int, _Tally] = {}
        self._outbox: dict[int, list[bytes]] = {}
        self._flush_scheduled = False
        self._qids = itertools.count(1)
        self._revoked: set[int] = set()  # validators that said, signed, this principal is revoked
        self.dropped = 0

    async def __aenter__(self) -> AsyncLedgerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self.genesis.check_links()  # no plaintext link off loopback
        def hello(nonce: bytes) -> bytes:
            return sign_frame(Hello("client", self.name, self.genesis.chain_id, nonce),
                              self.key)[1]
        for v in self.genesis.validators:
            link = Link(v.host, v.port, hello, self._on_frame, name=validator_cn(v.id),
                        tls=self.tls, peer_cn=validator_cn(v.id))
            self.links[v.id] = link
            link.start()
        # usable once 2f + 1 validators answer; the rest join when they come up
        deadline = time.monotonic() + self.connect_s
        while sum(link.connected.is_set() for link in self.links.values()) < self.keyring.quorum:
            self._check_refused()
            if time.monotonic() > deadline:
                raise LedgerUnavailable(
                    f"fewer than {self.keyring.quorum} validators reachable (a validator also hangs up on "
                    f"a principal it does not know, or whose key is not the one it holds for {self.name!r})")
            await asyncio.sleep(0.02)

    def _check_refused(self) -> None:
        if len(self._revoked) > self.f:  # f + 1 signed refusals: at least one honest validator
            raise PrincipalRefused(f"the validators refuse principal {self.name!r}: {REVOKED}")

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()

    # -- wire ----------------------------------------------------------------------------------

    def _send_all(self, frame: bytes, *, request: bool = True) -> None:
        """Send to every validator; requests are coalesced into one batch frame per turn."""
        if not request:
            for link in self.links.values():
                link.send(frame)
            return
        for vid in self.links:
            self._outbox.setdefault(vid, []).append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        for vid, frames in outbox.items():
            self.links[vid].send(encode_frame(RequestBatch(tuple(frames))))

    def _on_frame(self, frame: bytes) -> None:
        try:
            msg, body = decode_frame(frame)
        except MessageInvalid:
            self.dropped += 1
            return
        if not isinstance(msg, (Reply, QueryResult)) or msg.client != self.name or \
                not self.keyring.valid(msg.sender, msg.KIND, body, msg.sig):
            self.dropped += 1
            return
        if isinstance(msg, Reply):
            for rid, result in msg.results:
                tally = self._submits.get(rid)
                if tally is not None:
                    compared = {k: v for k, v in result.items() if k != "attestation"}
                    tally.add(msg.sender, _fingerprint(compared), result)
        else:
            if not msg.ok and msg.answer == REVOKED:
                self._revoked.add(msg.sender)
            if not msg.ok and isinstance(msg.answer, str) and msg.answer.startswith(RETRY):
                return  # a validator behind the others: not an answer; the query is resent
            tally = self._queries.get(msg.qid)
            if tally is not None:
                shown = {k: v for k, v in (msg.answer or {}).items() if k != "cert"} \
                    if isinstance(msg.answer, dict) else msg.answer
                tally.add(msg.sender, _fingerprint([msg.ok, shown]), msg)

    # -- transactions --------------------------------------------------------------------------

    def prepare(self, tx: Transaction, rid: int | None = None) -> tuple[int, bytes]:
        """Sign ``tx`` into a request frame (checked locally first, so a malformed
        transaction fails here with a clear error). Returns ``(rid, frame)``."""
        wire = tx.to_wire()
        parse(wire)
        rid = secrets.randbits(62) if rid is None else rid
        _, frame = sign_frame(Request(self.name, rid, int(time.time() * 1000), wire), self.key)
        return rid, frame

    async def submit_frame(self, rid: int, frame: bytes, timeout_s: float | None = None) -> Result:
        """Send a prepared request and wait for f + 1 matching results, resending the same
        frame after ``retry_s``, then twice as long each time (at most 8 x ``retry_s``), so a
        loaded cluster is not buried under retries."""
        tally = self._submits.setdefault(rid, _Tally(self.f + 1))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        wait = self.retry_s
        try:
            while True:
                self._check_refused()
                self._send_all(frame)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SubmitTimeout(f"request {rid}: no f + 1 matching replies in time; "
                                        "resubmitting the same request is safe")
                try:
                    agreed = await asyncio.wait_for(asyncio.shield(tally.done), min(wait, left))
                    break
                except TimeoutError:
                    wait = min(2 * wait, 8 * self.retry_s)
                    continue
        finally:
            self._submits.pop(rid, None)
        first = next(iter(agreed.values()))
        return Result(rid, first["status"], first.get("reason", ""), first["height"],
                      first["index"], first["state_root"], first.get("output", {}),
                      {s: r["attestation"] for s, r in agreed.items() if "attestation" in r})

    async def submit(self, tx: Transaction, *, rid: int | None = None,
                     timeout_s: float | None = None) -> Result:
        rid, frame = self.prepare(tx, rid)
        return await self.submit_frame(rid, frame, timeout_s)

    async def submit_many(self, txs: Iterable[Transaction]) -> list[Result]:
        return list(await asyncio.gather(*(self.submit(tx) for tx in txs)))

    async def access(self, user: str, envelope_id: bytes, purpose: str,
                     action: str) -> AccessDecision:
        """Ask the ledger to decide (and audit) ``user``'s access to an image."""
        return _decision(await self.submit(AccessRequested(user, envelope_id, purpose, action)))

    async def access_many(self, user: str, envelope_ids: Iterable[bytes], purpose: str,
                          action: str) -> list[AccessDecision]:
        """:meth:`access` for many images at once, in order: the requests travel together
        (coalesced into batch frames) so the ledger decides them in a few blocks, not one
        block per image. Each is decided and audited on its own."""
        txs = [AccessRequested(user, e, purpose, action) for e in envelope_ids]
        return [_decision(r) for r in await self.submit_many(txs)]

    # -- queries -------------------------------------------------------------------------------

    async def _ask(self, what: str, args: dict | None = None, *,
                   validator: int | None = None,
                   timeout_s: float | None = None) -> list[QueryResult]:
        """The answers f + 1 validators gave identically (or the one ``validator`` gave)."""
        qid = next(self._qids)
        tally = self._queries[qid] = _Tally(1 if validator is not None else self.f + 1)
        _, frame = sign_frame(Query(self.name, qid, what, args or {}), self.key)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        try:
            while True:
                self._check_refused()
                if validator is None:
                    self._send_all(frame, request=False)
                else:
                    self.links[validator].send(frame)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LedgerUnavailable(f"query {what}: no f + 1 matching answers in time")
                try:
                    agreed = await asyncio.wait_for(asyncio.shield(tally.done),
                                                    min(self.retry_s, left))
                    break
                except TimeoutError:
                    continue
        finally:
            self._queries.pop(qid, None)
        answers = list(agreed.values())
        if not answers[0].ok:
            self._check_refused()
            raise QueryFailed(f"query {what}: {answers[0].answer}")
        return answers

    async def query(self, what: str, args: dict | None = None):
        """The answer to a query, as f + 1 validators gave it."""
        return (await self._ask(what, args))[0].answer

    async def _proven(self, what: str, args: dict, check) -> TxReceipt | None:
        """A record with its receipt, verified here; ``check(tx, record)`` says whether the
        proven transaction is the one asked for."""
        votes: dict[int, bytes] = {}  # validator -> its signature on the record's header
        for _attempt in range(3):  # a lying validator's vote fails: ask again for another's
            answers = await self._ask(what, args)
            if answers[0].answer is None:
                return None
            votes.update((qr.sender, qr.attestation["header_sig"]) for qr in answers
                         if isinstance(qr.attestation.get("header_sig"), bytes))
            for qr in answers:  # any one honest validator's certificate suffices
                try:
                    if not isinstance(qr.answer, dict):
                        raise ProofInvalid(f"{what} record: answer is not a receipt")
                    sigs = [[i, sig] for i, sig in sorted(votes.items())]
                    receipt = TxReceipt.from_wire(dict(qr.answer, header_sigs=sigs))
                    if not check(receipt.verify(self.keyring), receipt.record):
                        raise ProofInvalid(f"{what} record: proven transaction does not match")
                    return receipt
                except (ProofInvalid, CertificateInvalid):
                    continue
        raise CertificateInvalid(f"{what} record: no validator sent a valid proof")

    async def image(self, envelope_id: bytes) -> ImageProof | None:
        """The image record for an envelope id, with its transaction's inclusion proof in
        its block and the block's commit certificate, all verified here."""
        return await self._proven("image", {"envelope_id": envelope_id}, lambda tx, rec: (
            tx.get("envelope_id") == envelope_id and tx.get("merkle_root") == rec["merkle_root"]))

    async def images(self, envelope_ids: Iterable[bytes]) -> list[ImageProof | None]:
        """:meth:`image` for many envelope ids at once, in order (None where unknown): one
        query per 256 ids, each block's proofs built once on the validators for all of its
        images; every receipt verified here as :meth:`image` verifies it."""
        ids = list(envelope_ids)
        out: list[ImageProof | None] = []
        for start in range(0, len(ids), 256):
            out += await self._images(ids[start:start + 256])
        return out

    async def _images(self, ids: list[bytes]) -> list[ImageProof | None]:
        votes: dict[int, dict[int, bytes]] = {}  # height -> validator -> header signature
        certs: dict[int, list] = {}               # height -> certificates, one per validator
        for _attempt in range(3):  # a lying validator's vote or certificate fails: ask again
            answers = await self._ask("images", {"envelope_ids": ids})
            answer = answers[0].answer
            for qr in answers:
                for height, sig in qr.attestation.get("header_sigs", []):
                    votes.setdefault(height, {})[qr.sender] = sig
                for height, cert in qr.attestation.get("certs", []):
                    certs.setdefault(height, []).append(cert)
            try:
                headers = dict(answer["headers"])
                return [None if item is None else self._receipt(
                    eid, item, headers, certs, votes) for eid, item in zip(ids, answer["items"],
                                                                     strict=True)]
            except (ProofInvalid, CertificateInvalid, KeyError, TypeError, ValueError):
                continue
        raise CertificateInvalid("images: no validator sent valid proofs")

    def _receipt(self, envelope_id: bytes, item: dict, headers: dict, certs: dict,
                 votes: dict) -> TxReceipt:
        height = item["record"]["height"]
        sigs = [[i, s] for i, s in sorted(votes.get(height, {}).items())]
        for cert in certs.get(height, []):  # any one honest validator's certificate suffices
            try:
                receipt = TxReceipt.from_wire(dict(item, header=headers[height], cert=cert,
                                                   header_sigs=sigs))
                tx = receipt.verify(self.keyring)
            except (ProofInvalid, CertificateInvalid):
                continue
            if tx.get("envelope_id") != envelope_id or tx.get("merkle_root") != \
                    receipt.record["merkle_root"]:
                raise ProofInvalid("images: proven transaction does not match")
            return receipt
        raise CertificateInvalid(f"images: no valid proof for block {height}")

    async def model_receipt(self, model_hash: bytes) -> TxReceipt | None:
        """The ``MODEL_RELEASED`` record for a model hash with its verified receipt."""
        return await self._proven("model", {"model_hash": model_hash, "proof": True},
                                  lambda tx, rec: tx.get("model_hash") == model_hash)

    async def inference_receipt(self, batch_root: bytes) -> TxReceipt | None:
        """The ``INFERENCE_RECORDED`` record for a batch root with its verified receipt."""
        return await self._proven("inference", {"batch_root": batch_root, "proof": True},
                                  lambda tx, rec: tx.get("batch_root") == batch_root)

    async def read(self, query: str, by: str, key: str | bytes) -> int:
        """File ``AUDIT_READ``: the ledger decides by role and puts the read on the patient's
        trail; the audit id to name in the query, or :class:`ReadRefused` (audited too)."""
        key = key.hex() if isinstance(key, bytes) else key
        result = await self.submit(AuditRead(query, by, key))
        if not result.committed:
            raise QueryFailed(f"read of {query} by {by} rejected: {result.reason}")
        if not result.output["granted"]:
            raise ReadRefused(f"read of {query} by {by} refused: {result.output['reason']} "
                              f"(audit entry {result.output['audit']['id']})")
        return result.output["audit"]["id"]

    async def consent(self, patient: str, *, read: int | None = None) -> dict:
        """Current consent per purpose and its full history for one patient token, as of
        the granted read ``read`` (by default one filed now: :meth:`read`)."""
        if read is None:
            read = await self.read("consent", "patient", patient)
        return dict(await self.query("consent", {"patient": patient, "read": read}), read=read)

    async def audit(self, *, user: str | None = None, patient: str | None = None,
                    image: bytes | None = None, read: int | None = None) -> list[dict]:
        """Audit entries (oldest first) for one user, patient token or image; each carries
        the signatures of the f + 1 validators that vouched for it. A patient token's or
        an image's trail is read through a granted read (``read``, by default one filed
        now), which is itself the trail's last entry."""
        (by, key), = [(b, k) for b, k in (("user", user), ("patient", patient),
                                           ("image", image)) if k is not None]
        args = {"by": by, "key": key}
        if by != "user":
            args["read"] = read if read is not None else await self.read("audit", by, key)
        entries: list[dict] = []
        while True:  # a page per query, oldest first, until the index's total
            answers = await self._ask("audit", dict(args, start=len(entries)))
            page = [dict(e, signatures={}) for e in answers[0].answer["entries"]]
            by_id = {e["id"]: e for e in page}
            for qr in answers:
                for audit_id, sig in qr.attestation.get("signatures", []):
                    if audit_id in by_id:
                        by_id[audit_id]["signatures"][qr.sender] = sig
            entries += page
            if not page or len(entries) >= answers[0].answer["total"]:
                return entries

    async def model(self, model_hash: bytes) -> dict | None:
        return await self.query("model", {"model_hash": model_hash})

    async def inference(self, batch_root: bytes) -> dict | None:
        return await self.query("inference", {"batch_root": batch_root})

    async def principal(self, name: str) -> dict | None:
        return await self.query("principal", {"name": name})

    async def studies(self, *, modality: str | None = None, patient: str | None = None,
                      study: str | None = None, series: str | None = None,
                      read: int | None = None) -> list[dict]:
        """Registered studies (metadata only), filtered; see :meth:`Contracts.studies`. By
        patient token, through a granted read (``read``, by default one filed now), which
        is on the patient's trail."""
        args = {k: v for k, v in (("modality", modality), ("patient", patient), ("study", study),
                                  ("series", series)) if v is not None}
        if patient is not None:
            args["read"] = read if read is not None else await self.read("studies", "patient", patient)
        return await self.query("studies", args)

    async def audit_entries(self, ids: Iterable[int]) -> list[dict | None]:
        """Audit entries by id (None where there is none), as f + 1 validators agree."""
        return await self.query("audit_entries", {"ids": list(ids)})

    async def principals(self) -> list[dict]:
        """Every registered principal (name, role, active, public keys), by name."""
        return await self.query("principals", {})

    async def policy(self, policy_id: str) -> dict | None:
        return await self.query("policy", {"policy": policy_id})

    async def device(self, device_id: str) -> DeviceStatus:
        """Is the device enrolled and not revoked, and its public key (for cloud ingest)."""
        d = await self.query("device", {"device_id": device_id})
        if d is None:
            return DeviceStatus(device_id, False, False, None)
        revoked = d["status"] == "revoked"
        return DeviceStatus(device_id, not revoked, revoked, d["public_key"], d["site"],
                            d["group"])

    async def status(self, validator: int, timeout_s: float = 5.0) -> dict:
        """One validator's own view of itself (height, view, drop counters)."""
        return (await self._ask("status", validator=validator, timeout_s=timeout_s))[0].attestation

    async def headers(self, validator: int, start: int = 0, end: int = 10**9) -> list:
        """``[height, header hash, state root]`` rows from one validator's block store."""
        answers = await self._ask("headers", {"start": start, "end": end}, validator=validator)
        return answers[0].attestation["headers"]


class LedgerClient:
    """Blocking facade over :class:`AsyncLedgerClient` (its own event-loop thread)."""

    def __init__(self, genesis, key, name: str, **options):
        self._async = AsyncLedgerClient(genesis, key, name, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"ledger-client-{name}")
        self._started = False

    def __enter__(self) -> LedgerClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True
            self._run(self._async.start())

    def close(self) -> None:
        if self._started:
            with contextlib.suppress(Exception):
                self._run(self._async.close(), 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
            self._started = False

    @property
    def keyring(self) -> Keyring:
        """The validators' public keys (to verify proofs and receipts)."""
        return self._async.keyring

    # -- the same calls as AsyncLedgerClient, blocking ------------------------------------------

    def prepare(self, tx: Transaction, rid: int | None = None) -> tuple[int, bytes]:
        return self._async.prepare(tx, rid)

    def submit_frame(self, rid: int, frame: bytes, timeout_s: float | None = None) -> Result:
        return self._run(self._async.submit_frame(rid, frame, timeout_s))

    def submit(self, tx: Transaction, *, rid: int | None = None, timeout_s: float | None = None) -> Result:
        return self._run(self._async.submit(tx, rid=rid, timeout_s=timeout_s))

    def submit_many(self, txs: Iterable[Transaction]) -> list[Result]:
        return self._run(self._async.submit_many(txs))

    def access(self, user: str, envelope_id: bytes, purpose: str, action: str) -> AccessDecision:
        return self._run(self._async.access(user, envelope_id, purpose, action))

    def access_many(self, user: str, envelope_ids: Iterable[bytes], purpose: str,
                    action: str) -> list[AccessDecision]:
        return self._run(self._async.access_many(user, envelope_ids, purpose, action))

    def query(self, what: str, args: dict | None = None):
        return self._run(self._async.query(what, args))

    def image(self, envelope_id: bytes) -> ImageProof | None:
        return self._run(self._async.image(envelope_id))

    def images(self, envelope_ids: Iterable[bytes]) -> list[ImageProof | None]:
        return self._run(self._async.images(envelope_ids))

    def model_receipt(self, model_hash: bytes) -> TxReceipt | None:
        return self._run(self._async.model_receipt(model_hash))

    def inference_receipt(self, batch_root: bytes) -> TxReceipt | None:
        return self._run(self._async.inference_receipt(batch_root))

    def read(self, query: str, by: str, key: str | bytes) -> int:
        return self._run(self._async.read(query, by, key))

    def consent(self, patient: str, *, read: int | None = None) -> dict:
        return self._run(self._async.consent(patient, read=read))

    def audit(self, *, user: str | None = None, patient: str | None = None,
              image: bytes | None = None, read: int | None = None) -> list[dict]:
        return self._run(self._async.audit(user=user, patient=patient, image=image, read=read))

    def model(self, model_hash: bytes) -> dict | None:
        return self._run(self._async.model(model_hash))

    def inference(self, batch_root: bytes) -> dict | None:
        return self._run(self._async.inference(batch_root))

    def principal(self, name: str) -> dict | None:
        return self._run(self._async.principal(name))

    def principals(self) -> list[dict]:
        return self._run(self._async.principals())

    def audit_entries(self, ids: Iterable[int]) -> list[dict | None]:
        return self._run(self._async.audit_entries(ids))

    def studies(self, **filters) -> list[dict]:
        return self._run(self._async.studies(**filters))

    def policy(self, policy_id: str) -> dict | None:
        return self._run(self._async.policy(policy_id))

    def device(self, device_id: str) -> DeviceStatus:
        return self._run(self._async.device(device_id))

    def status(self, validator: int, timeout_s: float = 5.0) -> dict:
        return self._run(self._async.status(validator, timeout_s))

    def headers(self, validator: int, start: int = 0, end: int = 10**9) -> list:
        return self._run(self._async.headers(validator, start, end))