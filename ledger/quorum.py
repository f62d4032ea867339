"""Who the validators are, how they sign, and what counts as a quorum certificate.

``n = 3f + 1`` validators; any ``2f + 1`` of them intersect in at least one honest one. A
validator's messages are signed with its Ed25519 key over ``medchain/v1/ledger/<kind> || 0 ||
body``. Public keys are turned into OpenSSL objects once (parsing a key per verification would
cost as much as the verification).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ledger.blocks import batch_digest, tx_root
from ledger.errors import CertificateInvalid
from medchain.canonical import canonical_bytes
from medchain.identity import SigningKey, ed25519_valid, encoded_message
from ledger.messages import Certificate, Checkpoint, Commit, Prepare, PrePrepare, domain

__all__ = ["Keyring", "Signer", "check_certificate", "check_checkpoint_proof",
           "header_vote_body", "check_header_votes", "HEADER_KIND"]

# a validator's word that it executed a block whose header hashes to ``h`` at height ``n``:
# what a receipt needs beyond the commit certificate, which covers the batch but not the
# state and results roots (execution follows commitment)
HEADER_KIND = "header"


class Keyring:
    """The validator set: ids ``0..n-1`` and their public keys."""

    __slots__ = ("n", "f", "quorum", "raw")

    def __init__(self, public_keys: Sequence[bytes]):
        self.n = len(public_keys)
        self.f = (self.n - 1) // 3
        if self.n < 1 or self.n != 3 * self.f + 1:
            raise ValueError(f"need n = 3f + 1 validators, got {self.n}")
        self.quorum = 2 * self.f + 1
        self.raw = tuple(public_keys)

    def primary(self, view: int) -> int:
        return view % self.n

    def valid(self, sender: int, kind: str, body: bytes, sig: bytes) -> bool:
        """True iff ``sig`` is validator ``sender``'s signature over ``body`` for ``kind``."""
        if not 0 <= sender < self.n:
            return False
        return ed25519_valid(self.raw[sender], sig, encoded_message(domain(kind), body))


@dataclass(frozen=True, slots=True)
class Signer:
    """A validator's own identity: its id and key."""

    id: int
    key: SigningKey

    def sign(self, msg):
        """Return ``(signed copy of msg, body bytes)``; the body is encoded once."""
        body = msg.body()
        return replace(msg, sig=self.key.sign_encoded(domain(msg.KIND), body)), body

    def sign_header(self, height: int, header_hash: bytes) -> bytes:
        return self.key.sign_encoded(domain(HEADER_KIND), header_vote_body(height, header_hash))


def header_vote_body(height: int, header_hash: bytes) -> bytes:
    return canonical_bytes({"n": height, "h": header_hash})


def check_header_votes(height: int, header_hash: bytes, votes: Iterable[tuple[int, bytes]],
                       keyring: Keyring) -> None:
    """Raise unless f + 1 distinct validators vouch for this header (one of them honest)."""
    body = header_vote_body(height, header_hash)
    seen = {i for i, sig in votes if keyring.valid(i, HEADER_KIND, body, sig)}
    if len(seen) < keyring.f + 1:
        raise CertificateInvalid(f"header at height {height}: {len(seen)} validator "
                                 f"signatures, need {keyring.f + 1}")


def _distinct_valid(keyring: Keyring, sigs: Iterable[tuple[int, bytes]], make, kind: str,
                    exclude: int | None = None) -> int:
    seen: set[int] = set()
    for sender, sig in sigs:
        if sender in seen or sender == exclude:
            continue
        if keyring.valid(sender, kind, make(sender).body(), sig):
            seen.add(sender)
    return len(seen)


def check_certificate(cert: Certificate, keyring: Keyring, *, need_requests: bool = True) -> None:
    """Raise :class:`CertificateInvalid` unless ``cert`` proves its batch at its seq.

    With ``need_requests`` the batch must be present and hash to the certified digest."""
    if need_requests or cert.requests:
        if batch_digest(cert.seq, cert.t, tx_root(cert.requests)) != cert.digest:
            raise CertificateInvalid(f"certificate for seq {cert.seq}: batch does not match")
    elif len(cert.digest) != 32:
        raise CertificateInvalid("certificate: malformed digest")
    v, n, d = cert.view, cert.seq, cert.digest
    if cert.kind == "committed":
        count = _distinct_valid(keyring, cert.sigs, lambda i: Commit(v, n, d, i), "commit")
        if count < keyring.quorum:
            raise CertificateInvalid(f"commit certificate for seq {n}: {count} valid votes")
        return
    primary = keyring.primary(v)
    pp = PrePrepare(v, n, cert.t, d, primary)
    if cert.primary_sig is None or not keyring.valid(primary, "preprepare", pp.body(),
                                                     cert.primary_sig):
        raise CertificateInvalid(f"prepared certificate for seq {n}: bad pre-prepare signature")
    count = _distinct_valid(keyring, cert.sigs, lambda i: Prepare(v, n, d, i), "prepare",
                            exclude=primary)
    if count < 2 * keyring.f:
        raise CertificateInvalid(f"prepared certificate for seq {n}: {count} valid prepares")


def check_checkpoint_proof(seq: int, digest: bytes, proof: Iterable[tuple[int, bytes]],
                           keyring: Keyring) -> None:
    """Raise unless 2f + 1 distinct validators signed checkpoint ``(seq, digest)``."""
    count = _distinct_valid(keyring, proof, lambda i: Checkpoint(seq, digest, i), "checkpoint")
    if count < keyring.quorum:
        raise CertificateInvalid(f"checkpoint {seq}: {count} valid signatures")
