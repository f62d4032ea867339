"""Contracts through the Ledger application: devices, images (idempotent), consent, RBAC
access decisions with an audit entry for every attempt, models, principals; determinism."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medchain.canonical import decode
from ledger.execution import Ledger
from ledger.genesis import make_local_genesis
from medchain.identity import SigningKey
from ledger.messages import Request, sign_frame
from ledger.transactions import (
    AccessRequested,
    ConsentSet,
    DeviceEnrolled,
    DeviceRevoked,
    ImageRegistered,
    InferenceRecorded,
    ModelReleased,
    PolicySet,
    PrincipalSet,
)

T0 = 1_700_000_000_000


class Chain:
    """A Ledger driven block by block, with the principals of a local genesis."""

    def __init__(self, tmp_path):
        self.genesis = make_local_genesis(tmp_path, genesis_time_ms=T0)
        self.keys = {p.name: SigningKey.load(tmp_path / "keys" / f"{p.name}.key")
                     for p in self.genesis.principals}
        self.ledger = Ledger(self.genesis, attest=lambda b: b"sig:" + b[:8])
        self.now = T0
        self.rid = 0

    def add_principal(self, name, role):
        key = SigningKey.generate()
        self.keys[name] = key
        assert self.run(("operator", PrincipalSet(name, role, key.public.raw)))[0][0]["status"] \
            == "committed"
        return key

    def frame(self, who, tx, rid=None, ts=None):
        self.rid += 1
        return sign_frame(Request(who, rid or self.rid, ts or self.now, tx.to_wire()),
                          self.keys[who])[1]

    def run(self, *items):
        """Execute one block of ``(principal, tx)`` items; return the results."""
        self.now += 1000
        frames = [self.frame(who, tx) if not isinstance(tx, bytes) else tx for who, tx in items]
        for f in frames:
            self.ledger.admit(f)
        ex = self.ledger.execute(self.ledger.height + 1, self.now, frames)
        return [r for _, _, r in decode(ex.results)], ex


@pytest.fixture
def chain(tmp_path):
    return Chain(tmp_path)


def enrolled(chain, device="dev-1"):
    key = SigningKey.generate()
    [r], _ = chain.run(("operator", DeviceEnrolled(device, key.public.raw, "site-a", "ct")))
    assert r["status"] == "committed"
    return key


def image(eid=None, patient="tok-1", consent=("diagnosis",), seq=1, device="dev-1",
          policy="default"):
    return ImageRegistered(eid or os.urandom(16), os.urandom(32), patient, "st", "se", "in",
                           "CT", consent, policy, device, seq)


def test_device_enrolment_lookup_and_revocation(chain):
    key = enrolled(chain)
    d = chain.ledger.contracts.device("dev-1")
    assert d["status"] == "enrolled" and d["public_key"] == key.public.raw
    [again], _ = chain.run(("operator", DeviceEnrolled("dev-1", key.public.raw, "site-a", "ct")))
    assert again["output"]["duplicate"] is True
    [other], _ = chain.run(("operator", DeviceEnrolled("dev-1", os.urandom(32), "s", "g")))
    assert other["status"] == "rejected" and "another key" in other["reason"]
    [rev], _ = chain.run(("operator", DeviceRevoked("dev-1", "lost")))
    assert rev["status"] == "committed"
    assert chain.ledger.contracts.device("dev-1")["status"] == "revoked"
    [img], _ = chain.run(("ingest", image()))
    assert img["status"] == "rejected" and img["reason"] == "device revoked"
    [back], _ = chain.run(("operator", DeviceEnrolled("dev-1", key.public.raw, "s", "g")))
    assert back["status"] == "rejected" and "revoked" in back["reason"]


def test_only_permitted_roles_submit(chain):
    [r], _ = chain.run(("ingest", DeviceEnrolled("dev-x", os.urandom(32), "s", "g")))
    assert r["status"] == "rejected" and "may not submit DEVICE_ENROLLED" in r["reason"]
    assert chain.ledger.contracts.device("dev-x") is None


def test_image_registration_is_idempotent_by_envelope_id(chain):
    enrolled(chain)
    tx = image(seq=5)
    [first], _ = chain.run(("ingest", tx))
    [second], _ = chain.run(("ingest", tx))  # a redelivered envelope, a new request id
    assert first["status"] == second["status"] == "committed"
    assert second["output"]["duplicate"] is True
    record = second["output"]["record"]
    assert record["height"] == first["height"] and record["index"] == first["index"]
    assert record["merkle_root"] == tx.merkle_root
    [reused], _ = chain.run(("ingest", image(seq=5)))  # another envelope, same sequence
    assert reused["status"] == "rejected" and "sequence" in reused["reason"]
    [unenrolled], _ = chain.run(("ingest", image(device="dev-nope", seq=6)))
    assert unenrolled["reason"] == "device not enrolled"
    [nopolicy], _ = chain.run(("ingest", image(policy="missing", seq=7)))
    assert nopolicy["reason"] == "unknown policy"


def test_access_rule_role_and_consent_with_an_audit_entry_per_attempt(chain):
    enrolled(chain)
    chain.add_principal("dr-x", "clinician")
    chain.add_principal("res-y", "researcher")
    tx = image(patient="tok-7", consent=("diagnosis",))
    chain.run(("ingest", tx))
    eid = tx.envelope_id

    def ask(user, purpose, by=None):
        [r], _ = chain.run((by or user, AccessRequested(user, eid, purpose, "view")))
        assert r["status"] == "committed"
        return r["output"]

    assert ask("dr-x", "diagnosis")["granted"] is True            # role ok, consent flag
    assert ask("dr-x", "research")["reason"] == "role not allowed for purpose"
    assert ask("res-y", "research")["reason"] == "no consent for purpose"
    chain.run(("operator", ConsentSet("tok-7", "research", True, T0)))
    assert ask("res-y", "research")["granted"] is True            # consent granted later
    chain.run(("operator", ConsentSet("tok-7", "diagnosis", False, T0)))
    assert ask("dr-x", "diagnosis")["reason"] == "consent revoked"  # revocation wins
    chain.run(("operator", ConsentSet("tok-7", "diagnosis", True, T0, chain.now + 3500)))
    assert ask("dr-x", "diagnosis")["granted"] is True
    chain.now += 5000
    assert ask("dr-x", "diagnosis")["reason"] == "consent expired"
    chain.run(("operator", PolicySet("default", {"diagnosis": ["clinician"],
                                                 "research": ["clinician"]})))
    assert ask("dr-x", "research")["granted"] is True             # policy changed
    assert ask("ghost", "diagnosis", by="operator")["reason"] == "unknown or inactive user"
    assert ask("dr-x", "diagnosis", by="custodian")["reason"] == "consent expired"
    # a clinician cannot ask on someone else's behalf; the attempt is still audited
    assert ask("res-y", "research", by="dr-x")["reason"].startswith("submitter may not")
    [unknown], _ = chain.run(("dr-x", AccessRequested("dr-x", os.urandom(16), "diagnosis", "v")))
    assert unknown["output"]["reason"] == "unknown image"

    c = chain.ledger.contracts
    by_user = c.audit("user", "dr-x")["entries"]
    assert [e["granted"] for e in by_user] == \
        [True, False, False, True, False, True, False, False]
    assert all(e["action"] in ("view", "v") and e["t"] > T0 for e in by_user)
    by_image = c.audit("image", eid)["entries"]
    assert len(by_image) == 11  # every attempt naming the image, even refused ones
    assert len(c.audit("patient", "tok-7")["entries"]) == 11
    assert [e["id"] for e in by_image] == sorted(e["id"] for e in by_image)


def test_audit_entries_are_signed_by_the_executing_validator(chain):
    enrolled(chain)
    chain.add_principal("dr-x", "clinician")
    tx = image()
    chain.run(("ingest", tx))
    [r], ex = chain.run(("dr-x", AccessRequested("dr-x", tx.envelope_id, "diagnosis", "view")))
    assert ex.attestations and ex.attestations[0][0] == r["output"]["audit"]["id"]


def test_consent_history_is_kept_in_order(chain):
    for granted in (True, False, True):
        chain.run(("registrar" if "registrar" in chain.keys else "operator",
                   ConsentSet("tok-h", "training", granted, T0)))
    view = chain.ledger.contracts.consent("tok-h")
    assert [h["granted"] for h in view["history"]] == [True, False, True]
    assert view["current"]["training"]["granted"] is True and view["total"] == 3


def test_models_and_inference_records(chain):
    enrolled(chain)
    h = os.urandom(32)
    [r], _ = chain.run(("training", ModelReleased(h, "hybrid", "1", {"auc": 0.9}, os.urandom(32))))
    assert r["status"] == "committed" and chain.ledger.contracts.model(h)["name"] == "hybrid"
    [dup], _ = chain.run(("training", ModelReleased(h, "hybrid", "2", {}, os.urandom(32))))
    assert dup["reason"] == "model already released"
    root = os.urandom(32)
    [inf], _ = chain.run(("ingest", InferenceRecorded(root, 12, "dev-1", h)))
    assert inf["status"] == "committed" and chain.ledger.contracts.inference(root)["count"] == 12
    [bad], _ = chain.run(("ingest", InferenceRecorded(os.urandom(32), 1, "dev-1", os.urandom(32))))
    assert bad["reason"] == "unknown model"


def test_principals_rekey_and_deactivate(chain):
    key = chain.add_principal("svc", "ingest")
    new = SigningKey.generate()
    [r], _ = chain.run(("operator", PrincipalSet("svc", "ingest", new.public.raw)))
    assert r["status"] == "committed"
    stale = sign_frame(Request("svc", 99, chain.now, DeviceRevoked("x").to_wire()), key)[1]
    assert chain.ledger.admit(stale) == "bad_signature"  # the old key no longer speaks
    [taken], _ = chain.run(("operator", PrincipalSet("other", "ingest", new.public.raw)))
    assert "already belongs" in taken["reason"]
    [selfish], _ = chain.run(("operator", PrincipalSet("operator", "operator",
                                                         chain.keys["operator"].public.raw,
                                                         False)))
    assert "cannot deactivate" in selfish["reason"]


def test_rejected_transactions_leave_no_partial_state(chain):
    enrolled(chain)
    before = dict(chain.ledger.state.items())
    [r], _ = chain.run(("ingest", image(device="dev-missing")))
    assert r["status"] == "rejected"
    after = dict(chain.ledger.state.items())
    assert {k: v for k, v in after.items() if k != "meta/time"} == \
        {k: v for k, v in before.items() if k != "meta/time"}


tx_strategy = st.sampled_from(["consent", "policy", "device", "revoke", "access"])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(tx_strategy, st.integers(0, 3), st.booleans()), max_size=25),
       st.integers(1, 5))
def test_execution_is_deterministic(tmp_path_factory, ops, per_block):
    """Two validators applying the same committed log reach the same roots and results."""
    tmp = tmp_path_factory.mktemp("det")
    chain = Chain(tmp)
    other = Ledger(chain.genesis)
    frames = []
    for kind, k, flag in ops:
        tx = {"consent": ("operator", ConsentSet(f"t{k}", "research", flag, k)),
              "policy": ("operator", PolicySet("default", {"research": ["researcher"] * flag})),
              "device": ("operator", DeviceEnrolled(f"d{k}", bytes([k]) * 32, "s", "g")),
              "revoke": ("operator", DeviceRevoked(f"d{k}")),
              "access": ("custodian",
                         AccessRequested("operator", bytes(16), "research", "v"))}[kind]
        frames.append(chain.frame(*tx))
    for i in range(0, len(frames), per_block):
        block = frames[i:i + per_block]
        t = T0 + i
        a = chain.ledger.execute(chain.ledger.height + 1, t, block)
        b = other.execute(other.height + 1, t, block)
        assert a.header == b.header and a.results == b.results and a.writes == b.writes
