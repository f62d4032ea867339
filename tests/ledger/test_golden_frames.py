"""Golden frames: the exact bytes of every ledger message kind, recorded once.

Any change to the wire format (a key, an order, an optional field's encoding) fails here.
Signatures are real, from fixed seeds, so the signed bodies are pinned too. The hex lives in
``golden_frames.json``; it was written from the hand-written codec and must not be regenerated
to make a change pass.
"""

import json
from pathlib import Path

import pytest

from ledger.blocks import Block, BlockHeader, batch_digest, results_tree, tx_root
from ledger.messages import (
    Blocks,
    Certificate,
    Challenge,
    Checkpoint,
    Commit,
    Fetch,
    Hello,
    Message,
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
    Welcome,
    decode_frame,
    encode_frame,
    request_digest,
    sign_frame,
)
from ledger.quorum import Signer
from ledger.receipts import TxReceipt
from medchain.canonical import canonical_bytes, decode
from medchain.identity import SigningKey

GOLDEN = json.loads((Path(__file__).with_name("golden_frames.json")).read_text())
KEYS = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(4)]
CLIENT = SigningKey.from_seed(b"\x42" * 32)
SIGNERS = [Signer(i, k) for i, k in enumerate(KEYS)]


def signed(msg, i):
    return SIGNERS[i].sign(msg)[0]


def samples() -> dict:
    """One representative instance of every kind, with the variants of optional parts."""
    req1, f1 = sign_frame(Request("ingest", 7, 1_700_000_000_000, {
        "type": "DEVICE_REVOKED", "device_id": "edge-1", "reason": "lost"}), CLIENT)
    req2, f2 = sign_frame(Request("registrar", 2**40, 0, {"type": "X", "n": -3, "b": b"\x00",
                                                         "l": [1, 2.5, None, True]}), CLIENT)
    requests = (f1, f2)
    digest = batch_digest(5, 1234, tx_root(requests))
    pp = signed(PrePrepare(1, 5, 1234, digest, 1, requests=requests), 1)
    prepares = [signed(Prepare(1, 5, digest, i), i) for i in (0, 2, 3)]
    commits = [signed(Commit(1, 5, digest, i), i) for i in (0, 1, 2)]
    checkpoints = [signed(Checkpoint(4, b"\x33" * 32, i), i) for i in (0, 1, 2)]
    proof = tuple((c.sender, c.sig) for c in checkpoints)
    prepared = Certificate("prepared", 1, 5, 1234, digest,
                           tuple((p.sender, p.sig) for p in prepares[1:]), pp.sig, requests)
    committed = Certificate("committed", 1, 5, 1234, digest,
                            tuple((c.sender, c.sig) for c in commits))
    vc = signed(ViewChange(2, 3, 4, b"\x33" * 32, proof,
                           (prepared, committed.without_requests())), 3)
    vc_empty = signed(ViewChange(2, 0, 0, b"\x00" * 32, (), ()), 0)
    header = BlockHeader("chain-a", 5, 1234, tx_root(requests), 2, b"\x01" * 32, b"\x02" * 32,
                         b"\x03" * 32)
    block = Block(header, requests, committed)
    return {
        "request": req1,
        "request_nested_tx": req2,
        "requests": RequestBatch(requests),
        "requests_empty": RequestBatch(()),
        "preprepare": pp,
        "preprepare_no_payload": signed(PrePrepare(1, 5, 1234, digest, 1), 1),
        "prepare": prepares[0],
        "commit": commits[0],
        "checkpoint": checkpoints[0],
        "viewchange": vc,
        "viewchange_empty": vc_empty,
        "newview": signed(NewView(2, 2, (encode_frame(vc), encode_frame(vc_empty)),
                                  ((5, 1234, digest, pp.sig), (6, 0, b"\x44" * 32, pp.sig))), 2),
        "reply": signed(Reply(1, 2, "ingest", ((7, {"status": "committed", "height": 5,
                                                    "x": [b"\x01", None, -1, 0.5, False]}),
                                               (8, {"status": "rejected", "reason": "no"}))), 2),
        "status": signed(Status(1, 0, 10, 8, True), 0),
        "status_abnormal": signed(Status(3, 1, 0, 0, False), 1),
        "fetch": signed(Fetch(2, 1, 9), 2),
        "blocks": signed(Blocks(0, (block.to_wire(),), 4, b"\x33" * 32, proof), 0),
        "challenge": Challenge(b"\x07" * 32),
        "hello_validator": signed(Hello("validator", "1", "chain-a", b"\x07" * 32), 1),
        "welcome": Welcome(b"\x07" * 32),
        "hello_client": sign_frame(Hello("client", "ingest", "chain-a", b"\x08" * 32),
                                   CLIENT)[0],
        "query": sign_frame(Query("ingest", 3, "image", {"envelope_id": b"\x05" * 16}),
                            CLIENT)[0],
        "queryresult": signed(QueryResult(1, "ingest", 3, True, {"height": 5, "r": [1, "a"]},
                                          {"sig": b"\x06" * 64}), 1),
        "queryresult_refused": signed(QueryResult(2, "ingest", 4, False, "unknown query", {}),
                                      2),
    }


SAMPLES = samples()
EXTRA = {  # wire maps that are not frames but are signed, hashed or stored as they are
    "certificate_prepared": lambda s: canonical_bytes(s["viewchange"].certs[0].to_wire()),
    "certificate_committed": lambda s: canonical_bytes(s["viewchange"].certs[1].to_wire()),
    "block": lambda s: canonical_bytes(s["blocks"].blocks[0]),
    "receipt": lambda s: canonical_bytes(receipt(s).to_wire()),
}


def receipt(s) -> TxReceipt:
    """The receipt of the second request of the sample block."""
    block = Block.from_wire(s["blocks"].blocks[0])
    record = {"height": 5, "index": 1, "type": "X", "t": 1234}
    result = {"status": "committed", "reason": "", "output": {"duplicate": False}}
    results = results_tree([request_digest(r) for r in block.requests],
                           [{"status": "rejected", "reason": "no"}, result])
    votes = tuple((i, SIGNERS[i].sign_header(5, block.header.hash)) for i in (0, 3))
    return TxReceipt(record, block.header, block.requests[1], block.proof(1),
                     s["viewchange"].certs[1], result, results.proof(1), votes)


def test_every_kind_has_a_golden_frame():
    kinds = {type(m).KIND for m in SAMPLES.values()}
    assert kinds == {k.KIND for k in Message.__args__}
    assert set(GOLDEN) == set(SAMPLES) | set(EXTRA)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_is_byte_for_byte_the_recorded_one(name):
    assert encode_frame(SAMPLES[name]).hex() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_recorded_frames_decode_to_the_same_message(name):
    msg, body = decode_frame(bytes.fromhex(GOLDEN[name]))
    want = SAMPLES[name]
    assert msg == want and body == want.body()
    if isinstance(want, PrePrepare):
        assert msg.requests == want.requests
    assert encode_frame(msg).hex() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_nested_wire_maps_are_byte_for_byte_the_recorded_ones(name):
    assert EXTRA[name](SAMPLES).hex() == GOLDEN[name]


def test_recorded_certificates_and_blocks_decode():
    vc = SAMPLES["viewchange"]
    for cert, name in zip(vc.certs, ("certificate_prepared", "certificate_committed")):
        assert Certificate.from_wire(decode(bytes.fromhex(GOLDEN[name]))) == cert
    block = Block.from_wire(decode(bytes.fromhex(GOLDEN["block"])))
    assert canonical_bytes(block.to_wire()).hex() == GOLDEN["block"]
    got = TxReceipt.from_wire(decode(bytes.fromhex(GOLDEN["receipt"])))
    assert got == receipt(SAMPLES)
