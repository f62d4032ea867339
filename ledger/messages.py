"""The ledger's wire messages (v1): typed frozen dataclasses and their one codec.

A frame is the canonical CBOR array ``[kind, body, signature, payload]``. ``body`` is the
canonical CBOR of the message's fields and is what the sender's Ed25519 key signs, under the
domain ``medchain/v1/ledger/<kind>``; ``payload`` carries bulk data whose hash the body
already binds (the requests of a pre-prepare, whose Merkle root is inside the batch digest),
so it is never signed twice. Decoding checks every field's type and size, refuses unknown
fields, and raises :class:`MessageInvalid` and nothing else; it does not verify signatures,
which needs the keys (the replica and the shells do that, see :mod:`ledger.quorum`).

Each message declares its body fields once, as ``wire(key, codec)`` on its dataclass fields
(:mod:`medchain.fields`); the body map, the checks on decoding and the error naming the field
all follow from that declaration.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

from ledger.errors import MessageInvalid
from medchain.canonical import canonical_bytes, decode
from medchain.errors import EncodingError
from medchain.fields import (
    BOOL,
    BYTES,
    MAP,
    VALUE,
    Bytes,
    Choice,
    Int,
    Invalid,
    ListOf,
    Optional,
    Record,
    Schema,
    Text,
    TupleOf,
    schema,
    wire,
)

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
    "Challenge",
    "Hello",
    "Welcome",
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
NONCE = 32


def domain(kind: str) -> str:
    return f"medchain/v{VERSION}/ledger/{kind}"


def request_digest(request_bytes: bytes) -> bytes:
    return hashlib.sha256(request_bytes).digest()


# -- field codecs ------------------------------------------------------------------------------

UINT = Int(0, 2**63 - 1)
NAME = Text(1, MAX_NAME)
DIGEST = Bytes(HASH)
SIGNATURE = Bytes(SIG)
FRAMES = ListOf(BYTES)  # encoded requests or frames, each signed on its own
SIG_PAIRS = ListOf(TupleOf(UINT, SIGNATURE))  # [[replica, signature], ...]

M = TypeVar("M")


def _body(**options: Any) -> Callable[[type[M]], type[M]]:
    """Attach the schema of a message's body, named by its ``KIND``."""

    def attach(cls: type[M]) -> type[M]:
        cls.SCHEMA = Schema(cls, cls.KIND, MessageInvalid, **options)
        return cls

    return attach


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Msg:
    KIND: ClassVar[str] = ""
    SIGNED: ClassVar[bool] = True
    SCHEMA: ClassVar[Schema]
    # validators build replies and block/view-change bundles from values already checked
    # (decoded CBOR, parsed transactions); skipping the type walk halves their encoding cost
    TRUSTED: ClassVar[bool] = False

    def fields(self) -> dict:
        """The body map: what is encoded and signed."""
        return self.SCHEMA.encode(self)

    def body(self) -> bytes:
        return canonical_bytes(self.SCHEMA.encode(self), check=not self.TRUSTED)

    @classmethod
    def from_fields(cls, d: Any, sig: bytes = b"") -> _Msg:
        """The message for a decoded body map, or :class:`MessageInvalid`."""
        return cls.SCHEMA.decode(d, sig) if cls.SIGNED else cls.SCHEMA.decode(d)


@_body()
@dataclass(frozen=True, slots=True)
class Request(_Msg):
    """A transaction submitted by a principal. ``rid`` names the request (retries reuse it);
    ``ts`` is the client's clock, checked for freshness against the agreed block time."""

    KIND: ClassVar[str] = "request"
    client: str = wire("client", NAME)
    rid: int = wire("rid", UINT)
    ts: int = wire("ts", UINT)
    tx: dict = wire("tx", MAP)
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class RequestBatch(_Msg):
    """Client to validator: several encoded requests in one frame (each signed on its own)."""

    KIND: ClassVar[str] = "requests"
    SIGNED: ClassVar[bool] = False
    requests: tuple[bytes, ...] = wire("r", FRAMES)


@_body(tags={"k": "pp"})
@dataclass(frozen=True, slots=True)
class PrePrepare(_Msg):
    """The primary's proposal: batch ``digest`` (which binds seq, time and the requests'
    Merkle root) at ``seq`` in ``view``; ``requests`` travel as the unsigned payload."""

    KIND: ClassVar[str] = "preprepare"
    view: int = wire("v", UINT)
    seq: int = wire("n", UINT)
    t: int = wire("t", UINT)
    digest: bytes = wire("d", DIGEST)
    sender: int = wire("i", UINT)
    sig: bytes = b""
    requests: tuple[bytes, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class _Vote(_Msg):
    view: int = wire("v", UINT)
    seq: int = wire("n", UINT)
    digest: bytes = wire("d", DIGEST)
    sender: int = wire("i", UINT)
    sig: bytes = b""


@_body(tags={"k": "prepare"})
@dataclass(frozen=True, slots=True)
class Prepare(_Vote):
    KIND: ClassVar[str] = "prepare"


@_body(tags={"k": "commit"})
@dataclass(frozen=True, slots=True)
class Commit(_Vote):
    KIND: ClassVar[str] = "commit"


@_body(tags={"k": "checkpoint"})
@dataclass(frozen=True, slots=True)
class Checkpoint(_Msg):
    """``digest`` is the hash of the block header at ``seq`` (which chains every earlier
    header and holds the state root)."""

    KIND: ClassVar[str] = "checkpoint"
    seq: int = wire("n", UINT)
    digest: bytes = wire("d", DIGEST)
    sender: int = wire("i", UINT)
    sig: bytes = b""


def _primary_sig_iff_prepared(cert: Certificate) -> None:
    if (cert.kind == "prepared") != (cert.primary_sig is not None):
        raise Invalid("must carry a pre-prepare signature if and only if prepared")


@schema("certificate", MessageInvalid, check=_primary_sig_iff_prepared)
@dataclass(frozen=True, slots=True)
class Certificate:
    """Transferable proof about one sequence number, carried in view changes and blocks.

    ``prepared``: the primary's pre-prepare signature plus 2f prepare signatures for
    ``(view, seq, digest)``. ``committed``: 2f + 1 commit signatures. ``requests`` is the
    batch (so the digest can be recomputed and the batch re-proposed)."""

    SCHEMA: ClassVar[Schema]
    kind: str = wire("k", Choice("prepared", "committed"))
    view: int = wire("v", UINT)
    seq: int = wire("n", UINT)
    t: int = wire("t", UINT)
    digest: bytes = wire("d", DIGEST)
    sigs: tuple[tuple[int, bytes], ...] = wire("s", SIG_PAIRS)
    primary_sig: bytes | None = wire("p", Optional(SIGNATURE), default=None)
    requests: tuple[bytes, ...] = wire("r", FRAMES, default=())

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls, d: Any) -> Certificate:
        return cls.SCHEMA.decode(d)

    def without_requests(self) -> Certificate:
        return Certificate(self.kind, self.view, self.seq, self.t, self.digest, self.sigs,
                           self.primary_sig)


@_body()
@dataclass(frozen=True, slots=True)
class ViewChange(_Msg):
    """Sent by ``sender`` to move to ``view``: its stable checkpoint with 2f + 1 signatures,
    and its best certificate for every sequence number above it."""

    KIND: ClassVar[str] = "viewchange"
    view: int = wire("v", UINT)
    sender: int = wire("i", UINT)
    stable_seq: int = wire("h", UINT)
    stable_digest: bytes = wire("hd", DIGEST)
    stable_proof: tuple[tuple[int, bytes], ...] = wire("hp", SIG_PAIRS)
    certs: tuple[Certificate, ...] = wire("P", ListOf(Record(Certificate)))
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class NewView(_Msg):
    """The new primary's proof that ``view`` started: 2f + 1 view changes and the
    pre-prepares ``(seq, t, digest, signature)`` it re-issues, which every replica recomputes."""

    KIND: ClassVar[str] = "newview"
    view: int = wire("v", UINT)
    sender: int = wire("i", UINT)
    view_changes: tuple[bytes, ...] = wire("V", FRAMES)  # the senders' signed frames, verbatim
    preprepares: tuple[tuple[int, int, bytes, bytes], ...] = wire(
        "O", ListOf(TupleOf(UINT, UINT, DIGEST, SIGNATURE)))
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class Reply(_Msg):
    """A validator's results for one client's requests executed in one block (or a cached
    result for a retried request). ``results`` holds ``(rid, result map)`` pairs."""

    KIND: ClassVar[str] = "reply"
    TRUSTED: ClassVar[bool] = True
    view: int = wire("v", UINT)
    sender: int = wire("i", UINT)
    client: str = wire("c", NAME)
    results: tuple[tuple[int, dict], ...] = wire("r", ListOf(TupleOf(UINT, MAP)))
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class Status(_Msg):
    """Periodic gossip: lets a lagging replica learn that it is behind (in view or height)."""

    KIND: ClassVar[str] = "status"
    view: int = wire("v", UINT)
    sender: int = wire("i", UINT)
    executed: int = wire("e", UINT)
    stable: int = wire("h", UINT)
    normal: bool = wire("ok", BOOL)
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class Fetch(_Msg):
    """Ask a peer for the blocks ``start..end`` (state transfer)."""

    KIND: ClassVar[str] = "fetch"
    sender: int = wire("i", UINT)
    start: int = wire("a", Int(1, 2**63 - 1))
    end: int = wire("b", Int(1, 2**63 - 1))
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class Blocks(_Msg):
    """Blocks with their commit certificates (``ledger.blocks.Block`` wire maps), plus the
    sender's stable checkpoint proof so the receiver knows how far it must go."""

    KIND: ClassVar[str] = "blocks"
    TRUSTED: ClassVar[bool] = True
    sender: int = wire("i", UINT)
    blocks: tuple[dict, ...] = wire("B", ListOf(MAP))
    stable_seq: int = wire("h", UINT)
    stable_digest: bytes = wire("hd", DIGEST)
    stable_proof: tuple[tuple[int, bytes], ...] = wire("hp", SIG_PAIRS)
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class Challenge(_Msg):
    """First frame a validator sends on a connection it accepts: a fresh random nonce that
    the caller's ``Hello`` must sign, so a recorded Hello is worthless on any other
    connection (it was bound only to a time before, and could be replayed for minutes)."""

    KIND: ClassVar[str] = "challenge"
    SIGNED: ClassVar[bool] = False
    nonce: bytes = wire("n", Bytes(NONCE))


@_body()
@dataclass(frozen=True, slots=True)
class Hello(_Msg):
    """The caller's answer to the :class:`Challenge`: who is talking (a validator id or a
    principal name), signed by that identity's key, bound to the chain and to this
    connection's nonce."""

    KIND: ClassVar[str] = "hello"
    role: str = wire("role", Choice("validator", "client"))
    name: str = wire("name", NAME)
    chain: str = wire("chain", NAME)
    nonce: bytes = wire("n", Bytes(NONCE))
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class Welcome(_Msg):
    """A validator's answer to a :class:`Hello` it accepted, echoing the connection's nonce.
    The caller counts a link up only on this frame: a refused Hello is answered by a hang-up,
    and a caller that counted the link up on sending its Hello saw a refused principal as
    connected for as long as the hang-up took to arrive."""

    KIND: ClassVar[str] = "welcome"
    SIGNED: ClassVar[bool] = False
    nonce: bytes = wire("n", Bytes(NONCE))


@_body()
@dataclass(frozen=True, slots=True)
class Query(_Msg):
    """A read-only question from a principal (answered by each validator on its own)."""

    KIND: ClassVar[str] = "query"
    client: str = wire("c", NAME)
    qid: int = wire("q", UINT)
    what: str = wire("w", NAME)
    args: dict = wire("a", MAP)
    sig: bytes = b""


@_body()
@dataclass(frozen=True, slots=True)
class QueryResult(_Msg):
    """A validator's answer. ``answer`` is what clients compare across validators;
    ``attestation`` holds what differs per validator (its own signatures on audit entries)."""

    KIND: ClassVar[str] = "queryresult"
    TRUSTED: ClassVar[bool] = True
    sender: int = wire("i", UINT)
    client: str = wire("c", NAME)
    qid: int = wire("q", UINT)
    ok: bool = wire("ok", BOOL)
    answer: Any = wire("a", VALUE)
    attestation: dict = wire("x", MAP)
    sig: bytes = b""


Message = (Request | RequestBatch | PrePrepare | Prepare | Commit | Checkpoint | ViewChange
           | NewView | Reply | Status | Fetch | Blocks | Challenge | Hello | Welcome | Query
           | QueryResult)

_KINDS: dict[str, type] = {cls.KIND: cls for cls in (
    Request, RequestBatch, PrePrepare, Prepare, Commit, Checkpoint, ViewChange, NewView, Reply,
    Status, Fetch, Blocks, Challenge, Hello, Welcome, Query, QueryResult)}


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
    if type(outer) is not list or len(outer) != 5:
        raise MessageInvalid("frame: expected [version, kind, body, signature, payload]")
    version, kind, body, sig, payload = outer
    if type(version) is not int or version != VERSION:
        raise MessageInvalid(f"frame: unsupported version, expected {VERSION}")
    cls = _KINDS.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageInvalid("frame: unknown message kind")
    if type(body) is not bytes:
        raise MessageInvalid("frame: body must be a byte string")
    if cls.SIGNED:
        if type(sig) is not bytes or len(sig) != SIG:
            raise MessageInvalid(f"{kind}: missing or mis-sized signature")
        rest: tuple = (sig,)
    elif sig is not None:
        raise MessageInvalid(f"{kind}: unexpected signature")
    else:
        rest = ()
    if cls is PrePrepare:
        rest += (_payload(payload),)
    elif payload is not None:
        raise MessageInvalid(f"{kind}: unexpected payload")
    try:
        fields = decode(body)
    except EncodingError:
        raise MessageInvalid(f"{kind}: body is not CBOR") from None
    return cls.SCHEMA.decode(fields, *rest), body


def _payload(payload: Any) -> tuple[bytes, ...]:
    """A pre-prepare's requests; an empty batch travels as no payload."""
    if payload is None:
        return ()
    if payload == [] or type(payload) is not list:
        raise MessageInvalid("preprepare: payload must be a non-empty list of byte strings")
    try:
        return FRAMES.decode(payload)
    except Invalid:
        raise MessageInvalid("preprepare: payload must be a list of byte strings") from None


def sign_frame(msg: _Msg, key) -> tuple[_Msg, bytes]:
    """Sign ``msg`` with ``key`` (a :class:`medchain.identity.SigningKey`); return the signed
    message and its frame. Used by clients for requests, queries and hellos."""
    body = msg.body()
    signed = replace(msg, sig=key.sign_encoded(domain(msg.KIND), body))
    return signed, encode_frame(signed, body)
