"""The ledger's wire messages (v1): typed frozen dataclasses and their one codec.

A frame is the canonical CBOR array ``[kind, body, signature, payload]``. ``body`` is the
canonical CBOR of the message's fields and is what the sender's Ed25519 key signs, under the
domain ``medchain/v1/ledger/<kind>``; ``payload`` carries bulk data whose hash the body
already binds (the requests of a pre-prepare, whose Merkle root is inside the batch digest),
so it is never signed twice. Decoding checks every field's type and size and raises
:class:`MessageInvalid`; it does not verify signatures, which needs the keys (the replica and
the shells do that, see :mod:`ledger.quorum`).

Votes (pre-prepare, prepare, commit, checkpoint) have bodies built only from their fields, so a
certificate can carry just ``(sender, signature)`` pairs and anyone can rebuild the signed bytes.

Why signatures rather than pairwise MACs: see ``docs/ledger.md`` ("Authentication"). In short,
every consensus message is per *batch*, not per transaction, so its Ed25519 cost is spread
over the batch, and every one of them can end up inside a certificate that must convince a
third party (prepared certificates in view changes, commit certificates in blocks, checkpoint
proofs in state transfer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from medchain.canonical import canonical_bytes, decode
from ledger.errors import MessageInvalid
from medchain.errors import EncodingError

__all__ = [
    "VERSION",
    "MAX_FRAME",
    "domain",
    "Request",
    "RequestBatch",
    "PrePrepare",
    "Prepare",
    "Commit",
    "Checkpoint",
    "Certificate",
    "ViewChange",
    "NewView",
    "Reply",
    "Status",
    "Fetch",
    "Blocks",
    "Hello",
    "Query",
    "QueryResult",
    "Message",
    "encode_frame",
    "decode_frame",
    "sign_frame",
    "request_digest",
]

VERSION = 1
MAX_FRAME = 64 * 1024 * 1024
MAX_NAME = 128
HASH = 32
SIG = 64


def domain(kind: str) -> str:
    return f"medchain/v{VERSION}/ledger/{kind}"


def request_digest(request_bytes: bytes) -> bytes:
    return hashlib.sha256(request_bytes).digest()


# -- field checks ------------------------------------------------------------------------------


def _int(d: dict, key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = d.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise MessageInvalid(f"field {key!r}: expected an integer in [{lo}, {hi}]")
    return value


def _bytes(d: dict, key: str, size: int | None = None, *, optional: bool = False) -> bytes | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise MessageInvalid(f"field {key!r}: expected {size or 'some'} bytes")
    return value


def _str(d: dict, key: str, limit: int = MAX_NAME) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise MessageInvalid(f"field {key!r}: expected a non-empty string of at most {limit}")
    return value


def _list(d: dict, key: str) -> list:
    value = d.get(key)
    if not isinstance(value, list):
        raise MessageInvalid(f"field {key!r}: expected a list")
    return value


def _map(d: dict, key: str) -> dict:
    value = d.get(key)
    if not isinstance(value, dict):
        raise MessageInvalid(f"field {key!r}: expected a map")
    return value


def _bytes_list(d: dict, key: str) -> tuple[bytes, ...]:
    items = _list(d, key)
    if not all(isinstance(x, bytes) for x in items):
        raise MessageInvalid(f"field {key!r}: expected a list of byte strings")
    return tuple(items)


def _sig_pairs(items: Any, what: str) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(items, list):
        raise MessageInvalid(f"{what}: expected a list of [replica, signature]")
    out = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                or item[0] < 0 or not isinstance(item[1], bytes) or len(item[1]) != SIG):
            raise MessageInvalid(f"{what}: expected [replica, 64-byte signature]")
        out.append((item[0], item[1]))
    return tuple(out)


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Msg:
    KIND: ClassVar[str] = ""
    SIGNED: ClassVar[bool] = True
    # validators build replies and block/view-change bundles from values already checked
    # (decoded CBOR, parsed transactions); skipping the type walk halves their encoding cost
    TRUSTED: ClassVar[bool] = False

    def fields(self) -> dict:  # pragma: no cover - every message overrides
        raise NotImplementedError

    def body(self) -> bytes:
        return canonical_bytes(self.fields(), check=not self.TRUSTED)


@dataclass(frozen=True, slots=True)
class Request(_Msg):
    """A transaction submitted by a principal. ``rid`` names the request (retries reuse it);
    ``ts`` is the client's clock, checked for freshness against the agreed block time."""

    KIND: ClassVar[str] = "request"
    client: str
    rid: int
    ts: int
    tx: dict
    sig: bytes = b""

    def fields(self) -> dict:
        return {"client": self.client, "rid": self.rid, "ts": self.ts, "tx": self.tx}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Request:
        return cls(_str(d, "client"), _int(d, "rid"), _int(d, "ts"), _map(d, "tx"), sig)


@dataclass(frozen=True, slots=True)
class RequestBatch(_Msg):
    """Client to validator: several encoded requests in one frame (each signed on its own)."""

    KIND: ClassVar[str] = "requests"
    SIGNED: ClassVar[bool] = False
    requests: tuple[bytes, ...]

    def fields(self) -> dict:
        return {"r": list(self.requests)}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> RequestBatch:
        return cls(_bytes_list(d, "r"))


@dataclass(frozen=True, slots=True)
class PrePrepare(_Msg):
    """The primary's proposal: batch ``digest`` (which binds seq, time and the requests'
    Merkle root) at ``seq`` in ``view``; ``requests`` travel as the unsigned payload."""

    KIND: ClassVar[str] = "preprepare"
    view: int
    seq: int
    t: int
    digest: bytes
    sender: int
    sig: bytes = b""
    requests: tuple[bytes, ...] = field(default=(), compare=False)

    def fields(self) -> dict:
        return {"v": self.view, "n": self.seq, "d": self.digest, "i": self.sender, "k": "pp",
                "t": self.t}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes, payload: Any = None) -> PrePrepare:
        requests = () if payload is None else _bytes_list({"p": payload}, "p")
        return cls(_int(d, "v"), _int(d, "n"), _int(d, "t"), _bytes(d, "d", HASH),
                   _int(d, "i"), sig, requests)


@dataclass(frozen=True, slots=True)
class _Vote(_Msg):
    view: int
    seq: int
    digest: bytes
    sender: int
    sig: bytes = b""

    def fields(self) -> dict:
        return {"v": self.view, "n": self.seq, "d": self.digest, "i": self.sender,
                "k": self.KIND}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes):
        if d.get("k") != cls.KIND:
            raise MessageInvalid(f"field 'k': expected {cls.KIND!r}")
        return cls(_int(d, "v"), _int(d, "n"), _bytes(d, "d", HASH), _int(d, "i"), sig)


@dataclass(frozen=True, slots=True)
class Prepare(_Vote):
    KIND: ClassVar[str] = "prepare"


@dataclass(frozen=True, slots=True)
class Commit(_Vote):
    KIND: ClassVar[str] = "commit"


@dataclass(frozen=True, slots=True)
class Checkpoint(_Msg):
    """``digest`` is the hash of the block header at ``seq`` (which chains every earlier
    header and holds the state root)."""

    KIND: ClassVar[str] = "checkpoint"
    seq: int
    digest: bytes
    sender: int
    sig: bytes = b""

    def fields(self) -> dict:
        return {"n": self.seq, "d": self.digest, "i": self.sender, "k": "checkpoint"}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Checkpoint:
        return cls(_int(d, "n"), _bytes(d, "d", HASH), _int(d, "i"), sig)


@dataclass(frozen=True, slots=True)
class Certificate:
    """Transferable proof about one sequence number, carried in view changes and blocks.

    ``prepared``: the primary's pre-prepare signature plus 2f prepare signatures for
    ``(view, seq, digest)``. ``committed``: 2f + 1 commit signatures. ``requests`` is the
    batch (so the digest can be recomputed and the batch re-proposed)."""

    kind: str
    view: int
    seq: int
    t: int
    digest: bytes
    sigs: tuple[tuple[int, bytes], ...]
    primary_sig: bytes | None = None
    requests: tuple[bytes, ...] = ()

    def to_wire(self) -> dict:
        return {"k": self.kind, "v": self.view, "n": self.seq, "t": self.t, "d": self.digest,
                "s": [list(p) for p in self.sigs], "p": self.primary_sig,
                "r": list(self.requests)}

    @classmethod
    def from_wire(cls, d: Any) -> Certificate:
        if not isinstance(d, dict) or d.get("k") not in ("prepared", "committed"):
            raise MessageInvalid("certificate: expected a prepared or committed certificate")
        primary = _bytes(d, "p", SIG, optional=True)
        if (d["k"] == "prepared") != (primary is not None):
            raise MessageInvalid("certificate: pre-prepare signature only in prepared ones")
        return cls(d["k"], _int(d, "v"), _int(d, "n"), _int(d, "t"), _bytes(d, "d", HASH),
                   _sig_pairs(d.get("s"), "certificate signatures"), primary,
                   _bytes_list(d, "r"))

    def without_requests(self) -> Certificate:
        return Certificate(self.kind, self.view, self.seq, self.t, self.digest, self.sigs,
                           self.primary_sig, ())


@dataclass(frozen=True, slots=True)
class ViewChange(_Msg):
    """Sent by ``sender`` to move to ``view``: its stable checkpoint with 2f + 1 signatures,
    and its best certificate for every sequence number above it."""

    KIND: ClassVar[str] = "viewchange"
    view: int
    sender: int
    stable_seq: int
    stable_digest: bytes
    stable_proof: tuple[tuple[int, bytes], ...]
    certs: tuple[Certificate, ...]
    sig: bytes = b""

    def fields(self) -> dict:
        return {"v": self.view, "i": self.sender, "h": self.stable_seq, "hd": self.stable_digest,
                "hp": [list(p) for p in self.stable_proof],
                "P": [c.to_wire() for c in self.certs]}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> ViewChange:
        return cls(_int(d, "v"), _int(d, "i"), _int(d, "h"), _bytes(d, "hd", HASH),
                   _sig_pairs(d.get("hp"), "checkpoint proof"),
                   tuple(Certificate.from_wire(c) for c in _list(d, "P")), sig)


@dataclass(frozen=True, slots=True)
class NewView(_Msg):
    """The new primary's proof that ``view`` started: 2f + 1 view changes and the
    pre-prepares ``(seq, t, digest, signature)`` it re-issues, which every replica recomputes."""

    KIND: ClassVar[str] = "newview"
    view: int
    sender: int
    view_changes: tuple[bytes, ...]  # the senders' signed frames, verbatim
    preprepares: tuple[tuple[int, int, bytes, bytes], ...]
    sig: bytes = b""

    def fields(self) -> dict:
        return {"v": self.view, "i": self.sender, "V": list(self.view_changes),
                "O": [list(p) for p in self.preprepares]}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> NewView:
        pps = []
        for item in _list(d, "O"):
            if (not isinstance(item, list) or len(item) != 4
                    or not all(type(x) is int for x in item[:2])
                    or not isinstance(item[2], bytes) or len(item[2]) != HASH
                    or not isinstance(item[3], bytes) or len(item[3]) != SIG):
                raise MessageInvalid("new view: expected [seq, t, digest, signature] entries")
            pps.append(tuple(item))
        return cls(_int(d, "v"), _int(d, "i"), _bytes_list(d, "V"), tuple(pps), sig)


@dataclass(frozen=True, slots=True)
class Reply(_Msg):
    """A validator's results for one client's requests executed in one block (or a cached
    result for a retried request). ``results`` holds ``(rid, result map)`` pairs."""

    KIND: ClassVar[str] = "reply"
    TRUSTED: ClassVar[bool] = True
    view: int
    sender: int
    client: str
    results: tuple[tuple[int, dict], ...]
    sig: bytes = b""

    def fields(self) -> dict:
        return {"v": self.view, "i": self.sender, "c": self.client,
                "r": [[rid, res] for rid, res in self.results]}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Reply:
        results = []
        for item in _list(d, "r"):
            if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                    or not isinstance(item[1], dict)):
                raise MessageInvalid("reply: expected [rid, result] entries")
            results.append((item[0], item[1]))
        return cls(_int(d, "v"), _int(d, "i"), _str(d, "c"), tuple(results), sig)


@dataclass(frozen=True, slots=True)
class Status(_Msg):
    """Periodic gossip: lets a lagging replica learn that it is behind (in view or height)."""

    KIND: ClassVar[str] = "status"
    view: int
    sender: int
    executed: int
    stable: int
    normal: bool
    sig: bytes = b""

    def fields(self) -> dict:
        return {"v": self.view, "i": self.sender, "e": self.executed, "h": self.stable,
                "ok": self.normal}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Status:
        if not isinstance(d.get("ok"), bool):
            raise MessageInvalid("field 'ok': expected a bool")
        return cls(_int(d, "v"), _int(d, "i"), _int(d, "e"), _int(d, "h"), d["ok"], sig)


@dataclass(frozen=True, slots=True)
class Fetch(_Msg):
    """Ask a peer for the blocks ``start..end`` (state transfer)."""

    KIND: ClassVar[str] = "fetch"
    sender: int
    start: int
    end: int
    sig: bytes = b""

    def fields(self) -> dict:
        return {"i": self.sender, "a": self.start, "b": self.end}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Fetch:
        return cls(_int(d, "i"), _int(d, "a", lo=1), _int(d, "b", lo=1), sig)


@dataclass(frozen=True, slots=True)
class Blocks(_Msg):
    """Blocks with their commit certificates (``ledger.blocks.Block`` wire maps), plus the
    sender's stable checkpoint proof so the receiver knows how far it must go."""

    KIND: ClassVar[str] = "blocks"
    TRUSTED: ClassVar[bool] = True
    sender: int
    blocks: tuple[dict, ...]
    stable_seq: int
    stable_digest: bytes
    stable_proof: tuple[tuple[int, bytes], ...]
    sig: bytes = b""

    def fields(self) -> dict:
        return {"i": self.sender, "B": list(self.blocks), "h": self.stable_seq,
                "hd": self.stable_digest, "hp": [list(p) for p in self.stable_proof]}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Blocks:
        blocks = _list(d, "B")
        if not all(isinstance(b, dict) for b in blocks):
            raise MessageInvalid("blocks: expected block maps")
        return cls(_int(d, "i"), tuple(blocks), _int(d, "h"), _bytes(d, "hd", HASH),
                   _sig_pairs(d.get("hp"), "checkpoint proof"), sig)


@dataclass(frozen=True, slots=True)
class Hello(_Msg):
    """First frame on a connection: who is talking (a validator id or a principal name),
    signed by that identity's key, bound to the chain and a fresh time."""

    KIND: ClassVar[str] = "hello"
    role: str  # "validator" or "client"
    name: str
    chain: str
    ts: int
    sig: bytes = b""

    def fields(self) -> dict:
        return {"role": self.role, "name": self.name, "chain": self.chain, "ts": self.ts}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Hello:
        role = _str(d, "role")
        if role not in ("validator", "client"):
            raise MessageInvalid("hello: role must be 'validator' or 'client'")
        return cls(role, _str(d, "name"), _str(d, "chain"), _int(d, "ts"), sig)


@dataclass(frozen=True, slots=True)
class Query(_Msg):
    """A read-only question from a principal (answered by each validator on its own)."""

    KIND: ClassVar[str] = "query"
    client: str
    qid: int
    what: str
    args: dict
    sig: bytes = b""

    def fields(self) -> dict:
        return {"c": self.client, "q": self.qid, "w": self.what, "a": self.args}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> Query:
        return cls(_str(d, "c"), _int(d, "q"), _str(d, "w"), _map(d, "a"), sig)


@dataclass(frozen=True, slots=True)
class QueryResult(_Msg):
    """A validator's answer. ``answer`` is what clients compare across validators;
    ``attestation`` holds what differs per validator (its own signatures on audit entries)."""

    KIND: ClassVar[str] = "queryresult"
    TRUSTED: ClassVar[bool] = True
    sender: int
    client: str
    qid: int
    ok: bool
    answer: Any
    attestation: dict
    sig: bytes = b""

    def fields(self) -> dict:
        return {"i": self.sender, "c": self.client, "q": self.qid, "ok": self.ok,
                "a": self.answer, "x": self.attestation}

    @classmethod
    def from_fields(cls, d: dict, sig: bytes) -> QueryResult:
        if not isinstance(d.get("ok"), bool):
            raise MessageInvalid("field 'ok': expected a bool")
        return cls(_int(d, "i"), _str(d, "c"), _int(d, "q"), d["ok"], d.get("a"),
                   _map(d, "x"), sig)


Message = (Request | RequestBatch | PrePrepare | Prepare | Commit | Checkpoint | ViewChange
           | NewView | Reply | Status | Fetch | Blocks | Hello | Query | QueryResult)

_KINDS: dict[str, type] = {cls.KIND: cls for cls in (
    Request, RequestBatch, PrePrepare, Prepare, Commit, Checkpoint, ViewChange, NewView, Reply,
    Status, Fetch, Blocks, Hello, Query, QueryResult)}


def encode_frame(msg: _Msg, body: bytes | None = None) -> bytes:
    """The frame for ``msg`` (pass ``body`` when it was already encoded for signing)."""
    if body is None:
        body = msg.body()
    payload = list(msg.requests) if isinstance(msg, PrePrepare) and msg.requests else None
    sig = msg.sig if msg.SIGNED else None
    return canonical_bytes([VERSION, msg.KIND, body, sig, payload], check=False)


def decode_frame(frame: bytes) -> tuple[_Msg, bytes]:
    """Decode a frame into ``(message, signed body bytes)``; raise :class:`MessageInvalid`."""
    if len(frame) > MAX_FRAME:
        raise MessageInvalid(f"frame of {len(frame)} bytes is over the {MAX_FRAME} limit")
    try:
        outer = decode(frame)
    except EncodingError:
        raise MessageInvalid("frame is not CBOR") from None
    if not isinstance(outer, list) or len(outer) != 5:
        raise MessageInvalid("frame: expected [version, kind, body, signature, payload]")
    version, kind, body, sig, payload = outer
    if version != VERSION:
        raise MessageInvalid(f"frame: unsupported version {version!r}, expected {VERSION}")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageInvalid("frame: unknown message kind")
    if not isinstance(body, bytes):
        raise MessageInvalid("frame: body must be a byte string")
    if cls.SIGNED and (not isinstance(sig, bytes) or len(sig) != SIG):
        raise MessageInvalid(f"{kind}: missing or mis-sized signature")
    try:
        fields = decode(body)
    except EncodingError:
        raise MessageInvalid(f"{kind}: body is not CBOR") from None
    if not isinstance(fields, dict):
        raise MessageInvalid(f"{kind}: body must be a map")
    if cls is PrePrepare:
        msg = cls.from_fields(fields, sig, payload)
    elif payload is not None:
        raise MessageInvalid(f"{kind}: unexpected payload")
    else:
        msg = cls.from_fields(fields, sig or b"")
    return msg, body


def sign_frame(msg: _Msg, key) -> tuple[_Msg, bytes]:
    """Sign ``msg`` with ``key`` (a :class:`medchain.identity.SigningKey`); return the signed
    message and its frame. Used by clients for requests, queries and hellos."""
    body = msg.body()
    signed = replace(msg, sig=key.sign_encoded(domain(msg.KIND), body))
    return signed, encode_frame(signed, body)
