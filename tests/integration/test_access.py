"""Access for people through a real 4-validator ledger and the custodian server on its Unix
socket: a principal requests (the ledger decides per image and audits), the custodian
re-wraps granted images' data keys to the principal's X25519 key only after checking the
committed grant, and the requester decrypts locally and writes DICOM. Then the attacks:
none yields plaintext, and each attempt that reaches the ledger is audited there."""

from __future__ import annotations

import os
import time

import pydicom
import pytest

from cloud.access import Requester, latest_grants
from cloud.access_protocol import FetchReply, FetchRequest
from cloud.custodian_access import NO_GRANT
from cloud.custodian_service import ask_custodian
from cloud.errors import AccessRefused
from ledger.errors import QueryFailed
from ledger.transactions import AccessRequested, ConsentSet, PrincipalSet
from medchain.identity import RecipientKey, SigningKey
from medchain.protocol import Envelope

pytestmark = pytest.mark.slow

def audit_of(world, person) -> list[dict]:
    with world.cluster.client("operator") as op:  # read back as an auditor would
        return op.audit(user=person.name)


def assert_signed(entries: list[dict], world) -> None:
    """Every entry carries at least f + 1 validators' signatures, each valid under its
    validator's key over the entry's canonical CBOR."""
    from ledger.execution import AUDIT_DOMAIN
    from medchain.canonical import canonical_bytes

    for e in entries:
        assert len(e["signatures"]) >= world.cluster.genesis.f + 1, e
        body = canonical_bytes({k: v for k, v in e.items() if k != "signatures"})
        for vid, sig in e["signatures"].items():
            key = SigningKey.load(world.cluster.key_path(f"validator-{vid}")).public
            key.verify_encoded(AUDIT_DOMAIN, body, sig)


def test_request_grant_fetch_writes_the_dicom_and_a_denial_returns_only_the_reason(world, person, tmp_path):
    dr = person("clinician")
    a, _, data = world.image(consent=("diagnosis",))
    b, _, _ = world.image(consent=("research",))
    decisions = dr.requester.request([a, b], "diagnosis")
    assert [(d.envelope_id, d.granted, d.reason) for d in decisions] == [
        (a, True, "granted"), (b, False, "no consent for purpose")]
    grants = latest_grants(dr.requester.status(), "diagnosis")
    assert grants == [(a, decisions[0].audit_id)]  # the denied image has no grant to fetch
    fetched = dr.requester.fetch(grants, "diagnosis", tmp_path / "out")
    assert [f.refused for f in fetched] == [None]
    path = fetched[0].path
    assert path == tmp_path / "out" / f"{a}.dcm" and path.read_bytes() == data
    assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert list((tmp_path / "out").iterdir()) == [path]
    entries = audit_of(world, dr)
    assert [(e["image"].hex(), e["action"], e["granted"], e["reason"]) for e in entries] == [
        (a, "request", True, "granted"), (b, "request", False, "no consent for purpose"),
        (a, "fetch", True, "granted")]
    assert all(e["user"] == dr.name and e["by"] in (dr.name, "custodian") for e in entries)
    assert_signed(entries, world)


def test_a_fetch_signed_by_another_principals_key_is_refused(world, person, tmp_path):
    alice, mallory = person("clinician"), person("clinician")
    a, _, _ = world.image()
    [d] = alice.requester.request([a], "diagnosis")
    before = world.server.counts["fetches refused"]
    forged = FetchRequest.new(alice.name, "diagnosis", [(a, d.audit_id)], now_ms=int(time.time() * 1000))
    reply = FetchReply.decode(ask_custodian(world.server.config.socket, forged.signed(mallory.key)))
    assert reply.items == () and "signature does not verify" in reply.error
    assert world.server.counts["fetches refused"] == before + 1
    # and through mallory's own requester, naming alice: the same refusal, no file
    imposter = Requester(mallory.requester.gateway, alice.name, mallory.key, mallory.recipient)
    with pytest.raises(AccessRefused, match="signature"):
        imposter.fetch([(a, d.audit_id)], "diagnosis", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # nothing attributable to alice happened after her request: no fetch on her trail
    assert [e["action"] for e in audit_of(world, alice)] == ["request"]


def test_a_replayed_fetch_and_a_replayed_ledger_request_give_nothing_new(world, person):
    dr = person("radiologist")
    a, _, _ = world.image()
    # the ledger request replayed: the same frame decides once, audited once
    rid, frame = dr.ledger.prepare(AccessRequested(dr.name, bytes.fromhex(a), "diagnosis", "request"))
    first, again = dr.ledger.submit_frame(rid, frame), dr.ledger.submit_frame(rid, frame)
    assert first.output["audit"]["id"] == again.output["audit"]["id"]
    assert len(audit_of(world, dr)) == 1
    # the fetch replayed: the custodian answers once
    request = FetchRequest.new(dr.name, "diagnosis", [(a, first.output["audit"]["id"])],
                               now_ms=int(time.time() * 1000))
    data = request.signed(dr.key)
    ok = FetchReply.decode(ask_custodian(world.server.config.socket, data))
    assert ok.error is None and ok.items[0].wrapped_key is not None
    replayed = FetchReply.decode(ask_custodian(world.server.config.socket, data))
    assert replayed.items == () and "replayed" in replayed.error
    assert [e["action"] for e in audit_of(world, dr)] == ["request", "fetch"]


def test_a_revoked_principal_gets_no_key_and_the_attempt_is_audited(world, person, tmp_path):
    dr = person("clinician")
    a, _, _ = world.image()
    grants = [(a, dr.requester.request([a], "diagnosis")[0].audit_id)]
    r = world.operator.submit(PrincipalSet(dr.name, dr.role, dr.key.public.raw, False, dr.recipient.public.raw))
    assert r.committed, r.reason
    [f] = dr.requester.fetch(grants, "diagnosis", tmp_path / "out")
    assert f.path is None and f.refused == "unknown or inactive user"
    assert not (tmp_path / "out").exists()
    fetch = audit_of(world, dr)[-1]
    assert (fetch["action"], fetch["granted"], fetch["reason"], fetch["by"]) == (
        "fetch", False, "unknown or inactive user", "custodian")
    assert_signed([fetch], world)


def test_consent_revoked_between_request_and_fetch(world, person, tmp_path):
    dr = person("clinician")
    a, patient, _ = world.image(consent=("diagnosis",))
    grants = [(a, dr.requester.request([a], "diagnosis")[0].audit_id)]
    r = world.operator.submit(ConsentSet(patient, "diagnosis", False, int(time.time() * 1000)))
    assert r.committed, r.reason
    [f] = dr.requester.fetch(grants, "diagnosis", tmp_path / "out")
    assert f.path is None and f.refused == "consent revoked"
    assert not (tmp_path / "out").exists()
    entries = audit_of(world, dr)
    assert [(e["action"], e["granted"], e["reason"]) for e in entries] == [
        ("request", True, "granted"), ("fetch", False, "consent revoked")]
    assert_signed(entries, world)
    auditor = person("auditor")  # also on the patient's trail (the auditor's read of it last)
    assert [e["action"] for e in auditor.ledger.audit(patient=patient)] == ["request", "fetch", "read-audit"]


def test_a_grant_for_image_a_does_not_fetch_image_b(world, person, tmp_path):
    dr = person("clinician")
    a, _, _ = world.image()
    b, _, _ = world.image()  # the clinician could be granted b too, but never asked
    [d] = dr.requester.request([a], "diagnosis")
    [f] = dr.requester.fetch([(b, d.audit_id)], "diagnosis", tmp_path / "out")
    assert f.path is None and f.refused == NO_GRANT
    # nor a grant for another purpose, nor someone else's grant id
    other = person("clinician")
    [d2] = other.requester.request([b], "diagnosis")
    [f2] = dr.requester.fetch([(b, d2.audit_id)], "diagnosis", tmp_path / "out")
    assert f2.refused == NO_GRANT
    assert not (tmp_path / "out").exists()
    fetches = [e for e in audit_of(world, dr) if e["action"] == "fetch"]
    assert [e["image"].hex() for e in fetches] == [b, b]  # the attempts are on the trail
    assert_signed(fetches, world)


class TamperingStore:
    """The requester's view of the store with one byte of one chunk flipped in transit."""

    def __init__(self, store):
        self.store = store

    def get(self, envelope_id: str) -> Envelope:
        env = self.store.get(envelope_id)
        body = bytearray(env.bodies[0])
        body[len(body) // 2] ^= 0x01
        return Envelope(env.header, env.signature, (bytes(body),) + tuple(env.bodies[1:]))


def test_tampered_ciphertext_is_refused_in_transit_and_in_the_store(world, person, tmp_path):
    dr = person("clinician", store=TamperingStore(world.store))
    a, _, _ = world.image()
    grants = [(a, dr.requester.request([a], "diagnosis")[0].audit_id)]
    [f] = dr.requester.fetch(grants, "diagnosis", tmp_path / "out")
    assert f.path is None and f.refused.startswith("failed verification")
    assert not (tmp_path / "out").exists()
    # tampered at rest: the custodian itself refuses to re-wrap the key
    b, _, _ = world.image()
    path = world.store.root / "envelopes" / f"{b}.cbor"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01
    path.write_bytes(bytes(raw))
    honest = person("clinician")
    grants = [(b, honest.requester.request([b], "diagnosis")[0].audit_id)]
    [g] = honest.requester.fetch(grants, "diagnosis", tmp_path / "out2")
    assert g.path is None and g.refused in ("stored object failed verification", "stored object not readable")
    assert not (tmp_path / "out2").exists()
    assert [e["action"] for e in audit_of(world, honest)] == ["request", "fetch"]


def test_a_principal_without_a_recipient_key_is_refused_whole(world, person, tmp_path):
    dr = person("clinician", recipient=False)
    a, _, _ = world.image()
    grants = [(a, dr.requester.request([a], "diagnosis")[0].audit_id)]
    with pytest.raises(AccessRefused, match="no recipient key"):
        dr.requester.fetch(grants, "diagnosis", tmp_path / "out")


def test_the_cli_registers_a_principal_requests_fetches_and_revokes(world, tmp_path, capsys):
    import json

    from medchain_app.cli import main

    cluster = world.cluster
    (tmp_path / "cloud.toml").write_text(
        f'[broker]\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\ningest_key = "{cluster.key_path("ingest")}"\n'
        f'operator_key = "{cluster.key_path("operator")}"\n\n[store]\nurl = "{world.store.root}"\n\n'
        f'[database]\nurl = "sqlite:///unused.sqlite"\n\n[keys]\ncustodian = "c.pub"\nmodel = "m.key"\n')
    name = f"rad-{os.urandom(3).hex()}"
    key, rk = SigningKey.generate(), RecipientKey.generate()
    key.save(tmp_path / "me.key")
    rk.save(tmp_path / "me.x25519")

    def run(*argv) -> tuple[int, list[dict]]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        captured = capsys.readouterr()
        run.err = captured.err
        return rc, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]

    cloud = ("--config", tmp_path / "cloud.toml")
    rc, out = run("principal", "add", *cloud, "--name", name, "--role", "radiologist",
                  "--public-key", key.public.hex(), "--recipient-key", rk.public.hex())
    assert rc == 0 and out[0]["committed"]
    rc, out = run("principal", "list", *cloud)
    assert {"name": name, "role": "radiologist", "active": True, "public_key": key.public.hex(),
            "recipient_key": rk.public.hex()} in out
    (tmp_path / "access.toml").write_text(
        f'[principal]\nname = "{name}"\nkey = "me.key"\nrecipient = "me.x25519"\n\n'
        f'[ledger]\ngenesis = "{cluster.genesis_path}"\n\n[custodian]\nsocket = "{world.server.config.socket}"\n\n'
        f'[store]\nurl = "{world.store.root}"\n')
    me = ("--config", tmp_path / "access.toml")
    a, _, data = world.image(consent=("diagnosis",))
    b, _, _ = world.image(consent=())
    rc, out = run("access", "request", *me, "--image", a, b, "--purpose", "diagnosis")
    assert rc == 3 and [(o["image"], o["granted"], o["reason"]) for o in out] == [
        (a, True, "granted"), (b, False, "no consent for purpose")]
    rc, out = run("access", "fetch", *me, "--out", tmp_path / "out", "--purpose", "diagnosis")
    assert rc == 0 and [(o["image"], o["fetched"]) for o in out] == [(a, True)]
    assert (tmp_path / "out" / f"{a}.dcm").read_bytes() == data
    rc, out = run("access", "status", *me)
    assert [(o["image"], o["action"], o["granted"]) for o in out] == [
        (a, "request", True), (b, "request", False), (a, "fetch", True)]
    assert all(o["validators"] >= cluster.genesis.f + 1 for o in out)
    rc, out = run("principal", "revoke", *cloud, "--name", name)
    assert rc == 0 and out[0]["active"] is False
    # revoked: the validators no longer admit its connection, so nothing reaches the custodian
    # (the custodian's own refusal of a revoked principal is test_a_revoked_principal_...);
    # once every validator has executed the revocation, the CLI says so, not "unreachable"
    executed(world)
    rc, out = run("access", "fetch", *me, "--out", tmp_path / "out2", "--purpose", "diagnosis", "--image", a)
    assert rc == 2 and out == [] and run.err.startswith("medchain access fetch: error:")
    assert f"the validators refuse principal '{name}'" in run.err and "revoked" in run.err, run.err
    assert "reachable" not in run.err and "Traceback" not in run.err
    assert not (tmp_path / "out2").exists()


def executed(world, timeout_s: float = 20.0) -> None:
    """Wait until every validator has executed what any of them has (a committed change is
    then in force everywhere, not only at the f + 1 that replied)."""
    cluster = world.cluster
    ids = range(cluster.genesis.n)
    height = max(cluster.status(i)["executed"] for i in ids)
    deadline = time.monotonic() + timeout_s
    while min(cluster.status(i)["executed"] for i in ids) < height:
        assert time.monotonic() < deadline, "a validator did not catch up"
        time.sleep(0.05)


def test_a_revoked_principals_client_is_told_it_is_revoked(world, person):
    """Each validator that recognises a revoked principal's key says so, signed — on its
    open connection (to a query or a request) and on a new one (to its Hello) — and the
    client, with f + 1 such refusals, raises PrincipalRefused. Before, a new connection
    failed with "fewer than 3 validators reachable" after the connect timeout, and a query
    or request over an old one timed out."""
    from ledger.client import LedgerClient
    from ledger.errors import PrincipalRefused

    dr, dr2 = person("clinician"), person("clinician")
    a, _, _ = world.image()
    for p in (dr, dr2):
        assert p.ledger.principal(p.name)["active"]  # both connected before the revocation
        r = world.operator.submit(PrincipalSet(p.name, p.role, p.key.public.raw, False, p.recipient.public.raw))
        assert r.committed, r.reason
    executed(world)
    started = time.monotonic()
    with pytest.raises(PrincipalRefused, match="not active on the ledger"):
        dr.ledger.audit(user=dr.name)  # a query over the connection opened before
    with pytest.raises(PrincipalRefused, match="not active on the ledger"):  # a request over one
        dr2.ledger.submit(AccessRequested(dr2.name, bytes.fromhex(a), "diagnosis", "request"))
    with pytest.raises(PrincipalRefused, match="not active on the ledger"):
        with LedgerClient(world.cluster.genesis_path, dr.key, dr.name) as again:  # a new one
            again.principal(dr.name)
    assert time.monotonic() - started < 8  # told, not timed out
    # someone holding another key, claiming the name, learns nothing: the old message
    from medchain.identity import SigningKey
    from ledger.errors import LedgerUnavailable

    with pytest.raises(LedgerUnavailable) as exc:
        with LedgerClient(world.cluster.genesis_path, SigningKey.generate(), dr.name, connect_s=2) as other:
            other.principal(dr.name)
    assert not isinstance(exc.value, PrincipalRefused)


def test_through_the_custodian_as_its_own_os_process(world, person, tmp_path):
    """`medchain cloud custodian --config custodian.toml` as an operator runs it: a granted
    image is fetched through it, a grant for another image opens nothing, and a forged fetch
    is refused; its exit line counts them."""
    import json
    import subprocess
    import sys
    from functools import partial

    from cloud.access import LedgerGateway

    cluster = world.cluster
    key = RecipientKey.load(world.server.config.key)  # the same custodian key, in its own process
    key.save(tmp_path / "custodian.key")
    (tmp_path / "custodian.toml").write_text(
        f'[custodian]\nsocket = "{tmp_path / "c.sock"}"\nkey = "custodian.key"\n\n'
        f'[ledger]\ngenesis = "{cluster.genesis_path}"\nkey = "{cluster.key_path("custodian")}"\n\n'
        f'[store]\nurl = "{world.store.root}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "medchain_app.cli", "cloud", "custodian", "--config",
                             str(tmp_path / "custodian.toml")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline()]
        while "custodian ready" not in lines[-1]:
            assert lines[-1], "".join(lines)  # the process ended before it was ready
            lines.append(proc.stdout.readline())
        dr, mallory = person("clinician"), person("clinician")
        a, _, data = world.image()
        b, _, _ = world.image()
        ask = partial(ask_custodian, tmp_path / "c.sock")
        me = Requester(LedgerGateway(dr.ledger, ask, world.store), dr.name, dr.key, dr.recipient)
        [grant] = [(a, d.audit_id) for d in me.request([a], "diagnosis")]
        [fa] = me.fetch([grant], "diagnosis", tmp_path / "out")
        assert fa.path.read_bytes() == data
        [fb] = me.fetch([(b, grant[1])], "diagnosis", tmp_path / "out")
        assert fb.path is None and fb.refused == NO_GRANT
        forged = FetchRequest.new(dr.name, "diagnosis", [grant], now_ms=int(time.time() * 1000))
        assert "signature" in FetchReply.decode(ask(forged.signed(mallory.key))).error
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=20)[0]
    counts = json.loads(rest.split("custodian stopped: ", 1)[1].splitlines()[0])
    assert counts["keys re-wrapped"] == 1 and counts["keys refused"] == 1 and counts["fetches refused"] == 1
    assert sorted(os.listdir(tmp_path / "out")) == [f"{a}.dcm"]


def test_consent_set_revoke_history_from_the_cli_decide_the_next_request(world, person, tmp_path, capsys):
    import json

    from medchain_app.cli import main

    cluster = world.cluster
    (tmp_path / "cloud.toml").write_text(
        f'[broker]\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\ningest_key = "{cluster.key_path("ingest")}"\n'
        f'operator_key = "{cluster.key_path("operator")}"\n\n[store]\nurl = "{world.store.root}"\n\n'
        f'[database]\nurl = "sqlite:///unused.sqlite"\n\n[keys]\ncustodian = "c.pub"\nmodel = "m.key"\n')

    def consent(*argv) -> tuple[int, list[dict]]:
        capsys.readouterr()
        rc = main(["consent", *argv, "--config", str(tmp_path / "cloud.toml")])
        captured = capsys.readouterr()
        consent.err = captured.err
        return rc, [json.loads(line) for line in captured.out.splitlines()]

    dr = person("clinician")
    registrar = person("registrar")
    registrar.key.save(tmp_path / "registrar.key")
    me = ("--name", registrar.name, "--key", str(tmp_path / "registrar.key"))
    a, patient, _ = world.image(consent=("diagnosis",))  # the acquisition flag grants at first
    assert dr.requester.request([a], "diagnosis")[0].granted
    rc, [out] = consent("revoke", "--patient", patient, "--purpose", "diagnosis")  # the operator's key
    assert rc == 0 and out["committed"] and out["granted"] is False
    assert dr.requester.request([a], "diagnosis")[0].reason == "consent revoked"
    rc, [out] = consent("set", "--patient", patient, "--purpose", "diagnosis", "--days", "1", *me)
    assert rc == 0 and out["committed"] and out["expires_ms"] > time.time() * 1000
    assert dr.requester.request([a], "diagnosis")[0].granted
    rc, out = consent("history", "--patient", patient, *me)  # the registrar's key
    assert rc == 0 and [(h["purpose"], h["granted"], h["by"]) for h in out] == [
        ("diagnosis", False, "operator"), ("diagnosis", True, registrar.name)]
    rc, out = consent("history", "--patient", patient)  # the operator's: refused, and audited
    assert rc == 2 and out == [] and "role may not read consent history" in consent.err
    trail = person("auditor").ledger.audit(patient=patient)
    assert [(e["user"], e["action"], e["granted"]) for e in trail if e["action"].startswith("read")] == [
        (registrar.name, "read-consent", True), ("operator", "read-consent", False),
        (trail[-1]["user"], "read-audit", True)]


def test_a_study_is_listed_by_metadata_and_requested_whole(world, person, tmp_path, capsys):
    import json

    from medchain_app.cli import main

    dr = person("radiologist")
    study = f"1.2.826.0.1.{os.urandom(3).hex()}"
    a, patient, _ = world.image(consent=("diagnosis", "research"), study=study, series="s1", study_date="20190312")
    b, _, _ = world.image(consent=("diagnosis", "research"), patient=patient, study=study, series="s2",
                          study_date="20190311")  # (shifted) dates as the edge sealed them: the study's earliest
    [listed] = dr.requester.gateway.studies(study=study)
    assert listed == {"patient": patient, "study": study, "modalities": ["CR"], "registered_t": listed["registered_t"],
                      "study_date": "20190311",
                      "policies": ["default"], "consented": ["diagnosis", "research"],
                      "series": {"s1": [a], "s2": [b]}}
    decisions = dr.requester.request_study(study, "diagnosis")
    assert sorted((d.envelope_id, d.granted) for d in decisions) == sorted([(a, True), (b, True)])
    assert dr.requester.request_study("no-such-study", "diagnosis") == []
    assert [s["series"] for s in dr.requester.gateway.studies(series="s2")
            if s["study"] == study] == [{"s2": [b]}]  # a series alone
    # `medchain cloud studies` prints the same record; metadata only (no key, no pixels)
    cluster = world.cluster
    (tmp_path / "cloud.toml").write_text(
        f'[broker]\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\ningest_key = "{cluster.key_path("ingest")}"\n'
        f'operator_key = "{cluster.key_path("operator")}"\n\n[store]\nurl = "{world.store.root}"\n\n'
        f'[database]\nurl = "sqlite:///unused.sqlite"\n\n[keys]\ncustodian = "c.pub"\nmodel = "m.key"\n')
    capsys.readouterr()
    assert main(["cloud", "studies", "--config", str(tmp_path / "cloud.toml"), "--study", study]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == listed



def test_a_direct_read_of_the_store_opens_nothing(world, person):
    """Whoever reads the object store — a principal with its own keys included — holds
    ciphertext sealed for the custodian's key only."""
    from medchain.errors import DecryptionError
    from medchain.identity import VerifyKey
    from medchain.sealing import open_envelope, unwrap_key_for_principal

    dr = person("clinician")
    a, _, _ = world.image()
    envelope = world.store.get(a)
    device = VerifyKey(world.operator.device("dev-access").public_key)
    with pytest.raises(DecryptionError):
        open_envelope(envelope, dr.recipient, device)
    with pytest.raises(DecryptionError):  # nor is the stored wrapped key one for the principal
        unwrap_key_for_principal(envelope.header.wrapped_key, envelope.header.object_id, dr.name, dr.recipient)


def test_an_operator_gets_no_key_without_a_grant_of_its_own(world, person, tmp_path):
    """An operator (it may file requests on others' behalf) fetching for itself: a grant id of
    someone else's opens nothing, and the ledger's fresh decision denies its role; audited."""
    dr, op = person("clinician"), person("operator")
    a, _, _ = world.image()
    [d] = dr.requester.request([a], "diagnosis")
    [f] = op.requester.fetch([(a, d.audit_id)], "diagnosis", tmp_path / "out")
    assert f.path is None and f.refused == NO_GRANT
    # nor does a request the operator files for itself grant: its role is in no policy
    [own] = op.requester.request([a], "diagnosis")
    assert not own.granted and own.reason == "role not allowed for purpose"
    [g] = op.requester.fetch([(a, own.audit_id)], "diagnosis", tmp_path / "out")
    assert g.path is None and g.refused == NO_GRANT
    assert not (tmp_path / "out").exists()
    assert [(e["action"], e["granted"]) for e in audit_of(world, op)] == [
        ("fetch", False), ("request", False), ("fetch", False)]


def test_a_researcher_reads_neither_anothers_trail_nor_a_patients_history(world, person):
    """The attack: a researcher (any principal) asks the validators directly for another
    principal's audit trail and entries, a patient's consent history and the patient's and
    an image's trails. Before queries were authorized by role (up to commit 9910fcc) every
    one of these was answered — this test failed there on its first query — and nothing of
    it was audited."""
    alice, eve = person("clinician"), person("researcher")
    a, patient, _ = world.image(consent=("diagnosis",))
    [d] = alice.requester.request([a], "diagnosis")
    assert world.operator.submit(ConsentSet(patient, "research", False, int(time.time() * 1000))).committed
    for what, args in [("audit", {"by": "user", "key": alice.name}),
                       ("audit_entries", {"ids": [d.audit_id]}),
                       ("consent", {"patient": patient}),
                       ("audit", {"by": "patient", "key": patient}),
                       ("audit", {"by": "image", "key": bytes.fromhex(a)})]:
        with pytest.raises(QueryFailed, match="not authorized"):
            eve.ledger.query(what, args)
    # through the front door, AUDIT_READ: refused by role, and the attempt is on the trail
    from ledger.errors import ReadRefused

    with pytest.raises(ReadRefused, match="role may not read consent history"):
        eve.ledger.consent(patient)
    with pytest.raises(ReadRefused, match="role may not read audit history"):
        eve.ledger.audit(image=bytes.fromhex(a))
    tried = [(e["action"], e["granted"], e["patient"]) for e in eve.ledger.audit(user=eve.name)]
    assert tried == [("read-consent", False, patient), ("read-audit", False, patient)]


def test_a_registrars_read_of_a_consent_history_is_on_the_patients_trail(world, person):
    """Nobody reads a patient token's history unaudited: the registrar's consent read and the
    auditor's trail read are entries of the patient's trail, signed by f + 1 validators, and
    a read sees the trail only as it stood when it was filed."""
    registrar, auditor, dr = person("registrar"), person("auditor"), person("clinician")
    a, patient, _ = world.image(consent=("diagnosis",))
    dr.requester.request([a], "diagnosis")
    assert registrar.ledger.submit(ConsentSet(patient, "research", True, int(time.time() * 1000))).committed
    consent = registrar.ledger.consent(patient)
    assert consent["current"]["research"]["granted"] and consent["total"] == 1
    trail = auditor.ledger.audit(patient=patient)
    assert [(e["user"], e["action"], e["granted"]) for e in trail] == [
        (dr.name, "request", True), (registrar.name, "read-consent", True), (auditor.name, "read-audit", True)]
    assert trail[1]["id"] == consent["read"] and trail[1]["patient"] == patient
    assert_signed(trail, world)
    dr.requester.request([a], "diagnosis")  # after the read: not in it
    again = auditor.ledger.audit(patient=patient, read=trail[-1]["id"])
    assert [e["id"] for e in again] == [e["id"] for e in trail]
    with pytest.raises(QueryFailed, match="not authorized"):  # nor is the read anyone else's
        registrar.ledger.audit(patient=patient, read=trail[-1]["id"])


def test_a_series_is_requested_from_the_cli_and_fetched(world, person, tmp_path, capsys):
    """`medchain access request --series UID`: every image of that series, and none of the
    study's other series, decided one by one; the grants fetch and decrypt."""
    import json

    from medchain_app.cli import main

    dr = person("radiologist")
    dr.key.save(tmp_path / "me.key")
    dr.recipient.save(tmp_path / "me.x25519")
    (tmp_path / "access.toml").write_text(
        f'[principal]\nname = "{dr.name}"\nkey = "me.key"\nrecipient = "me.x25519"\n\n'
        f'[ledger]\ngenesis = "{world.cluster.genesis_path}"\n\n[custodian]\nsocket = "{world.server.config.socket}"\n\n'
        f'[store]\nurl = "{world.store.root}"\n')
    study, series = f"1.2.826.0.4.{os.urandom(3).hex()}", f"1.2.826.0.5.{os.urandom(3).hex()}"
    a, patient, da = world.image(consent=("diagnosis",), study=study, series=series)
    b, _, db = world.image(consent=(), patient=patient, study=study, series=series)
    c, _, _ = world.image(consent=("diagnosis",), patient=patient, study=study, series=series + ".2")
    me = ("--config", str(tmp_path / "access.toml"))
    capsys.readouterr()
    rc = main(["access", "request", *me, "--series", series, "--purpose", "diagnosis"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 3 and sorted((o["image"], o["granted"], o["reason"]) for o in out) == sorted([
        (a, True, "granted"), (b, False, "no consent for purpose")])
    rc = main(["access", "fetch", *me, "--out", str(tmp_path / "out"), "--purpose", "diagnosis"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [(o["image"], o["fetched"]) for o in out] == [(a, True)]
    assert (tmp_path / "out" / f"{a}.dcm").read_bytes() == da
    assert not (tmp_path / "out" / f"{c}.dcm").exists()


def test_an_auditor_reads_trails_from_the_cli_and_a_researcher_is_refused(world, person, tmp_path, capsys):
    """`medchain access audit`: an auditor reads a principal's, a patient's and an image's
    trail (the patient-keyed reads filed first, each the last entry of what it shows); a
    researcher reads its own trail only, and its refused read is on it."""
    import json

    from medchain_app.cli import main

    def config(p) -> str:
        path = tmp_path / f"{p.name}.toml"
        if path.exists():
            return str(path)
        p.key.save(tmp_path / f"{p.name}.key")
        p.recipient.save(tmp_path / f"{p.name}.x25519")
        path.write_text(
            f'[principal]\nname = "{p.name}"\nkey = "{p.name}.key"\nrecipient = "{p.name}.x25519"\n\n'
            f'[ledger]\ngenesis = "{world.cluster.genesis_path}"\n\n[custodian]\nsocket = "{world.server.config.socket}"\n\n'
            f'[store]\nurl = "{world.store.root}"\n')
        return str(path)

    def audit(p, *argv) -> tuple[int, list[tuple], str]:
        capsys.readouterr()
        rc = main(["access", "audit", "--config", config(p), *argv])
        captured = capsys.readouterr()
        return rc, [(o["user"], o["action"], o["granted"]) for o in map(json.loads, captured.out.splitlines())], \
            captured.err

    auditor, eve, dr = person("auditor"), person("researcher"), person("clinician")
    a, patient, _ = world.image()
    dr.requester.request([a], "diagnosis")
    assert audit(auditor, "--user", dr.name)[:2] == (0, [(dr.name, "request", True)])
    assert audit(auditor, "--patient", patient)[:2] == (0, [
        (dr.name, "request", True), (auditor.name, "read-audit", True)])
    assert audit(auditor, "--image", a)[:2] == (0, [  # the read by patient named no image
        (dr.name, "request", True), (auditor.name, "read-audit", True)])
    assert audit(auditor, "--patient", patient)[1][-2:] == [  # a read by image is on the patient's trail too
        (auditor.name, "read-audit", True), (auditor.name, "read-audit", True)]
    rc, out, err = audit(eve, "--patient", patient)
    assert rc == 2 and out == [] and "role may not read audit history" in err and "Traceback" not in err
    rc, out, err = audit(eve, "--user", dr.name)
    assert rc == 2 and out == [] and "not authorized" in err
    assert audit(eve, "--user", eve.name)[:2] == (0, [(eve.name, "read-audit", False)])


def test_listings_are_authorized_by_role_and_a_listing_by_patient_is_on_the_trail(world, person, tmp_path,
                                                                                   capsys):
    """The attack: a training service (any principal) asks the validators directly for the
    studies listing, the listing filtered by a patient token (which says what that patient
    has and consented to now) and the list of principals. Up to commit b569aac each was
    answered (this test failed there on its first query); now each validator refuses by
    role, and a listing by patient token is answered only through a granted read — on the
    patient's trail, the refused attempt included."""
    import json

    from ledger.errors import ReadRefused
    from medchain_app.cli import main

    eve, dr, auditor = person("training"), person("clinician"), person("auditor")
    a, patient, _ = world.image(consent=("diagnosis",))
    for what, args in [("studies", {}), ("studies", {"patient": patient}), ("principals", {})]:
        with pytest.raises(QueryFailed, match="not authorized"):
            eve.ledger.query(what, args)
    with pytest.raises(ReadRefused, match="role may not list studies by patient"):
        eve.ledger.studies(patient=patient)
    with pytest.raises(QueryFailed, match="not authorized"):  # a clinician lists studies, not principals
        dr.ledger.principals()
    with pytest.raises(QueryFailed, match="granted read of your own"):  # not by patient without a read
        dr.ledger.query("studies", {"patient": patient})
    [listed] = dr.ledger.studies(patient=patient)
    assert (listed["patient"], listed["series"], listed["consented"]) == (patient, {"se": [a]}, ["diagnosis"])
    assert any(p["name"] == dr.name for p in auditor.ledger.principals())
    # `medchain cloud studies --patient` under the clinician's own key: the read is filed first
    cluster = world.cluster
    (tmp_path / "cloud.toml").write_text(
        f'[broker]\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\ningest_key = "{cluster.key_path("ingest")}"\n'
        f'operator_key = "{cluster.key_path("operator")}"\n\n[store]\nurl = "{world.store.root}"\n\n'
        f'[database]\nurl = "sqlite:///unused.sqlite"\n\n[keys]\ncustodian = "c.pub"\nmodel = "m.key"\n')
    dr.key.save(tmp_path / "dr.key")
    capsys.readouterr()
    assert main(["cloud", "studies", "--config", str(tmp_path / "cloud.toml"), "--patient", patient,
                 "--name", dr.name, "--key", str(tmp_path / "dr.key")]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [listed]
    trail = auditor.ledger.audit(patient=patient)
    assert [(e["user"], e["action"], e["granted"]) for e in trail] == [
        (eve.name, "read-studies", False), (dr.name, "read-studies", True), (dr.name, "read-studies", True),
        (auditor.name, "read-audit", True)]
    assert_signed(trail, world)
