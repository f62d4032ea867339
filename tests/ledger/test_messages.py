"""The v1 ledger wire codec: round trips, and every malformed frame refused clearly."""

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.errors import MessageInvalid
from ledger.messages import (
    Blocks,
    Certificate,
    Checkpoint,
    Commit,
    Fetch,
    Challenge,
    Hello,
    Welcome,
    NewView,
    Prepare,
    PrePrepare,
    Query,
    QueryResult,
    Reply,
    Request,
    RequestBatch,
    Status,
    ViewChange,
    decode_frame,
    encode_frame,
    sign_frame,
)
from ledger.quorum import Keyring, Signer
from medchain.canonical import canonical_bytes
from medchain.identity import SigningKey

KEY = SigningKey.from_seed(bytes(32))
H = b"\x11" * 32
S = b"\x22" * 64
ints = st.integers(min_value=0, max_value=2**62)
cert = Certificate("prepared", 1, 2, 3, H, ((1, S), (2, S)), S, (b"r1", b"r2"))

SAMPLES = [
    Request("ingest", 7, 1000, {"type": "X", "a": 1}, S),
    RequestBatch((b"a", b"b")),
    PrePrepare(0, 1, 1000, H, 0, S, (b"r",)),
    Prepare(0, 1, H, 2, S),
    Commit(0, 1, H, 3, S),
    Checkpoint(16, H, 1, S),
    ViewChange(2, 1, 16, H, ((0, S), (1, S), (2, S)), (cert,), S),
    NewView(2, 2, (b"vc",), ((17, 5, H, S),), S),
    Reply(0, 1, "ingest", ((7, {"status": "committed"}),), S),
    Status(0, 1, 10, 8, True, S),
    Fetch(1, 3, 9, S),
    Blocks(1, ({"h": {}},), 8, H, ((0, S),), S),
    Challenge(H),
    Hello("client", "ingest", "chain", H, S),
    Welcome(H),
    Query("ingest", 1, "image", {"envelope_id": b"x"}, S),
    QueryResult(1, "ingest", 1, True, {"a": 1}, {}, S),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    decoded, body = decode_frame(encode_frame(msg))
    assert decoded == msg and body == msg.body()
    if isinstance(msg, PrePrepare):
        assert decoded.requests == msg.requests


@given(view=ints, seq=ints, sender=st.integers(0, 100), digest=st.binary(min_size=32, max_size=32))
def test_votes_round_trip_and_bodies_are_canonical(view, seq, sender, digest):
    for cls in (Prepare, Commit):
        msg = cls(view, seq, digest, sender, S)
        decoded, body = decode_frame(encode_frame(msg))
        assert decoded == msg
        assert body == canonical_bytes(msg.fields())


def frame(kind, body, sig=S, payload=None, version=1):
    return canonical_bytes([version, kind, body, sig, payload])


@pytest.mark.parametrize("bad, why", [
    (b"\xff\x00", "not CBOR"),
    (canonical_bytes({"a": 1}), "expected"),
    (frame("prepare", b"", version=2), "version"),
    (frame("nonsense", b""), "unknown message kind"),
    (frame("prepare", "text"), "body must be a byte string"),
    (frame("prepare", canonical_bytes({"v": 0}), sig=b"short"), "signature"),
    (frame("prepare", canonical_bytes([1])), "prepare: must be a map"),
    (frame("prepare", canonical_bytes({"v": 0, "n": 1, "d": H, "i": 1, "k": "commit"})), "'k'"),
    (frame("prepare", canonical_bytes({"v": -1, "n": 1, "d": H, "i": 1, "k": "prepare"})), "'v'"),
    (frame("prepare", canonical_bytes({"v": True, "n": 1, "d": H, "i": 1, "k": "prepare"})), "'v'"),
    (frame("prepare", canonical_bytes({"v": 0, "n": 1, "d": b"x", "i": 1, "k": "prepare"})), "'d'"),
    (frame("prepare", canonical_bytes({"v": 0, "n": 1, "d": H, "i": 1, "k": "prepare"}),
           payload=[b"x"]), "unexpected payload"),
    (frame("preprepare", canonical_bytes({"v": 0, "n": 1, "d": H, "i": 1, "t": 1}),
           payload=["not bytes"]), "byte strings"),
    (frame("hello", canonical_bytes({"role": "admin", "name": "x", "chain": "c", "ts": 1})),
     "role"),
    (frame("viewchange", canonical_bytes({"v": 1, "i": 0, "h": 0, "hd": H, "hp": [[0, b"x"]],
                                          "P": []})), r"'hp\[0\]\[1\]' must be 64 bytes"),
    (frame("viewchange", canonical_bytes({"v": 1, "i": 0, "h": 0, "hd": H, "hp": [],
                                          "P": [{"k": "weird"}]})), r"'P\[0\].k' must be one of"),
    (frame("newview", canonical_bytes({"v": 1, "i": 0, "V": [], "O": [[1, 2, H]]})),
     r"'O\[0\]' must be a list of 4"),
    (frame("reply", canonical_bytes({"v": 1, "i": 0, "c": "x", "r": [[1]]})), "reply"),
    (frame("status", canonical_bytes({"v": 1, "i": 0, "e": 0, "h": 0, "ok": 1})), "'ok'"),
    (frame("request", canonical_bytes({"client": "", "rid": 1, "ts": 1, "tx": {}})), "client"),
    (frame("request", canonical_bytes({"rid": 1, "ts": 1, "tx": {}})), "'client' is missing"),
    (frame("request", canonical_bytes({"client": "c", "rid": 1, "ts": 1, "tx": {}, "x": 0})),
     "unknown field"),
    (frame("request", canonical_bytes({"client": "c", "rid": 1, "ts": 1,
                                       "tx": {"t": [cbor2.undefined]}}, check=False)),
     "'tx' must be a map of plain CBOR values"),
    (frame("prepare", canonical_bytes({"v": 0, "n": 1, "d": H, "i": 1, "k": "prepare"}),
           version=True), "version"),
    (frame("requests", canonical_bytes({"r": []})), "unexpected signature"),
    (frame("preprepare", canonical_bytes({"v": 0, "n": 1, "d": H, "i": 1, "t": 1, "k": "pp"}),
           payload=[]), "empty payload|non-empty"),
    (frame("preprepare", canonical_bytes({"v": 0, "n": 1, "d": H, "i": 1, "t": 1})), "'k'"),
    (frame("viewchange", canonical_bytes({"v": 1, "i": 0, "h": 0, "hd": H, "hp": [], "P": [
        {"k": "committed", "v": 1, "n": 2, "t": 3, "d": H, "s": [], "p": S, "r": []}]})),
     "pre-prepare signature"),
])
def test_malformed_frames_are_refused_with_the_field_named(bad, why):
    with pytest.raises(MessageInvalid, match=why):
        decode_frame(bad)


def test_oversized_frame_is_refused_before_decoding():
    with pytest.raises(MessageInvalid, match="limit"):
        decode_frame(b"\x00" * (64 * 1024 * 1024 + 1))


def test_signatures_cover_the_body_under_a_kind_domain():
    keyring = Keyring([KEY.public.raw] + [SigningKey.from_seed(bytes([i]) * 32).public.raw
                                          for i in range(1, 4)])
    signed, body = Signer(0, KEY).sign(Prepare(1, 2, H, 0))
    assert keyring.valid(0, "prepare", body, signed.sig)
    assert not keyring.valid(0, "commit", body, signed.sig)      # other kind
    assert not keyring.valid(1, "prepare", body, signed.sig)     # other signer
    assert not keyring.valid(7, "prepare", body, signed.sig)     # not a member
    other = Prepare(1, 3, H, 0).body()
    assert not keyring.valid(0, "prepare", other, signed.sig)    # other content
    req, frame_bytes = sign_frame(Request("ingest", 1, 2, {"type": "X"}), KEY)
    decoded, rbody = decode_frame(frame_bytes)
    KEY.public.verify_encoded("medchain/v1/ledger/request", rbody, decoded.sig)
