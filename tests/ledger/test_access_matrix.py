"""The access rule (eq. 8) as a table, on the pure contract: every role × purpose × consent
state (given, revoked, expired, never set, acquisition flag only). Exactly the cells where
the role is in the default policy for the purpose and the consent is valid grant; every
attempt writes exactly one audit entry that says what was decided."""

from __future__ import annotations

import itertools

import pytest

from ledger.contracts import Contracts, TxContext, genesis_state
from ledger.genesis import DEFAULT_POLICIES, make_local_genesis
from ledger.transactions import (
    PURPOSES,
    AccessRequested,
    ConsentSet,
    DeviceEnrolled,
    ImageRegistered,
    PrincipalSet,
)

T0 = 1_700_000_000_000
ROLES = ("clinician", "radiologist", "researcher", "training", "auditor", "operator", "api")
CONSENT = ("given", "revoked", "expired", "never set", "acquisition flag only")
VALID = {"given", "acquisition flag only"}
REASON = {"revoked": "consent revoked", "expired": "consent expired",
          "never set": "no consent for purpose"}


@pytest.fixture(scope="module")
def contracts(tmp_path_factory):
    c = Contracts(genesis_state(make_local_genesis(tmp_path_factory.mktemp("g"), genesis_time_ms=T0)))
    op = TxContext("operator", "operator", T0, 1, 0)
    for i, role in enumerate(ROLES):
        c.apply(op, PrincipalSet(f"u-{role}", role, bytes([i + 1]) * 32))
    c.apply(op, DeviceEnrolled("dev", b"\x09" * 32, "site", "ct"))
    return c


def expected(role: str, purpose: str, consent: str) -> bool:
    return role in DEFAULT_POLICIES["default"][purpose] and consent in VALID


CELLS = list(itertools.product(ROLES, PURPOSES, CONSENT))


def test_the_table_grants_some_cells_and_denies_others():
    granted = [c for c in CELLS if expected(*c)]
    assert 0 < len(granted) < len(CELLS)


@pytest.mark.parametrize("role,purpose,consent", CELLS)
def test_exactly_the_granted_cells_grant(contracts, role, purpose, consent):
    c = contracts
    n = CELLS.index((role, purpose, consent))
    patient, eid, now = f"tok-{n}", n.to_bytes(16, "big"), T0 + 10_000
    ctx = TxContext("operator", "operator", now, 2, 0)
    flags = (purpose,) if consent == "acquisition flag only" else ()
    c.apply(TxContext("ingest", "ingest", now, 2, 0), ImageRegistered(
        eid, b"\x01" * 32, patient, "st", "se", "in", "CT", flags, "default", "dev", n))
    if consent in ("given", "revoked", "expired"):
        c.apply(ctx, ConsentSet(patient, purpose, consent != "revoked", now,
                                now + 1 if consent == "expired" else 0))
    before = c.state.get("audit_n", 0)
    user = f"u-{role}"
    out = c.apply(TxContext(user, role, now + 5, 3, 0), AccessRequested(user, eid, purpose, "request"))
    want = expected(role, purpose, consent)
    assert out["granted"] is want
    if want:
        assert out["reason"] == "granted" and out["merkle_root"] == b"\x01" * 32
    else:
        assert "merkle_root" not in out
        if not c.may_submit(role, "ACCESS_REQUESTED"):  # an auditor may not request at all
            assert out["reason"] == "submitter may not request access"
        elif role not in DEFAULT_POLICIES["default"][purpose]:
            assert out["reason"] == "role not allowed for purpose"
        else:
            assert out["reason"] == REASON[consent]
    assert c.state.get("audit_n") == before + 1  # one entry per attempt
    entry = c.audit("image", eid)["entries"]
    assert len(entry) == 1 and entry[0] == out["audit"]
    assert (entry[0]["user"], entry[0]["patient"], entry[0]["purpose"], entry[0]["granted"]) == (
        user, patient, purpose, want)
