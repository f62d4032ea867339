"""The block store: one SQLite database per validator.

It holds the blocks (header, the signed request frames, the commit certificate, the agreed
block time and the per-transaction results), the current state (key -> canonical CBOR), the
validator's votes and prepared certificates (so a restarted validator never votes twice
differently in one view and still proves what it prepared in a view change), its view, its
stable checkpoint proof and its own signatures on audit entries.

:meth:`BlockStore.persist` writes one :class:`ledger.ready.Ready` in one transaction, which
with ``synchronous=FULL`` in WAL mode is one fsync per batch of work (never one per
transaction). :meth:`BlockStore.restore` reads it all back into a
:class:`ledger.execution.Ledger` and a :class:`ledger.ready.Restored`. ``path=":memory:"``
gives the same store without a disk, which the randomized simulation uses to crash and
restart replicas through exactly this code.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from ledger.blocks import Block, BlockHeader, genesis_header
from medchain.canonical import canonical_bytes, decode
from ledger.contracts import genesis_state
from ledger.errors import BlockStoreError, StoreDamaged
from medchain.errors import MedChainError
from ledger.execution import Ledger
from ledger.messages import Certificate
from ledger.ready import BlockReader, Ready, Restored
from ledger.state import State

__all__ = ["BlockStore"]

_SCHEMA = """
create table if not exists meta (k text primary key, v blob not null);
create table if not exists blocks (
    height integer primary key, hash blob not null, header blob not null,
    requests blob not null, cert blob, time integer not null, results blob not null);
create table if not exists state (k text primary key, v blob not null);
create table if not exists votes (view integer, seq integer, digest blob not null,
    primary key (view, seq));
create table if not exists prepared (seq integer primary key, cert blob not null);
create table if not exists attestations (audit_id integer primary key, sig blob not null);
"""


class BlockStore(BlockReader):
    def __init__(self, path: str | os.PathLike, *, durable: bool = True):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if self.path != ":memory:":
                self.db.execute("pragma journal_mode=wal")
            self.db.execute(f"pragma synchronous={'full' if durable else 'off'}")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreDamaged(f"{self.path}: not a usable block store ({exc})") from None

    def quick_check(self) -> str | None:
        """Why SQLite finds the file damaged (its ``quick_check``: every page and b-tree
        readable and well formed), or None when it reads back whole."""
        try:
            rows = self.db.execute("pragma quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        problems = [str(r[0]) for r in rows if r and r[0] != "ok"]
        return "; ".join(problems[:3]) or None

    def close(self) -> None:
        self.db.close()

    def _meta(self, key: str):
        row = self.db.execute("select v from meta where k = ?", (key,)).fetchone()
        return decode(row[0]) if row else None

    # -- writing -------------------------------------------------------------------------------

    def _initialize(self, genesis, validator: int) -> None:
        state = genesis_state(genesis)
        header = genesis_header(genesis.chain_id, state.root)
        with self._txn():
            self.db.executemany("insert into state values (?, ?)",
                                [(k, canonical_bytes(v)) for k, v in state.items()])
            self._insert_block(Block(header, (), None), genesis.genesis_time_ms,
                               canonical_bytes([]))
            self.db.executemany("insert into meta values (?, ?)", [
                ("chain", canonical_bytes(genesis.chain_id)),
                ("genesis", canonical_bytes(genesis.hash)),
                ("validator", canonical_bytes(validator)),
                ("view", canonical_bytes([0, True]))])

    def _txn(self):
        store = self

        class _T:
            def __enter__(self):
                store.db.execute("begin")

            def __exit__(self, exc_type, *_):
                store.db.execute("rollback" if exc_type else "commit")
        return _T()

    def _insert_block(self, block: Block, time: int, results: bytes) -> None:
        self.db.execute(
            "insert into blocks values (?, ?, ?, ?, ?, ?, ?)",
            (block.header.height, block.header.hash, canonical_bytes(block.header.to_wire()),
             canonical_bytes(list(block.requests)),
             canonical_bytes(block.cert.to_wire()) if block.cert else None, time, results))

    def persist(self, ready: Ready) -> None:
        """Make everything durable that ``ready`` asks for, in one transaction (one fsync)."""
        if not ready.must_persist:
            return
        with self._txn():
            for cb in ready.blocks:
                self._insert_block(cb.block, cb.time, cb.results)
                upserts = [(k, v) for k, v in cb.writes if v is not None]
                deletes = [(k,) for k, v in cb.writes if v is None]
                if upserts:
                    self.db.executemany("insert or replace into state values (?, ?)", upserts)
                if deletes:
                    self.db.executemany("delete from state where k = ?", deletes)
                if cb.attestations:
                    self.db.executemany("insert or replace into attestations values (?, ?)",
                                        cb.attestations)
            if ready.votes:
                self.db.executemany("insert or ignore into votes values (?, ?, ?)", ready.votes)
            for cert in ready.prepared:
                self.db.execute("insert or replace into prepared values (?, ?)",
                                (cert.seq, canonical_bytes(cert.to_wire())))
            if ready.view is not None:
                self.db.execute("insert or replace into meta values ('view', ?)",
                                (canonical_bytes(list(ready.view)),))
            if ready.stable is not None:
                seq, digest, proof = ready.stable
                self.db.execute("insert or replace into meta values ('stable', ?)",
                                (canonical_bytes([seq, digest, [list(p) for p in proof]]),))
                self.db.execute("delete from votes where seq <= ?", (seq,))
                self.db.execute("delete from prepared where seq <= ?", (seq,))

    # -- reading -------------------------------------------------------------------------------

    def restore(self, genesis, validator: int, attest=None) -> tuple[Ledger, Restored]:
        """The ledger and consensus state this validator persisted (a fresh store is
        initialized from the genesis). Refuses a store of another chain or validator
        (:class:`BlockStoreError`); :class:`StoreDamaged` when what it holds does not read
        back (a damaged page, a record that does not decode)."""
        try:
            return self._restore(genesis, validator, attest)
        except BlockStoreError:
            raise
        except (sqlite3.DatabaseError, MedChainError, KeyError, IndexError, TypeError,
                ValueError) as exc:
            raise StoreDamaged(f"{self.path}: does not read back "
                               f"({type(exc).__name__}: {exc})") from None

    def _restore(self, genesis, validator: int, attest=None) -> tuple[Ledger, Restored]:
        chain = self._meta("chain")
        if chain is None:
            self._initialize(genesis, validator)
        elif chain != genesis.chain_id or self._meta("genesis") != genesis.hash:
            raise BlockStoreError(f"{self.path}: belongs to another chain or genesis")
        elif self._meta("validator") != validator:
            raise BlockStoreError(f"{self.path}: belongs to validator {self._meta('validator')}")
        row = self.db.execute(
            "select header, time from blocks order by height desc limit 1").fetchone()
        header = BlockHeader.from_wire(decode(row[0]))
        state = State.from_encoded(self.db.execute("select k, v from state"), header.state_root)
        ledger = Ledger(genesis, state, header, attest)
        since = row[1] - ledger.retain_ms
        ledger.restore_results(
            (t, decode(res), BlockHeader.from_wire(decode(hdr)).state_root)
            for t, res, hdr in self.db.execute(
                "select time, results, header from blocks where time >= ? and height > 0 "
                "order by height", (since,)))
        view, normal = self._meta("view")
        stable = self._meta("stable")
        restored = Restored(
            view=view, normal=normal,
            stable=(stable[0], stable[1], tuple(tuple(p) for p in stable[2])) if stable else None,
            votes={(v, n): d for v, n, d in self.db.execute("select view, seq, digest from votes")},
            prepared=[Certificate.from_wire(decode(c))
                      for (c,) in self.db.execute("select cert from prepared order by seq")])
        return ledger, restored

    def block(self, height: int) -> Block | None:
        row = self.db.execute("select header, requests, cert from blocks where height = ?",
                              (height,)).fetchone()
        if row is None:
            return None
        cert = Certificate.from_wire(decode(row[2])) if row[2] is not None else None
        return Block(BlockHeader.from_wire(decode(row[0])), tuple(decode(row[1])), cert)

    def results(self, height: int) -> list[dict] | None:
        """The per-request results of a block, in order, as execution produced them."""
        row = self.db.execute("select results from blocks where height = ?",
                              (height,)).fetchone()
        return None if row is None else [r for _client, _rid, r in decode(row[0])]

    def header(self, height: int) -> BlockHeader | None:
        row = self.db.execute("select header from blocks where height = ?", (height,)).fetchone()
        return BlockHeader.from_wire(decode(row[0])) if row else None

    def hashes(self, start: int, end: int) -> list[tuple[int, bytes, bytes]]:
        """``(height, header hash, state root)`` for a range, for comparing validators."""
        out = []
        for height, raw in self.db.execute(
                "select height, header from blocks where height between ? and ? order by height",
                (start, end)):
            header = BlockHeader.from_wire(decode(raw))
            out.append((height, header.hash, header.state_root))
        return out

    def height(self) -> int:
        return self.db.execute("select max(height) from blocks").fetchone()[0]

    def attestations(self, audit_ids: Iterable[int]) -> dict[int, bytes]:
        ids = list(audit_ids)
        out = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self.db.execute(
                f"select audit_id, sig from attestations where audit_id in ({marks})", chunk))
        return out
