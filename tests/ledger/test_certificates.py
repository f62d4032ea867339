"""Certificates, view-change proofs and the new-view plan, and execution-level rules
(deduplication window, re-keyed principals, batches that arrive by state transfer)."""

import random

import pytest

from ledger.blocks import batch_digest, tx_root
from ledger.errors import CertificateInvalid
from ledger.execution import Ledger
from ledger.genesis import Params
from medchain.merkle import EMPTY_ROOT
from ledger.messages import (
    Certificate,
    Checkpoint,
    Commit,
    Prepare,
    PrePrepare,
    Request,
    ViewChange,
    sign_frame,
)
from ledger.quorum import Keyring, Signer, check_certificate, check_checkpoint_proof
from ledger.simulation import sim_genesis
from ledger.transactions import ConsentSet
from ledger.viewchange import check_view_change, null_digest, plan_new_view

GENESIS, VKEYS, CLIENT = sim_genesis(random.Random(3))
RING = Keyring(GENESIS.validator_keys())
SIGNERS = [Signer(i, k) for i, k in enumerate(VKEYS)]
K, L = GENESIS.params.checkpoint_interval, GENESIS.params.window


def prepared(view, seq, requests=(b"r1",), t=5, prepares=None, bad=()):
    d = batch_digest(seq, t, tx_root(requests))
    primary = RING.primary(view)
    if prepares is None:
        prepares = [i for i in range(RING.n) if i != primary][:2]
    pp, _ = SIGNERS[primary].sign(PrePrepare(view, seq, t, d, primary))
    sigs = []
    for i in prepares:
        p, _ = SIGNERS[i].sign(Prepare(view, seq, d, i))
        sigs.append((i, bytes(64) if i in bad else p.sig))
    return Certificate("prepared", view, seq, t, d, tuple(sigs), pp.sig, tuple(requests))


def committed(view, seq, requests=(b"r1",), t=5, who=(0, 1, 2)):
    d = batch_digest(seq, t, tx_root(requests))
    sigs = tuple((i, SIGNERS[i].sign(Commit(view, seq, d, i))[0].sig) for i in who)
    return Certificate("committed", view, seq, t, d, sigs, None, tuple(requests))


def checkpoint_proof(seq, digest, who=(0, 1, 2)):
    return tuple((i, SIGNERS[i].sign(Checkpoint(seq, digest, i))[0].sig) for i in who)


def vc(view, sender, certs=(), stable=0, digest=None):
    digest = digest or b"\x00" * 32
    proof = checkpoint_proof(stable, digest) if stable else ()
    return ViewChange(view, sender, stable, digest, proof, tuple(certs))


def test_certificates_need_a_quorum_of_distinct_valid_signatures():
    check_certificate(prepared(0, 1), RING)
    check_certificate(committed(0, 1), RING)
    with pytest.raises(CertificateInvalid, match="valid prepares"):
        check_certificate(prepared(0, 1, prepares=(1, 1)), RING)        # same backup twice
    with pytest.raises(CertificateInvalid, match="valid prepares"):
        check_certificate(prepared(0, 1, prepares=(0, 1)), RING)        # primary's "prepare"
    with pytest.raises(CertificateInvalid, match="valid prepares"):
        check_certificate(prepared(0, 1, bad=(2,)), RING)               # one forged
    with pytest.raises(CertificateInvalid, match="valid votes"):
        check_certificate(committed(0, 1, who=(0, 1)), RING)            # 2f, not 2f + 1
    cert = prepared(0, 1)
    wrong_batch = Certificate(cert.kind, cert.view, cert.seq, cert.t, cert.digest, cert.sigs,
                              cert.primary_sig, (b"other",))
    with pytest.raises(CertificateInvalid, match="batch does not match"):
        check_certificate(wrong_batch, RING)
    check_checkpoint_proof(8, b"d" * 32, checkpoint_proof(8, b"d" * 32), RING)
    with pytest.raises(CertificateInvalid):
        check_checkpoint_proof(8, b"e" * 32, checkpoint_proof(8, b"d" * 32), RING)


def test_new_view_plan_keeps_the_strongest_certificate_and_fills_gaps_with_null():
    genesis_digest = b"\x00" * 32
    a = vc(3, 0, [prepared(0, 1, (b"x",)), prepared(1, 3, (b"old",))])
    b = vc(3, 1, [prepared(2, 3, (b"new",)), committed(0, 2, (b"y",))])
    c = vc(3, 2, [])
    for v in (a, b, c):
        check_view_change(v, RING, genesis_digest=genesis_digest, checkpoint_interval=K, window=L)
    plan = plan_new_view([a, b, c])
    assert plan.min_s == 0 and plan.max_s == 3
    assert [(e.seq, e.requests) for e in plan.entries] == \
        [(1, (b"x",)), (2, (b"y",)), (3, (b"new",))]  # view 2 beats view 1 at seq 3
    only = plan_new_view([vc(3, 0, [prepared(0, 2)]), c, vc(3, 1)])
    assert only.entries[0].digest == null_digest(1) and only.entries[0].requests == ()
    assert null_digest(1) == batch_digest(1, 0, EMPTY_ROOT)


def test_new_view_plan_starts_at_the_highest_stable_checkpoint():
    d = b"\x07" * 32
    high = vc(2, 1, [prepared(1, 9)], stable=8, digest=d)
    low = vc(2, 0, [prepared(1, 5), prepared(1, 9)])
    plan = plan_new_view([low, high, vc(2, 2)])
    assert plan.min_s == 8 and plan.stable_digest == d and [e.seq for e in plan.entries] == [9]


@pytest.mark.parametrize("bad", [
    lambda: vc(1, 0, [prepared(0, 1), prepared(0, 1)]),                 # seq twice
    lambda: vc(1, 0, [prepared(1, 1)]),                                 # not from an earlier view
    lambda: vc(1, 0, [prepared(0, L + 1)]),                             # outside the window
    lambda: vc(1, 0, [prepared(0, 1, bad=(1,))]),                       # forged prepare
    lambda: ViewChange(1, 0, 8, b"d" * 32, checkpoint_proof(8, b"d" * 32, (0, 1)), ()),
    lambda: ViewChange(1, 0, 3, b"d" * 32, checkpoint_proof(3, b"d" * 32), ()),  # not a K multiple
    lambda: ViewChange(1, 0, 0, b"x" * 32, (), ()),                     # wrong genesis
])
def test_invalid_view_changes_are_refused(bad):
    with pytest.raises(CertificateInvalid):
        check_view_change(bad(), RING, genesis_digest=b"\x00" * 32, checkpoint_interval=K,
                          window=L)


# -- execution rules ------------------------------------------------------------------------


def frame(rid, ts, key=CLIENT, who="registrar"):
    return sign_frame(Request(who, rid, ts, ConsentSet("p", "research", True, 1).to_wire()),
                      key)[1]


def test_deduplication_window_expires_with_block_time():
    g = GENESIS
    ledger = Ledger(g)
    age = g.params.request_max_age_ms
    ex = ledger.execute(1, 1000, [frame(1, 1000)])
    assert ledger.result_for("registrar", 1) is not None
    ledger.execute(2, 1000 + 2 * age + 10, [])  # far later: the entry is forgotten ...
    assert ledger.result_for("registrar", 1) is None
    ex = ledger.execute(3, 1000 + 2 * age + 20, [frame(1, 1000)])
    from medchain.canonical import decode
    [(_, _, result)] = decode(ex.results)
    assert result["status"] == "rejected" and "stale" in result["reason"]  # ... but can't replay


def test_batches_from_state_transfer_are_checked_at_execution():
    ledger = Ledger(GENESIS)
    outsider = Signer(9, VKEYS[0]).key
    forged = frame(5, 1000, key=outsider)  # right name, wrong key
    ex = ledger.execute(1, 1000, [forged, b"\x00garbage"])
    from medchain.canonical import decode
    results = [r for _, _, r in decode(ex.results)]
    assert [r["reason"] for r in results] == ["bad_signature", "malformed"]
    assert ledger.result_for("registrar", 5) is None  # an unverified request is never cached


def test_sim_params_are_valid():
    assert isinstance(GENESIS.params, Params)


def test_a_request_executed_before_its_own_copy_arrives_is_not_verified_again(monkeypatch):
    """Under load a backup executes a request from the primary's batch before the client's own
    copy leaves its admission queue; admitting that copy must not check the signature again
    (the replica answers it from the stored result). Anything not executed here is checked."""
    ledger = Ledger(GENESIS)
    f = frame(7, 1000)
    ledger.execute(1, 1000, [f])
    checks = []
    verify = Ledger._verify
    monkeypatch.setattr(Ledger, "_verify", lambda self, *a, **k: checks.append(1) or verify(self, *a, **k))
    adm = ledger.admit(f)
    assert not isinstance(adm, str) and adm.request.rid == 7 and checks == []
    assert ledger.result_for("registrar", 7)["status"] == "committed"  # answered from the result
    forged = frame(8, 1000, key=Signer(9, VKEYS[0]).key)
    assert ledger.admit(forged) == "bad_signature" and checks == [1]  # anything new is checked
