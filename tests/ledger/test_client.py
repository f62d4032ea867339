"""The client API against one real 4-process cluster: submit and f + 1 matching results,
verified inclusion proofs, consent, access decisions and audit trails, device lookups,
model releases; and clear errors for bad input."""

import dataclasses
import os

import pytest

from ledger.client import LedgerClient
from ledger.cluster import LocalCluster
from ledger.errors import CertificateInvalid, LedgerUnavailable, QueryFailed, TransactionInvalid
from medchain.errors import ProofInvalid
from medchain.identity import SigningKey
from medchain.merkle import InclusionProof
from ledger.receipts import TxReceipt
from ledger.transactions import (
    ConsentSet,
    DeviceEnrolled,
    DeviceRevoked,
    ImageRegistered,
    InferenceRecorded,
    ModelReleased,
    PrincipalSet,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cluster with an enrolled device, a clinician and a researcher."""
    from ledger.genesis import Params

    c = LocalCluster(4, tmp_path_factory.mktemp("client"),
                     params=Params(checkpoint_interval=8, window=32, status_ms=200))
    c.start()
    op = c.client("operator")
    ing = c.client("ingest")
    device = SigningKey.generate()
    doctor, researcher = SigningKey.generate(), SigningKey.generate()
    for tx in (DeviceEnrolled("dev-1", device.public.raw, "site-a", "ct-1"),
               PrincipalSet("dr-x", "clinician", doctor.public.raw),
               PrincipalSet("res-y", "researcher", researcher.public.raw)):
        assert op.submit(tx).committed
    yield c, op, ing, device
    op.close()
    ing.close()
    c.close()


def image(patient="tok-1", consent=("diagnosis",), seq=None):
    return ImageRegistered(os.urandom(16), os.urandom(32), patient, "1.2.st", "1.2.se",
                           "1.2.in", "MR", consent, "default", "dev-1",
                           seq if seq is not None else int.from_bytes(os.urandom(6), "big"))


def test_submit_returns_the_agreed_result(world):
    _, _, ing, _ = world
    r = ing.submit(image())
    assert r.committed and r.height >= 1 and r.index >= 0 and len(r.state_root) == 32
    assert r.output == {"duplicate": False}


def test_image_query_comes_with_a_verified_inclusion_proof(world):
    _, _, ing, _ = world
    tx = image()
    r = ing.submit(tx)
    proof = ing.image(tx.envelope_id)
    assert proof.record["merkle_root"] == tx.merkle_root
    assert proof.record["patient"] == "tok-1"
    assert proof.header.height == r.height and proof.proof.index == r.index
    assert proof.cert.kind == "committed" and len(proof.cert.sigs) == 3
    assert ing.image(os.urandom(16)) is None


def test_tampered_proofs_are_refused(world):
    _, _, ing, _ = world
    tx = image()
    ing.submit(tx)
    answers = ing._run(ing._async._ask("image", {"envelope_id": tx.envelope_id}))
    votes = [[qr.sender, qr.attestation["header_sig"]] for qr in answers]
    good = dict(answers[0].answer, header_sigs=votes)  # as the client assembles a receipt
    keyring = ing.keyring

    def verify(envelope_id, answer):
        tx = TxReceipt.from_wire(answer).verify(keyring)
        if tx["envelope_id"] != envelope_id:
            raise ProofInvalid("proof for another envelope")
    verify(tx.envelope_id, good)
    wrong_leaf = dict(good, request=good["request"] + b"x")
    with pytest.raises(ProofInvalid):
        verify(tx.envelope_id, wrong_leaf)
    proof = InclusionProof.from_wire(good["proof"])
    moved = dict(good, proof=dataclasses.replace(proof, index=proof.index + 1).to_wire())
    with pytest.raises((ProofInvalid, IndexError)):
        verify(tx.envelope_id, moved)
    cert = dict(good["cert"])
    cert["s"] = [[i, bytes(64)] for i, _ in cert["s"]]
    with pytest.raises(CertificateInvalid):
        verify(tx.envelope_id, dict(good, cert=cert))
    with pytest.raises(ProofInvalid):
        verify(os.urandom(16), good)  # a proof for another envelope


def test_duplicate_envelope_returns_the_existing_record(world):
    _, _, ing, _ = world
    tx = image()
    first = ing.submit(tx)
    again = ing.submit(tx)
    assert again.committed and again.output["duplicate"] is True
    assert again.output["record"]["height"] == first.height


def test_consent_access_and_audit_trail(world):
    _, op, ing, _ = world
    tx = image(patient="tok-audit", consent=("diagnosis",))
    ing.submit(tx)
    eid = tx.envelope_id
    granted = op.access("dr-x", eid, "diagnosis", "view")
    assert granted.granted and granted.reason == "granted"
    assert len(granted.result.attestations) >= 2  # f + 1 validators signed the audit entry
    denied = op.access("res-y", eid, "research", "download")
    assert not denied.granted and denied.reason == "no consent for purpose"
    assert op.submit(ConsentSet("tok-audit", "research", True, 1)).committed
    assert op.access("res-y", eid, "research", "download").granted
    from ledger.errors import ReadRefused

    with pytest.raises(ReadRefused, match="role may not read consent history"):
        op.consent("tok-audit")  # the operator files consent; reading a patient's history is not its job
    c = world[0]
    auditor = SigningKey.generate()
    assert op.submit(PrincipalSet("aud-z", "auditor", auditor.public.raw)).committed
    with LedgerClient(c.genesis_path, auditor, "aud-z") as aud:
        consent = aud.consent("tok-audit")
        assert consent["current"]["research"]["granted"] is True and consent["total"] == 1
        trail = aud.audit(patient="tok-audit")
        by_image = aud.audit(image=eid)
    assert [(e["user"], e["action"], e["granted"]) for e in trail] == [
        ("dr-x", "view", True), ("res-y", "download", False), ("res-y", "download", True),
        ("operator", "read-consent", False), ("aud-z", "read-consent", True),
        ("aud-z", "read-audit", True)]  # every read of the token's history is on it, this one last
    assert all(len(e["signatures"]) >= 2 for e in trail)
    from medchain.canonical import canonical_bytes
    from ledger.execution import AUDIT_DOMAIN
    entry = {k: v for k, v in trail[0].items() if k != "signatures"}
    for vid, sig in trail[0]["signatures"].items():
        key = SigningKey.load(c.key_path(f"validator-{vid}")).public
        key.verify_encoded(AUDIT_DOMAIN, canonical_bytes(entry), sig)
    assert [e["id"] for e in by_image[:3]] == [e["id"] for e in trail[:3]]
    assert by_image[-1]["action"] == "read-audit" and by_image[-1]["image"] == eid
    assert len(op.audit(user="res-y")) >= 2  # the operator acts for others: it reads their trails


def test_device_lookup_for_ingest(world):
    _, op, ing, device = world
    d = ing.device("dev-1")
    assert d.enrolled and not d.revoked and d.public_key == device.public.raw
    assert not ing.device("dev-unknown").enrolled
    assert op.submit(DeviceEnrolled("dev-2", SigningKey.generate().public.raw, "s", "g")).committed
    assert op.submit(DeviceRevoked("dev-2", "decommissioned")).committed
    d2 = ing.device("dev-2")
    assert d2.revoked and not d2.enrolled


def test_model_release_and_inference_record(world):
    c, _, ing, _ = world
    with c.client("training") as training:
        h = os.urandom(32)
        r = training.submit(ModelReleased(h, "hybrid", "1.0", {"auc": 0.93}, os.urandom(32)))
        assert r.committed
        assert training.model(h)["metrics"] == {"auc": 0.93}
        assert training.model(os.urandom(32)) is None
    root = os.urandom(32)
    assert ing.submit(InferenceRecorded(root, 64, "dev-1", h)).committed
    assert ing.inference(root)["count"] == 64


def test_rejections_carry_a_reason(world):
    _, _, ing, _ = world
    r = ing.submit(DeviceRevoked("dev-1"))  # ingest may not revoke devices
    assert r.status == "rejected" and "may not submit" in r.reason


def test_bad_input_fails_clearly_before_sending(world):
    _, _, ing, _ = world
    with pytest.raises(TransactionInvalid, match="envelope_id"):
        ing.submit(dataclasses.replace(image(), envelope_id=b"short"))
    with pytest.raises(QueryFailed, match="unknown query"):
        ing.query("everything")
    with pytest.raises(QueryFailed, match="envelope_id"):
        ing.query("image", {"envelope_id": "not bytes"})


def test_unknown_principal_is_not_served(world):
    c = world[0]
    stranger = SigningKey.generate()
    client = LedgerClient(c.genesis, stranger, "stranger", retry_s=0.2, timeout_s=1,
                          connect_s=1)
    with pytest.raises(LedgerUnavailable):
        client.start()
        client.device("dev-1")
    client.close()


def test_garbage_connections_are_closed_and_harm_nothing(world):
    import socket

    c, op, _, _ = world
    v = c.genesis.validators[1]
    for payload in ((2**31).to_bytes(4, "big"),                      # absurd frame size
                    (5).to_bytes(4, "big") + b"\xff" * 5,              # not CBOR
                    (3).to_bytes(4, "big") + b"\x83\x01\x02"):         # CBOR, not a hello
        with socket.create_connection((v.host, v.port), timeout=5) as s:
            s.sendall(payload)
            s.settimeout(5)
            received = b""  # the validator's challenge, then it hangs up
            while chunk := s.recv(4096):
                received += chunk
            assert len(received) < 100
    assert op.device("dev-1").enrolled  # and still answers
    assert c.status(1)["normal"]


def test_batched_image_receipts_match_single_ones_and_are_checked(world):
    """`images(ids)`: the receipts of many images in a few queries (each block's proofs built
    once on the validators), equal to `image(id)` one by one, each verified by the client;
    unknown ids give None; more than one query's worth is split. A receipt of another image,
    or a proof moved to another position, does not pass the client's check."""
    _, _, ing, _ = world
    txs = [image(patient="tok-batch") for _ in range(5)]
    assert all(r.committed for r in ing.submit_many(txs))
    extra = image(patient="tok-batch")
    assert ing.submit(extra).committed
    ids = [t.envelope_id for t in txs] + [os.urandom(16)] * 300 + [extra.envelope_id]
    receipts = ing.images(ids)
    assert len(receipts) == len(ids) and receipts[5:305] == [None] * 300
    for eid, r in zip(ids, receipts):
        if r is not None:
            single = ing.image(eid)
            assert (r.record, r.request, r.header) == (single.record, single.request, single.header)
            assert r.verify(ing.keyring)["envelope_id"] == eid
    a = ing._async
    answers = ing._run(a._ask("images", {"envelope_ids": ids[:2]}))
    headers = dict(answers[0].answer["headers"])
    votes, certs = {}, {}
    for qr in answers:
        for h, sig in qr.attestation["header_sigs"]:
            votes.setdefault(h, {})[qr.sender] = sig
        for h, cert in qr.attestation["certs"]:
            certs.setdefault(h, []).append(cert)
    items = answers[0].answer["items"]
    assert a._receipt(ids[0], items[0], headers, certs, votes).record == receipts[0].record
    with pytest.raises(ProofInvalid):  # image 0's receipt offered for image 1
        a._receipt(ids[1], items[0], headers, certs, votes)
    moved = dict(items[0], proof=items[1]["proof"], result_proof=items[1]["result_proof"])
    with pytest.raises((ProofInvalid, CertificateInvalid)):
        a._receipt(ids[0], moved, headers, certs, votes)
    with pytest.raises(QueryFailed, match="1 to 256"):
        ing.query("images", {"envelope_ids": ids[:257]})
