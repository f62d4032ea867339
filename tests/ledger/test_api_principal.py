"""The HTTP API's own ledger principal (role ``api``), on the pure contract and the
validators' query core: it files ``ACCESS_REQUESTED`` (action ``request``) on a signer's
behalf, reads the trail of the signers it serves by user and lists studies — and nothing
else.

An attack test: up to commit b569aac the API ran under the operator's key, so whoever
took the API process could register or revoke principals, set consent and policies, enrol
devices and list principals; ``test_the_operator_key_the_api_held_could_do_all_of_it``
shows each of those calls succeeding under the operator role (the power the API held), and
``test_the_api_role_is_refused_everything_but_requests`` the same calls refused to the api
role."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ledger.contracts import Contracts, Rejected, TxContext, genesis_state
from ledger.errors import QueryFailed
from ledger.genesis import DEFAULT_ON_BEHALF, DEFAULT_PERMISSIONS, make_local_genesis
from ledger.queries import answer_query
from ledger.transactions import (
    AccessRequested,
    AuditRead,
    ConsentSet,
    DeviceEnrolled,
    DeviceRevoked,
    ImageRegistered,
    PolicySet,
    PrincipalSet,
)

T0 = 1_700_000_000_000
EID = b"\x05" * 16
PATIENT = "tok-p"


class _Store:
    def attestations(self, ids):
        list(ids)
        return {}


@pytest.fixture
def c(tmp_path):
    genesis = make_local_genesis(tmp_path, genesis_time_ms=T0)
    assert {p.name: p.role for p in genesis.principals}["api"] == "api"  # the local genesis has one
    c = Contracts(genesis_state(genesis))
    op = TxContext("operator", "operator", T0, 1, 0)
    c.apply(op, PrincipalSet("dr", "clinician", b"\x01" * 32))
    c.apply(op, DeviceEnrolled("dev", b"\x09" * 32, "site", "cr"))
    c.apply(TxContext("ingest", "ingest", T0, 2, 0), ImageRegistered(
        EID, b"\x01" * 32, PATIENT, "st", "se", "in", "CR", ("diagnosis",), "default", "dev", 1))
    return c


def ask(c, asker, what, args):
    return answer_query(what, args, SimpleNamespace(ledger=SimpleNamespace(contracts=c)), _Store(), asker)[0]


ADMIN = [
    PrincipalSet("mallory", "auditor", b"\x66" * 32),
    PrincipalSet("dr", "clinician", b"\x01" * 32, False),  # revoke someone
    ConsentSet(PATIENT, "research", True, T0),
    PolicySet("default", {"diagnosis": ("clinician", "radiologist", "researcher")}),
    DeviceEnrolled("rogue", b"\x77" * 32, "site", "cr"),
    DeviceRevoked("dev", "stop the site"),
]


def test_the_genesis_gives_the_api_requests_only():
    assert DEFAULT_PERMISSIONS["api"] == ["ACCESS_REQUESTED"] and "api" in DEFAULT_ON_BEHALF


@pytest.mark.parametrize("tx", ADMIN, ids=lambda tx: tx.TYPE)
def test_the_operator_key_the_api_held_could_do_all_of_it(c, tx):
    c.apply(TxContext("operator", "operator", T0 + 5, 3, 0), tx)  # committed: no Rejected


@pytest.mark.parametrize("tx", ADMIN, ids=lambda tx: tx.TYPE)
def test_the_api_role_is_refused_everything_but_requests(c, tx):
    with pytest.raises(Rejected, match="role 'api' may not submit"):
        c.apply(TxContext("api", "api", T0 + 5, 3, 0), tx)


def test_the_api_files_a_signers_request_and_nothing_else(c):
    api = TxContext("api", "api", T0 + 5, 3, 0)
    out = c.apply(api, AccessRequested("dr", EID, "diagnosis", "request"))
    assert out["granted"] and (out["audit"]["user"], out["audit"]["by"]) == ("dr", "api")
    # a fetch entry is the custodian's (after checking the signer's own signature), not the API's
    out = c.apply(api, AccessRequested("dr", EID, "diagnosis", "fetch"))
    assert not out["granted"] and out["reason"] == "the API files request only"
    # for itself: its role is in no policy
    out = c.apply(api, AccessRequested("api", EID, "diagnosis", "request"))
    assert not out["granted"] and out["reason"] == "role not allowed for purpose"
    # no patient-keyed read, of any kind (refused and audited)
    for query, by in (("consent", "patient"), ("audit", "patient"), ("studies", "patient")):
        assert c.apply(api, AuditRead(query, by, PATIENT))["granted"] is False


def test_the_api_reads_what_serving_a_signer_needs_and_no_more(c):
    dr = c.apply(TxContext("dr", "clinician", T0 + 5, 3, 0), AccessRequested("dr", EID, "diagnosis", "request"))
    assert ask(c, "api", "audit", {"by": "user", "key": "dr"})["entries"] == [dr["audit"]]  # the signer's trail
    assert [s["study"] for s in ask(c, "api", "studies", {})] == ["st"]  # the listing, for the signer
    assert ask(c, "api", "principal", {"name": "dr"})["role"] == "clinician"  # to verify a signature
    for what, args in [("principals", {}), ("audit_entries", {"ids": [dr["audit"]["id"]]}),
                       ("studies", {"patient": PATIENT}), ("consent", {"patient": PATIENT}),
                       ("audit", {"by": "patient", "key": PATIENT})]:
        with pytest.raises(QueryFailed, match="not authorized|granted read"):
            ask(c, "api", what, args)
