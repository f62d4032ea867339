"""Who may read what on the ledger, as a table: every role × query kind on the pure contract
and the validators' query core (:func:`ledger.queries.answer_query`, the function each
validator runs for an authenticated asker). An auditor reads any trail; a principal its own;
a patient token's history (consent, audit by patient or image) only through a granted
``AUDIT_READ``, which is itself on the patient's trail, and only as far as that read saw.
The listings not keyed by a patient (studies, principals) are answered only to the roles
that may list them; the studies listing filtered by a patient token is such a read too.

The listing cells are an attack test: up to commit b569aac any principal (a training
service, an ingest service, a registrar) was answered the studies listing — filtered by a
patient token included, with the purposes consented now — and the list of principals;
those cells failed there."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from ledger.contracts import Contracts, TxContext, genesis_state
from ledger.errors import QueryFailed
from ledger.genesis import make_local_genesis
from ledger.queries import answer_query
from ledger.transactions import (
    AccessRequested,
    AuditRead,
    ConsentSet,
    DeviceEnrolled,
    ImageRegistered,
    PrincipalSet,
)

T0 = 1_700_000_000_000
ROLES = ("clinician", "radiologist", "researcher", "training", "ingest", "custodian", "operator",
         "registrar", "auditor", "api")
EID = b"\x05" * 16
PATIENT = "tok-p"


class _Store:
    def attestations(self, ids):
        list(ids)
        return {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    c = Contracts(genesis_state(make_local_genesis(tmp_path_factory.mktemp("g"), genesis_time_ms=T0)))
    op = TxContext("operator", "operator", T0, 1, 0)
    for i, role in enumerate(ROLES):
        c.apply(op, PrincipalSet(f"u-{role}", role, bytes([i + 1]) * 32))
    c.apply(op, PrincipalSet("dr-other", "clinician", b"\x7f" * 32))
    c.apply(op, DeviceEnrolled("dev", b"\x09" * 32, "site", "ct"))
    c.apply(TxContext("ingest", "ingest", T0, 2, 0), ImageRegistered(
        EID, b"\x01" * 32, PATIENT, "st", "se", "in", "CT", ("diagnosis",), "default", "dev", 1))
    c.apply(op, ConsentSet(PATIENT, "research", True, T0))
    other = c.apply(TxContext("dr-other", "clinician", T0 + 1, 3, 0),
                    AccessRequested("dr-other", EID, "diagnosis", "request"))
    replica = SimpleNamespace(ledger=SimpleNamespace(contracts=c))
    return SimpleNamespace(c=c, replica=replica, other_audit=other["audit"]["id"])


def ask(w, asker: str, what: str, args: dict):
    return answer_query(what, args, w.replica, _Store(), asker)[0]


def read(w, role: str, query: str, by: str, key: str) -> dict:
    return w.c.apply(TxContext(f"u-{role}", role, T0 + 10, 4, 0), AuditRead(query, by, key))


# query kind -> the roles that may (everyone else is refused)
OVERSEERS = {"auditor", "operator", "custodian"}  # auditor + the roles acting on behalf of others
ALLOWED = {
    "own audit trail": set(ROLES),
    "another's audit trail": OVERSEERS | {"api"},  # the API reads the trail of the signer it serves
    "another's audit entry": OVERSEERS,  # by id: not the API
    "consent history": {"registrar", "auditor"},
    "audit trail by patient": {"auditor"},
    "audit trail by image": {"auditor"},
    "studies listing": {"clinician", "radiologist", "researcher", "auditor", "operator", "api"},
    "studies by patient": {"clinician", "radiologist", "researcher", "auditor", "operator"},
    "principal list": {"operator", "auditor"},
}
READS = {"consent history": ("consent", "patient", PATIENT),
         "audit trail by patient": ("audit", "patient", PATIENT),
         "audit trail by image": ("audit", "image", EID.hex()),
         "studies by patient": ("studies", "patient", PATIENT)}
REFUSED = {"consent": "role may not read consent history", "audit": "role may not read audit history",
           "studies": "role may not list studies by patient"}


def attempt(w, role: str, kind: str):
    """Run one cell; the answer, or QueryFailed / a denied read."""
    me = f"u-{role}"
    if kind == "own audit trail":
        return ask(w, me, "audit", {"by": "user", "key": me})
    if kind == "another's audit trail":
        return ask(w, me, "audit", {"by": "user", "key": "dr-other"})
    if kind == "another's audit entry":
        return ask(w, me, "audit_entries", {"ids": [w.other_audit]})
    if kind == "studies listing":
        return ask(w, me, "studies", {})
    if kind == "principal list":
        return ask(w, me, "principals", {})
    query, by, key = READS[kind]
    out = read(w, role, query, by, key)
    entry = out["audit"]
    assert (entry["user"], entry["action"], entry["patient"]) == (me, f"read-{query}", PATIENT)
    assert w.c.state.get(f"audit/{entry['id']}") == entry  # on the trail, granted or not
    if not out["granted"]:
        assert out["reason"] == REFUSED[query]
        return out
    args = {"patient": key} if query in ("consent", "studies") else {"by": by, "key": key}
    return ask(w, me, query, dict(args, read=entry["id"]))


CELLS = list(itertools.product(ROLES, ALLOWED))


def test_the_table_allows_some_cells_and_refuses_others():
    allowed = [cell for cell in CELLS if cell[0] in ALLOWED[cell[1]]]
    assert 0 < len(allowed) < len(CELLS)


@pytest.mark.parametrize("role,kind", CELLS)
def test_exactly_the_allowed_cells_read(world, role, kind):
    if role in ALLOWED[kind]:
        answer = attempt(world, role, kind)
        assert isinstance(answer, list) or (isinstance(answer, dict) and answer.get("granted", True))
    elif kind in READS:
        assert attempt(world, role, kind)["granted"] is False  # refused, and audited
    else:
        with pytest.raises(QueryFailed, match="not authorized"):
            attempt(world, role, kind)


@pytest.mark.parametrize("what,args", [
    ("consent", {"patient": PATIENT}),
    ("audit", {"by": "patient", "key": PATIENT}),
    ("audit", {"by": "image", "key": EID}),
    ("studies", {"patient": PATIENT}),
])
def test_a_patients_history_is_never_answered_without_a_read(world, what, args):
    """Not even to an auditor: the read must be on the trail first."""
    with pytest.raises(QueryFailed, match="granted read of your own"):
        ask(world, "u-auditor", what, args)


def test_a_read_opens_only_its_own_subject_for_its_own_reader(world):
    w = world
    granted = read(w, "auditor", "audit", "patient", PATIENT)["audit"]["id"]
    for asker, what, args in [
        ("u-registrar", "audit", {"by": "patient", "key": PATIENT}),  # someone else's read
        ("u-auditor", "audit", {"by": "patient", "key": "tok-someone-else"}),  # another patient
        ("u-auditor", "audit", {"by": "image", "key": EID}),  # another subject kind
        ("u-auditor", "consent", {"patient": PATIENT}),  # another query
    ]:
        with pytest.raises(QueryFailed, match="not authorized"):
            ask(w, asker, what, dict(args, read=granted))
    denied = read(w, "researcher", "consent", "patient", PATIENT)["audit"]["id"]
    with pytest.raises(QueryFailed, match="not authorized"):  # a denied read opens nothing
        ask(w, "u-researcher", "consent", {"patient": PATIENT, "read": denied})


def test_a_read_sees_the_trail_as_it_stood_with_itself_last(world):
    w = world
    out = read(w, "auditor", "audit", "patient", PATIENT)
    rid = out["audit"]["id"]
    trail = ask(w, "u-auditor", "audit", {"by": "patient", "key": PATIENT, "read": rid})
    assert trail["entries"][-1] == out["audit"] and trail["total"] == out["audit"]["upto"]
    w.c.apply(TxContext("dr-other", "clinician", T0 + 20, 5, 0),
              AccessRequested("dr-other", EID, "diagnosis", "request"))
    again = ask(w, "u-auditor", "audit", {"by": "patient", "key": PATIENT, "read": rid})
    assert again == trail  # what happened after the read needs a read of its own
    fresh = read(w, "auditor", "audit", "patient", PATIENT)["audit"]["id"]
    later = ask(w, "u-auditor", "audit", {"by": "patient", "key": PATIENT, "read": fresh})
    assert later["total"] == trail["total"] + 2  # the new request and the new read


def test_consent_as_of_the_read(world):
    w = world
    rid = read(w, "registrar", "consent", "patient", PATIENT)["audit"]["id"]
    before = ask(w, "u-registrar", "consent", {"patient": PATIENT, "read": rid})
    w.c.apply(TxContext("operator", "operator", T0 + 30, 6, 0), ConsentSet(PATIENT, "research", False, T0))
    assert ask(w, "u-registrar", "consent", {"patient": PATIENT, "read": rid}) == before
    assert before["current"]["research"]["granted"] is True
    now = read(w, "registrar", "consent", "patient", PATIENT)["audit"]["id"]
    after = ask(w, "u-registrar", "consent", {"patient": PATIENT, "read": now})
    assert after["current"]["research"]["granted"] is False and after["total"] == before["total"] + 1


def test_a_revoked_reader_loses_its_reads(world):
    w = world
    rid = read(w, "auditor", "audit", "image", EID.hex())["audit"]["id"]
    assert ask(w, "u-auditor", "audit", {"by": "image", "key": EID, "read": rid})["entries"]
    op = TxContext("operator", "operator", T0 + 40, 7, 0)
    w.c.apply(op, PrincipalSet("u-auditor", "clinician", bytes([ROLES.index("auditor") + 1]) * 32))
    try:
        with pytest.raises(QueryFailed, match="may not read"):
            ask(w, "u-auditor", "audit", {"by": "image", "key": EID, "read": rid})
    finally:
        w.c.apply(op, PrincipalSet("u-auditor", "auditor", bytes([ROLES.index("auditor") + 1]) * 32))


def test_a_consent_read_is_keyed_by_patient_only(world):
    from ledger.contracts import Rejected

    with pytest.raises(Rejected, match="read by patient"):
        read(world, "registrar", "consent", "image", EID.hex())


def test_a_validator_that_has_not_executed_the_read_says_retry_not_refused(world):
    """A validator behind the others (the read not yet executed there) must not out-vote
    them with a refusal: its answer starts with RETRY, which the client does not count."""
    from ledger.errors import RETRY

    ahead = world.c.state.get("audit_n")
    with pytest.raises(QueryFailed) as exc:
        ask(world, "u-auditor", "audit", {"by": "patient", "key": PATIENT, "read": ahead})
    assert str(exc.value).startswith(RETRY)
    with pytest.raises(QueryFailed) as exc:  # an existing entry that is no read: refused outright
        ask(world, "u-auditor", "audit", {"by": "patient", "key": PATIENT, "read": world.other_audit})
    assert "not authorized" in str(exc.value) and not str(exc.value).startswith(RETRY)


def test_a_studies_listing_by_patient_shows_what_was_there_at_the_read(world):
    """The read opens the listing as of its own block: an image registered and a consent
    changed after it are not in what it shows; a fresh read (itself on the trail) shows them."""
    w = world
    out = read(w, "clinician", "studies", "patient", PATIENT)
    rid = out["audit"]["id"]
    assert out["granted"] and out["audit"]["patient"] == PATIENT and out["audit"]["action"] == "read-studies"
    before = ask(w, "u-clinician", "studies", {"patient": PATIENT, "read": rid})
    assert [s["series"] for s in before] == [{"se": [EID.hex()]}] and "research" in before[0]["consented"]
    w.c.apply(TxContext("ingest", "ingest", T0 + 50, 8, 0), ImageRegistered(
        b"\x06" * 16, b"\x02" * 32, PATIENT, "st", "se", "in2", "CT", ("diagnosis",), "default", "dev", 2))
    w.c.apply(TxContext("operator", "operator", T0 + 50, 8, 1), ConsentSet(PATIENT, "research", False, T0))
    assert ask(w, "u-clinician", "studies", {"patient": PATIENT, "read": rid}) == before
    fresh = w.c.apply(TxContext("u-clinician", "clinician", T0 + 60, 9, 0),
                      AuditRead("studies", "patient", PATIENT))["audit"]["id"]
    [now] = ask(w, "u-clinician", "studies", {"patient": PATIENT, "read": fresh})
    assert now["series"] == {"se": sorted([EID.hex(), "06" * 16])} and "research" not in now["consented"]
    with pytest.raises(QueryFailed, match="not authorized"):  # nor is the read anyone else's
        ask(w, "u-radiologist", "studies", {"patient": PATIENT, "read": fresh})
    with pytest.raises(QueryFailed, match="not authorized"):  # nor for another patient
        ask(w, "u-clinician", "studies", {"patient": "tok-someone-else", "read": fresh})
