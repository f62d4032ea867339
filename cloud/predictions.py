"""Edge predictions, stored with their image and committed to the ledger in batches.

A device's prediction (class, probabilities, model version and hash) rides in its envelope's
signed header, so it is bound to the image and to the device key. Once ingest has stored and
registered the image, the prediction joins the pending set here; the recorder commits each
device's pending predictions as one ``INFERENCE_RECORDED`` transaction holding the Merkle
root of their canonical records. Any single decision can later be proven
(:class:`PredictionProof`): the record, its inclusion proof under the batch root, and the
ledger's receipt for the batch — checkable with the validators' keys alone.

A crash between the ledger commit and marking the rows leaves them pending; the next batch
commits them again (the newest batch is what the proof names). Nothing is lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, func, select
from sqlalchemy.exc import IntegrityError

from medchain.canonical import canonical_bytes
from ledger.client import LedgerClient
from ledger.errors import LedgerUnavailable
from medchain.errors import EncodingError, ProofInvalid
from medchain.merkle import InclusionProof, MerkleTree, verify_inclusion
from ledger.quorum import Keyring
from ledger.receipts import TxReceipt
from ledger.transactions import InferenceRecorded

from cloud.catalog import Catalog, CatalogEntry, ingested
from cloud.errors import CloudError

__all__ = ["prediction_record", "PredictionProof", "PredictionLog"]

log = logging.getLogger(__name__)

_meta = MetaData()
predictions = Table(
    "predictions", _meta,
    Column("envelope_id", String(32), primary_key=True),
    Column("device_id", String(128), nullable=False),
    Column("model_hash", String(64), nullable=False),
    Column("stored_ms", BigInteger, nullable=False),
    Column("record", Text, nullable=False),  # JSON of the prediction record
    Column("batch_root", String(64), nullable=True),
    Column("batch_index", Integer, nullable=True),
    Column("batch_size", Integer, nullable=True),
    Column("batch_leaves", Text, nullable=True),  # envelope ids of the batch, in leaf order
)


def prediction_record(entry: CatalogEntry) -> dict | None:
    """The record committed for an image's prediction; None when it carries none (or a
    malformed one, which is logged: it stays with the image, uncommitted)."""
    p = entry.meta.get("prediction")
    if not isinstance(p, dict):
        return None
    try:
        record = {"envelope_id": entry.envelope_id, "device_id": entry.device_id,
                  "image_merkle_root": entry.merkle_root, "model_hash": str(p["model_hash"]),
                  "model_version": str(p["model_version"]), "label": int(p["label"]),
                  "class_name": str(p["class_name"]),
                  "probabilities": [float(x) for x in p["probabilities"]]}
        bytes.fromhex(record["model_hash"])
        canonical_bytes(record)
    except (KeyError, TypeError, ValueError, EncodingError) as exc:
        log.warning("envelope %s: malformed prediction ignored (%s)", entry.envelope_id, exc)
        return None
    return record


def _leaf(record: dict) -> bytes:
    return canonical_bytes(record)


@dataclass(frozen=True)
class PredictionProof:
    record: dict
    proof: InclusionProof
    receipt: TxReceipt

    def verify(self, keyring: Keyring) -> dict:
        """The proven record; raises a :class:`VerificationError` naming what fails."""
        tx = self.receipt.verify(keyring)
        if tx.get("type") != "INFERENCE_RECORDED":
            raise ProofInvalid("receipt does not prove an INFERENCE_RECORDED batch")
        verify_inclusion(tx["batch_root"], _leaf(self.record), self.proof)
        return self.record


class PredictionLog:
    """Pending predictions and the batches that committed them (tables beside the catalog)."""

    def __init__(self, catalog: Catalog, ledger: LedgerClient | None = None, *,
                 max_batch: int = 256, interval_s: float = 2.0,
                 clock: Callable[[], float] = time.time):
        self.catalog, self.ledger = catalog, ledger
        self.engine = catalog.engine
        _meta.create_all(self.engine)
        self.max_batch, self.interval_s, self._clock = max_batch, interval_s, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.committed_batches = 0

    # -- collecting -----------------------------------------------------------------------

    def add(self, entry: CatalogEntry) -> bool:
        """Queue an image's prediction (ingest calls this after storing it)."""
        record = prediction_record(entry)
        if record is None:
            return False
        try:
            with self.engine.begin() as conn:
                conn.execute(predictions.insert().values(
                    envelope_id=entry.envelope_id, device_id=entry.device_id,
                    model_hash=record["model_hash"], stored_ms=entry.stored_ms,
                    record=json.dumps(record, sort_keys=True)))
        except IntegrityError:
            return False  # already queued (a resend)
        return True

    def backfill(self) -> int:
        """Queue predictions of images stored while no recorder ran (e.g. a crash)."""
        with self.engine.connect() as conn:
            known = set(conn.execute(select(predictions.c.envelope_id)).scalars())
            rows = conn.execute(select(ingested.c.envelope_id).where(
                ingested.c.meta.like('%"prediction"%'))).scalars().all()
        added = 0
        for eid in rows:
            if eid not in known:
                entry = self.catalog.get(eid)
                added += bool(entry and self.add(entry))
        return added

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(predictions).where(
                predictions.c.batch_root.is_(None))).scalar_one()

    # -- committing -----------------------------------------------------------------------

    def commit_pending(self) -> int:
        """Commit every pending prediction, one batch per device and model; returns how many."""
        if self.ledger is None:
            raise CloudError("prediction log has no ledger client")
        with self.engine.connect() as conn:
            rows = conn.execute(select(predictions).where(predictions.c.batch_root.is_(None))
                                .order_by(predictions.c.stored_ms, predictions.c.envelope_id)).all()
        groups: dict[tuple[str, str], list] = {}
        for r in rows:
            groups.setdefault((r.device_id, r.model_hash), []).append(r)
        done = 0
        for (device_id, model_hash), members in groups.items():
            for start in range(0, len(members), self.max_batch):
                batch = members[start:start + self.max_batch]
                done += self._commit(device_id, model_hash, batch)
        return done

    def _commit(self, device_id: str, model_hash: str, batch: list) -> int:
        records = [json.loads(r.record) for r in batch]
        tree = MerkleTree([_leaf(rec) for rec in records])
        result = self.ledger.submit(InferenceRecorded(tree.root, len(records), device_id,
                                                      bytes.fromhex(model_hash)))
        if not result.committed:
            log.warning("ledger refused INFERENCE_RECORDED for %s: %s (kept pending)",
                        device_id, result.reason)
            return 0
        leaves = json.dumps([r.envelope_id for r in batch])
        with self.engine.begin() as conn:
            for i, r in enumerate(batch):
                conn.execute(predictions.update().where(
                    predictions.c.envelope_id == r.envelope_id).values(
                    batch_root=tree.root.hex(), batch_index=i, batch_size=len(batch),
                    batch_leaves=leaves))
        self.committed_batches += 1
        log.info("INFERENCE_RECORDED: %d predictions of %s at height %d", len(batch), device_id,
                 result.height)
        return len(batch)

    # -- proving --------------------------------------------------------------------------

    def get(self, envelope_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(predictions).where(
                predictions.c.envelope_id == envelope_id)).first()
        return None if row is None else {**json.loads(row.record), "batch_root": row.batch_root}

    def prove(self, envelope_id: str) -> PredictionProof | None:
        """The proof for one image's prediction; None while it is not yet committed."""
        with self.engine.connect() as conn:
            row = conn.execute(select(predictions).where(
                predictions.c.envelope_id == envelope_id)).first()
            if row is None or row.batch_root is None:
                return None
            leaves = json.loads(row.batch_leaves)
            recs = dict(conn.execute(select(predictions.c.envelope_id, predictions.c.record).where(
                predictions.c.envelope_id.in_(leaves))).all())
        tree = MerkleTree([_leaf(json.loads(recs[e])) for e in leaves])
        if tree.root.hex() != row.batch_root:  # a later batch re-committed some of these rows
            raise CloudError(f"prediction {envelope_id}: batch no longer reconstructs; "
                             "re-commit pending predictions")
        receipt = self.ledger.inference_receipt(tree.root) if self.ledger else None
        if receipt is None:
            raise CloudError(f"prediction {envelope_id}: batch {row.batch_root[:12]} not on the ledger")
        return PredictionProof(json.loads(row.record), tree.proof(row.batch_index), receipt)

    # -- background recorder --------------------------------------------------------------

    def start(self) -> None:
        self.backfill()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.commit_pending()
            except LedgerUnavailable as exc:
                log.warning("prediction log: ledger unavailable (%s); retrying", exc)
            except Exception:
                log.exception("prediction log: unexpected error; retrying")
        try:
            self.commit_pending()  # what arrived before stop
        except Exception:
            log.exception("prediction log: final commit failed; rows stay pending")
