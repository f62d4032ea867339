"""Field tables (medchain.fields): what a declaration derives, and garbage never decoding.

The fuzz tests feed every ledger frame kind and every protocol message type random bytes and
structured garbage (a valid message with one random change somewhere inside: a field
dropped, added or replaced by any CBOR value, tags and NaN included). Each either decodes to
a message that re-encodes to exactly the input, or raises our error type; nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

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
    Hello,
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
)
from medchain.errors import ProtocolError
from medchain.fields import (
    MAP,
    MAX_DEPTH,
    TEXT,
    VALUE,
    Bytes,
    Choice,
    Hex,
    Int,
    Invalid,
    ListOf,
    MapOf,
    Optional,
    Record,
    Schema,
    TupleOf,
    schema,
    wire,
)
from medchain.identity import RecipientKey, SigningKey
from medchain.protocol import (
    Ack,
    Enrollment,
    Heartbeat,
    ModelOffer,
    ModelRelease,
    ModelStatus,
    decode_message,
    encode,
    fragment,
)
from medchain.sealing import seal

# -- what a declaration derives ----------------------------------------------------------------


class Bad(Exception):
    pass


@schema("inner", Bad)
@dataclass(frozen=True, slots=True)
class Inner:
    code: bytes = wire("c", Bytes(2))


def _even(outer: Outer) -> None:
    if outer.count % 2:
        raise Invalid("must be even", "n")


@schema("outer", Bad, tags={"k": "o"}, check=_even)
@dataclass(frozen=True, slots=True)
class Outer:
    count: int = wire("n", Int(0, 10))
    name: str = wire("name", TEXT)
    inner: tuple[Inner, ...] = wire("in", ListOf(Record(Inner)))
    pair: tuple[int, bytes] | None = wire("p", Optional(TupleOf(Int(), Bytes())), default=None)
    hexes: tuple[bytes, ...] = wire("h", ListOf(Hex(1)), default=(), if_absent=())
    local: str = "not on the wire"


DROP = object()
OUTER = Outer(2, "a", (Inner(b"xy"),), (5, b"z"), (b"\xff",))
WIRE = {"k": "o", "n": 2, "name": "a", "in": [{"c": b"xy"}], "p": [5, b"z"], "h": ["ff"]}


def test_encode_and_decode_follow_from_the_declaration():
    assert Outer.SCHEMA.encode(OUTER) == WIRE
    assert Outer.SCHEMA.decode(WIRE) == OUTER
    assert Outer.SCHEMA.decode(WIRE, "given").local == "given"
    assert Outer.SCHEMA.decode({k: v for k, v in WIRE.items() if k != "h"}).hexes == ()


@pytest.mark.parametrize("change, problem", [
    ({"n": 11}, "outer: field 'n' must be an integer >= 0 and <= 10"),
    ({"n": True}, "outer: field 'n' must be an integer >= 0 and <= 10"),
    ({"n": 3}, "outer: field 'n' must be even"),
    ({"name": DROP}, "outer: field 'name' is missing"),
    ({"in": [{"c": b"xy"}, {"c": b"x"}]}, "outer: field 'in[1].c' must be 2 bytes"),
    ({"in": [{"c": b"xy", "d": 1}]}, "outer: field 'in[0]' has unknown field(s) 'd'"),
    ({"in": [[]]}, "outer: field 'in[0]' must be a map"),
    ({"p": [5, "z"]}, "outer: field 'p[1]' must be a byte string"),
    ({"p": [5]}, "outer: field 'p' must be a list of 2 items"),
    ({"h": ["f"]}, "outer: field 'h[0]' must be 1 bytes of hex"),
    ({"k": "x"}, "outer: field 'k' must be 'o'"),
    ({"secret": 1}, "outer: has unknown field(s) 'secret'"),
])
def test_each_problem_names_the_field_path_and_never_the_value(change, problem):
    d = {k: v for k, v in {**WIRE, **change}.items() if v is not DROP}
    with pytest.raises(Bad) as exc:
        Outer.SCHEMA.decode(d)
    assert str(exc.value) == problem


def test_values_stay_out_of_errors():
    with pytest.raises(Bad) as exc:
        Outer.SCHEMA.decode({**WIRE, "name": 7, "in": "PATIENT-1234"})
    assert "PATIENT" not in str(exc.value) and "7" not in str(exc.value)


@pytest.mark.parametrize("bad", [
    math.nan, math.inf, cbor2.undefined, cbor2.CBORTag(1, 0), {1: "x"}, {"a": {b"k": 1}},
    {1, 2}, (1,), bytearray(b"x"),
])
def test_free_form_values_must_have_a_canonical_encoding(bad):
    with pytest.raises(Invalid):
        VALUE.decode([bad])
    with pytest.raises(Invalid):
        MAP.decode({"x": bad})


def test_free_form_values_are_bounded_in_depth():
    deep: object = 0
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert VALUE.decode(deep) == deep
    with pytest.raises(Invalid):
        VALUE.decode([deep])


def test_an_omitted_field_is_left_out_while_absent_and_refused_when_written_so():
    @schema("opt", Bad)
    @dataclass(frozen=True)
    class Opt:
        a: int = wire("a", Int())
        m: dict = wire("m", MapOf(Choice("x", "y"), Bytes()), default_factory=dict,
                       if_absent={}, omit=True)
        t: str = wire("t", TEXT, default="", if_absent="", omit=True, signed=False)

    assert Opt.SCHEMA.encode(Opt(1)) == {"a": 1} == Opt.SCHEMA.encode_signed(Opt(1, t="z"))
    full = Opt(1, {"x": b"1"}, "z")
    assert Opt.SCHEMA.encode(full) == {"a": 1, "m": {"x": b"1"}, "t": "z"}
    assert Opt.SCHEMA.decode({"a": 1, "m": {"x": b"1"}, "t": "z"}) == full
    assert Opt.SCHEMA.decode({"a": 1}) == Opt(1)
    for bad, problem in [({"a": 1, "m": {}}, "field 'm' must be left out"),
                         ({"a": 1, "t": ""}, "field 't' must be left out"),
                         ({"a": 1, "m": {"z": b""}}, "field 'm' has a bad key"),
                         ({"a": 1, "m": {"x": 3}}, "field 'm['x']' must be a byte string"),
                         ({"a": 1, "m": [1]}, "field 'm' must be a map")]:
        with pytest.raises(Bad, match=re.escape(problem)):
            Opt.SCHEMA.decode(bad)
    with pytest.raises(TypeError, match="if_absent"):
        wire("m", TEXT, default="", omit=True)


def test_declarations_that_cannot_work_are_refused():
    @dataclass(frozen=True)
    class Twice:
        a: int = wire("x", Int())
        b: int = wire("x", Int())

    @dataclass(frozen=True)
    class Late:
        a: int = 0
        b: int = wire("b", Int(), default=0)

    with pytest.raises(TypeError, match="share"):
        Schema(Twice, "twice", Bad)
    with pytest.raises(TypeError, match="first|before"):
        Schema(Late, "late", Bad)


# -- garbage never decodes -----------------------------------------------------------------------

H, S = b"\x11" * 32, b"\x22" * 64
CERT = Certificate("prepared", 1, 2, 3, H, ((1, S), (2, S)), S, (b"r1",))
FRAMES = {type(m).KIND if type(m) is not PrePrepare or m.requests else "preprepare-empty": m
          for m in [
              Request("ingest", 7, 1000, {"type": "X", "a": [1, 2.5, None], "b": {"c": b""}}, S),
              RequestBatch((b"a", b"b")),
              PrePrepare(0, 1, 1000, H, 0, S, (b"r",)),
              PrePrepare(0, 1, 1000, H, 0, S),
              Prepare(0, 1, H, 2, S),
              Commit(0, 1, H, 3, S),
              Checkpoint(16, H, 1, S),
              ViewChange(2, 1, 16, H, ((0, S), (1, S)), (CERT, CERT.without_requests()), S),
              NewView(2, 2, (b"vc",), ((17, 5, H, S),), S),
              Reply(0, 1, "ingest", ((7, {"status": "committed", "x": -1.5}),), S),
              Status(0, 1, 10, 8, True, S),
              Fetch(1, 3, 9, S),
              Blocks(1, ({"h": {"n": 1}, "r": [b"x"], "c": None},), 8, H, ((0, S),), S),
              Hello("client", "ingest", "chain", b"\x01" * 32, S),
              Query("ingest", 1, "image", {"envelope_id": b"x"}, S),
              QueryResult(1, "ingest", 1, True, [{"a": 1}, "b"], {"s": b"1"}, S),
          ]}

DEVICE = SigningKey.from_seed(b"\x01" * 32)
ENVELOPE = seal({"dicom": b"D" * 150, "meta": b"{}"}, device_id="edge-1", sequence=3,
                signer=DEVICE, recipient=RecipientKey.generate().public, created_ms=0,
                chunk_size=100, meta={"modality": "CT", "n": [1, 2.5]},
                meta_recipient=RecipientKey.generate().public)
ONNX = b"onnx"
PROTOCOL = {
    "envelope": ENVELOPE,
    "fragment": decode_message(fragment(b"\x07" * 16, encode(ENVELOPE), 300)[1]),
    "ack": Ack(ENVELOPE.envelope_id, ENVELOPE.header.digest(), "edge-1", 3, "stored", ledger_height=4).signed(DEVICE),
    "heartbeat": Heartbeat("edge-1", 1, 2, 3, 4).signed(DEVICE),
    "model_release": ModelRelease("m", "1", hashlib.sha256(ONNX).digest(), H, "k", 5, ONNX,
                                  b"{}", {"record": {"height": 1}}).signed(DEVICE),
    "model_offer": ModelOffer("edge-1", "g", H, "1", "canary", 6, 2).signed(DEVICE),
    "model_status": ModelStatus("edge-1", H, "1", "refused", "why", "", 7).signed(DEVICE),
    "model_release_variants": ModelRelease("m", "1", hashlib.sha256(ONNX).digest(), H, "k", 5,
                                           ONNX, b"{}", None, variants={"int8": b"q", "fp16": b"h"}
                                           ).signed(DEVICE),
    "model_status_precision": ModelStatus("edge-1", H, "1", "installed", "", "1", 7,
                                          precision="int8").signed(DEVICE),
}

leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-2, 20)
          | st.floats() | st.text(max_size=6) | st.binary(max_size=8)
          | st.binary(min_size=32, max_size=32) | st.binary(min_size=64, max_size=64)
          | st.sampled_from(["prepared", "committed", "client", "stored", "canary", "pp", "k"])
          | st.just(cbor2.undefined) | st.builds(cbor2.CBORSimpleValue, st.integers(0, 19))
          | st.builds(cbor2.CBORTag, st.integers(0, 300), st.integers(0, 3) | st.text(max_size=3))
          | st.frozensets(st.integers(0, 3), max_size=3))
cbor_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=3) | st.integers(0, 3) | st.binary(max_size=2), inner,
                      max_size=4), max_leaves=10)


@st.composite
def mutated(draw, value):
    """``value`` with one random change at a random place inside it."""
    if isinstance(value, dict) and value and draw(st.integers(0, 2)):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        return {**value, key: draw(mutated(value[key]))}
    if isinstance(value, list) and value and draw(st.integers(0, 2)):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutated(value[i])), *value[i + 1:]]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "drop" and isinstance(value, (dict, list)) and value:
        if isinstance(value, dict):
            gone = draw(st.sampled_from(sorted(value, key=repr)))
            return {k: v for k, v in value.items() if k != gone}
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + value[i + 1:]
    if action == "add" and isinstance(value, dict):
        key = draw(st.text(max_size=3) | st.integers(0, 3) | st.sampled_from(sorted(value)))
        return {**value, key: draw(cbor_values)}
    if action == "add" and isinstance(value, list):
        return [*value, draw(cbor_values)]
    return draw(cbor_values)


def dumps(value) -> bytes:
    return cbor2.dumps(value, canonical=True)


def frame_parts(msg) -> list:
    """A frame as a mutable structure: ``[version, kind, body map, signature, payload]``."""
    outer = cbor2.loads(encode_frame(msg))
    outer[2] = cbor2.loads(outer[2])
    return outer


def assert_frame_is_ours_or_refused(data: bytes, exact: bool) -> None:
    try:
        msg, body = decode_frame(data)
    except MessageInvalid:
        return
    again = encode_frame(msg)
    if exact:  # canonical input: re-encoding gives back exactly the input
        assert again == data
    decoded, _ = decode_frame(again)
    assert decoded == msg and encode_frame(decoded) == again


def assert_message_is_ours_or_refused(data: bytes, exact: bool) -> None:
    try:
        msg = decode_message(data)
    except ProtocolError:
        return
    again = encode(msg)
    if exact:
        assert again == data
    assert decode_message(again) == msg


@pytest.mark.parametrize("kind", sorted(FRAMES))
@given(data=st.data())
def test_garbage_frames_never_decode(kind, data):
    parts = data.draw(mutated(frame_parts(FRAMES[kind])))
    if isinstance(parts, list) and len(parts) == 5 and not isinstance(parts[2], bytes):
        try:
            parts[2] = dumps(parts[2])
        except (TypeError, ValueError, cbor2.CBOREncodeError):
            return
    try:
        frame = dumps(parts)
    except (TypeError, ValueError, cbor2.CBOREncodeError):
        return
    assert_frame_is_ours_or_refused(frame, exact=True)


@pytest.mark.parametrize("name", sorted(PROTOCOL))
@given(data=st.data())
def test_garbage_protocol_messages_never_decode(name, data):
    wire_map = cbor2.loads(encode(PROTOCOL[name]))
    try:
        message = dumps(data.draw(mutated(wire_map)))
    except (TypeError, ValueError, cbor2.CBOREncodeError):
        return
    assert_message_is_ours_or_refused(message, exact=True)


@given(st.binary(max_size=300))
def test_random_bytes_never_decode_to_something_else(data):
    assert_frame_is_ours_or_refused(data, exact=False)
    assert_message_is_ours_or_refused(data, exact=False)


@given(st.data())
def test_random_byte_flips_in_real_messages(data):
    raw = bytearray(data.draw(st.sampled_from(
        [encode_frame(m) for m in FRAMES.values()] + [encode(m) for m in PROTOCOL.values()])))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    assert_frame_is_ours_or_refused(bytes(raw), exact=False)
    assert_message_is_ours_or_refused(bytes(raw), exact=False)


ENROLLMENT = Enrollment("edge-1", H, H, H, H, H, 5, (H, S[:32]))


@given(st.text(max_size=200) | st.builds(
    json.dumps, cbor_values | mutated(ENROLLMENT.to_wire()), default=st.just(repr),
    skipkeys=st.just(True)))
def test_garbage_enrolment_files_are_a_protocol_error(text):
    try:
        got = Enrollment.from_json(text)
    except ProtocolError:
        return
    assert Enrollment.from_json(got.to_json()) == got


def test_the_seeds_themselves_decode():
    for msg in FRAMES.values():
        assert_frame_is_ours_or_refused(encode_frame(msg), exact=True)
        assert decode_frame(encode_frame(msg))[0] == msg
    for msg in PROTOCOL.values():
        assert decode_message(encode(msg)) == msg
