"""Receipts prove the outcome, not only the inclusion: attacks on a real 4-process cluster.

A transaction the contracts rejected is still ordered, committed and stored in its block, so
its request frame, inclusion proof and commit certificate are all genuine. A receipt must
nevertheless not pass for success: it has to carry the transaction's result and a Merkle
proof of it under the header's results root, and the header must be vouched for by f + 1
validators.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from edge_agent.rollout import ReleaseRefused, ReleaseTrust, check_ledger_record
from ledger.blocks import outcome, results_tree
from ledger.cluster import LocalCluster
from ledger.errors import CertificateInvalid
from ledger.genesis import Params
from ledger.messages import request_digest
from ledger.quorum import Keyring, Signer
from ledger.receipts import TxReceipt
from ledger.store import BlockStore
from ledger.transactions import ModelReleased
from medchain.errors import ProofInvalid
from medchain.identity import SigningKey

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(4, tmp_path_factory.mktemp("receipts"),
                     params=Params(checkpoint_interval=8, window=32, status_ms=200))
    c.start()
    yield c
    c.close()


def release(model_hash: bytes | None = None) -> ModelReleased:
    return ModelReleased(model_hash or os.urandom(32), "hybrid", "1", {"auc": 0.9},
                         os.urandom(32))


def trust(cluster) -> ReleaseTrust:
    return ReleaseTrust(SigningKey.generate().public, Keyring(cluster.genesis.validator_keys()))


def stored(cluster, height: int):
    """``(block, results)`` at ``height`` from the first validator store that holds it (the
    client's f + 1 replies may come before a given validator has persisted the block)."""
    deadline = time.monotonic() + 30
    while True:
        for i in range(cluster.n):
            store = BlockStore(cluster.workdir / "data" / f"validator-{i}.sqlite")
            try:
                block, results = store.block(height), store.results(height)
            finally:
                store.close()
            if block is not None and block.cert is not None:
                return block, results
        assert time.monotonic() < deadline, f"no validator stored block {height}"
        time.sleep(0.1)


def stored_block(cluster, height: int):
    return stored(cluster, height)[0]


def header_votes(cluster, block, ids=(0, 1)) -> list:
    """f + 1 genuine validator signatures on a genuine header (honest validators give them for
    any block they executed, e.g. in answer to a query for another record of that block)."""
    return [(i, Signer(i, SigningKey.load(cluster.key_path(f"validator-{i}")))
             .sign_header(block.header.height, block.header.hash)) for i in ids]


def forged_receipt(cluster, submitted, tx: ModelReleased, **changes) -> dict:
    """The receipt an attacker assembles for a rejected transaction from genuine parts: the
    stored block's request frame, its inclusion proof, header and commit certificate, the
    stored result with its proof, header signatures, and a record of his own making."""
    block, results = stored(cluster, submitted.height)
    tree = results_tree([request_digest(r) for r in block.requests], results)
    record = dict(tx.to_wire(), height=submitted.height, index=submitted.index, t=block.header.t,
                  by="ingest")
    del record["type"]
    receipt = TxReceipt(record, block.header, block.requests[submitted.index],
                        block.proof(submitted.index), block.cert, outcome(results[submitted.index]),
                        tree.proof(submitted.index), tuple(header_votes(cluster, block)))
    return dataclasses.replace(receipt, **changes).to_wire()


def rejected_release(cluster) -> tuple[ModelReleased, object]:
    tx = release()
    with cluster.client("ingest") as ing:
        result = ing.submit(tx)
    assert result.status == "rejected" and "may not submit" in result.reason
    return tx, result


def test_a_rejected_release_yields_no_receipt_of_success(cluster):
    """``MODEL_RELEASED`` signed by ``ingest`` (a principal without the role) is rejected by
    the contract, yet committed in its block. Against the code before this change, the
    receipt assembled from that block verified (``TxReceipt.verify`` ignored the result) and
    the edge's ledger check accepted it: the model would have been installed. Now every part
    is genuine and the receipt still fails, because the result it proves is a rejection."""
    tx, result = rejected_release(cluster)
    forged = forged_receipt(cluster, result, tx)
    keyring = Keyring(cluster.genesis.validator_keys())
    with pytest.raises(ProofInvalid, match="did not succeed"):
        TxReceipt.from_wire(forged).verify(keyring)
    with pytest.raises(ReleaseRefused, match="did not succeed"):
        check_ledger_record(forged, tx.model_hash, trust(cluster))


def test_a_rejected_result_cannot_be_passed_off_as_success(cluster):
    """Claiming success for the rejected transaction: the result no longer matches the
    results root; a header with a results root of the attacker's making is not vouched for
    by f + 1 validators; a genuine header with votes from fewer than f + 1 neither."""
    tx, result = rejected_release(cluster)
    keyring = Keyring(cluster.genesis.validator_keys())
    success = {"status": "committed", "reason": "", "output": {"model": {}}}
    forged = forged_receipt(cluster, result, tx, result=success)
    with pytest.raises(ProofInvalid, match="expected root"):
        TxReceipt.from_wire(forged).verify(keyring)
    block = stored_block(cluster, result.height)
    tree = results_tree([request_digest(r) for r in block.requests],
                        [success] * len(block.requests))
    header = dataclasses.replace(block.header, results_root=tree.root)
    forged = forged_receipt(cluster, result, tx, result=success, header=header,
                            result_proof=tree.proof(result.index))
    with pytest.raises(CertificateInvalid, match="signatures"):
        TxReceipt.from_wire(forged).verify(keyring)
    for votes in ((), header_votes(cluster, block, ids=(2,)),
                  header_votes(cluster, block, ids=(2, 2))):
        forged = forged_receipt(cluster, result, tx, header_sigs=tuple(votes))
        with pytest.raises(CertificateInvalid, match="signatures"):
            TxReceipt.from_wire(forged).verify(keyring)


def test_a_successful_release_comes_with_a_receipt_that_proves_it(cluster):
    """The honest path: the training principal's release, queried with its receipt, verifies
    here and at the edge, and proves the committed result."""
    tx = release()
    with cluster.client("training") as training:
        assert training.submit(tx).committed
        receipt = training.model_receipt(tx.model_hash)
    assert receipt.result["status"] == "committed" and len(receipt.header_sigs) >= 2
    assert receipt.result["output"]["model"]["model_hash"] == tx.model_hash
    wire = TxReceipt.from_wire(receipt.to_wire()).to_wire()
    check_ledger_record(wire, tx.model_hash, trust(cluster))
