"""The durable outbox: sealed envelopes wait here until the cloud says they are stored.

SQLite in WAL mode, synchronous=FULL: an envelope that :meth:`Outbox.enqueue` returned for
survives a crash. It leaves only through :meth:`release` (the cloud acked it stored and
ledger-committed) or :meth:`reject` (the cloud refused it for a reason; kept aside for an
operator, never silently dropped). Sequence numbers are allocated in the same transaction
as the insert, so they rise strictly per device even across restarts.

Bounded by count, bytes and the disk's free space; :meth:`full_reason` is the back-pressure
signal the DICOM node asks before accepting another image.

A full disk must not freeze the outbox: SQLite needs free pages even to *delete* a row, so a
ballast file (``reserve_bytes``) is kept beside the database and given up when a release or
rejection would otherwise fail. Deleting in WAL mode frees no disk space by itself;
:meth:`compact` (checkpoint + incremental vacuum) gives it back, after which the ballast is
restored.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import OutboxError, OutboxFull

__all__ = ["Outbox", "OutboxLimits", "OutboxEntry", "Sealed", "OutboxFull", "OutboxError"]


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    max_bytes: int = 2 * 1024**3
    max_count: int = 100_000
    min_disk_free_bytes: int = 64 * 1024**2
    reserve_bytes: int = 4 * 1024**2


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a producer hands the outbox: the envelope's id, its encoding, and the hash of
    its signed header (an ack must name it to count)."""

    envelope_id: str
    data: bytes
    header_hash: bytes


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    sequence: int
    envelope_id: str
    size: int
    data: bytes


# Payloads live in their own table: listing and counting the queue never reads the blobs.
# Send bookkeeping (what is in flight, since when) is the uplink's, in memory: an envelope
# costs disk writes only when it is queued and when it leaves.
_SCHEMA = """
create table if not exists outbox (
    sequence     integer primary key,
    envelope_id  text not null unique,
    size         integer not null,
    header_hash  blob
);
create table if not exists payload (sequence integer primary key, data blob not null);
create table if not exists rejected (
    sequence     integer primary key,
    envelope_id  text not null unique,
    reason       text not null
);
create table if not exists counters (name text primary key, value integer not null);
-- what was ever enqueued, by the producer's own key (kept after release: a redelivery after a
-- crash must not become a second envelope)
create table if not exists seen (key text primary key, envelope_id text not null);
insert or ignore into counters values ('next_sequence', 1);
"""


class Outbox:
    """Thread-safe; one instance per database file (one writer)."""

    def __init__(self, path: str | os.PathLike, limits: OutboxLimits = OutboxLimits()):
        self.path = Path(path)
        self.limits = limits
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            fresh = not self._db.execute("select 1 from sqlite_master where name = 'counters'").fetchone()
            if fresh:  # settings that write the header only on a new file: a full disk must
                self._db.execute("pragma auto_vacuum=incremental")  # not stop a reopen
            self._db.execute("pragma journal_mode=wal")
            self._db.execute("pragma synchronous=full")
            # Debian's SQLite zeroes deleted pages, writing every freed page again (into the
            # WAL): for ciphertext that costs disk and buys nothing.
            self._db.execute("pragma secure_delete=off")
            if fresh:
                self._db.executescript(_SCHEMA)
            elif "header_hash" not in {r[1] for r in self._db.execute("pragma table_info(outbox)")}:
                self._db.execute("alter table outbox add column header_hash blob")  # older outboxes
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"outbox {self.path}: cannot open: {exc}") from None
        self._count, self._bytes = self._db.execute(
            "select count(*), coalesce(sum(size), 0) from outbox"
        ).fetchone()
        (self._next_sequence,) = self._db.execute(
            "select value from counters where name = 'next_sequence'").fetchone()
        self._building: set[str] = set()  # keys being sealed right now
        self._built = threading.Condition(self._lock)
        self._ballast = self.path.with_name(self.path.name + ".reserve")
        self._released = 0
        self._restore_ballast()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- state ----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._count

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def disk_free_bytes(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def full_reason(self, incoming_bytes: int = 0) -> str | None:
        """Why another envelope of ``incoming_bytes`` would not fit, or None."""
        if self._count + 1 > self.limits.max_count:
            return f"outbox holds {self._count} envelopes (limit {self.limits.max_count})"
        if self._bytes + incoming_bytes > self.limits.max_bytes:
            return f"outbox holds {self._bytes} bytes (limit {self.limits.max_bytes})"
        free = self.disk_free_bytes()
        if free - incoming_bytes < self.limits.min_disk_free_bytes:
            return f"only {free} bytes free on the outbox disk (keeps {self.limits.min_disk_free_bytes})"
        return None

    # -- full-disk reserve ----------------------------------------------------------------

    def _restore_ballast(self) -> None:
        if self._ballast.exists() or not self.limits.reserve_bytes:
            return
        if self.disk_free_bytes() < 2 * self.limits.reserve_bytes:
            return  # not yet: keep the room for the writes that free space
        try:
            with open(self._ballast, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, self.limits.reserve_bytes)
        except OSError:
            self._ballast.unlink(missing_ok=True)  # no room yet; try again after a release

    def _write_when_full(self, work: Callable[[], object]) -> object:
        """Run a small write that must not fail on a full disk: give up the ballast, retry once."""
        for attempt in (1, 2):
            try:
                self._db.execute("begin immediate")
                result = work()
                self._db.execute("commit")
                return result
            except sqlite3.DatabaseError as exc:
                if self._db.in_transaction:
                    self._db.execute("rollback")
                if attempt == 1 and "full" in str(exc).lower() and self._ballast.exists():
                    self._ballast.unlink()
                    continue
                raise OutboxError(f"outbox {self.path}: {exc}") from None

    def compact(self) -> None:
        """Give the disk space of released envelopes back (checkpoint + incremental vacuum)."""
        with self._lock:
            self._compact()

    def _compact(self) -> None:
        try:
            self._db.execute("pragma wal_checkpoint(truncate)")
            self._db.execute("pragma incremental_vacuum")
            self._db.execute("pragma wal_checkpoint(truncate)")
        except sqlite3.DatabaseError:
            return  # no room to checkpoint yet; the rows are gone, space follows later
        self._restore_ballast()

    # -- writes ---------------------------------------------------------------------------

    def enqueue(self, build: Callable[[int], Sealed], key: str | None = None) -> int | None:
        """Allocate the next sequence number, ``build(sequence) -> Sealed`` and store the
        result durably. Returns the sequence, or None when ``key`` was enqueued
        before (then nothing is stored).

        ``build`` (the sealing, milliseconds of CPU) runs outside the lock, so several
        producers seal while one commits (and waits for its fsync). :class:`OutboxFull`
        (nothing stored) when a bound or the disk is full; a failed build gives its sequence
        number back unless a later one was handed out meanwhile (a gap, which the protocol
        allows: a crash can leave one too).
        """
        with self._lock:
            while key is not None and key in self._building:  # the same object, racing: its
                self._built.wait()  # outcome decides (stored: a repeat; failed: ours to try)
            if key is not None and self._db.execute(
                    "select 1 from seen where key = ?", (key,)).fetchone():
                return None
            reason = self.full_reason()
            if reason:
                raise OutboxFull(reason)
            sequence = self._next_sequence
            self._next_sequence += 1
            if key is not None:
                self._building.add(key)
        try:
            sealed = build(sequence)
            with self._lock:
                reason = self.full_reason(len(sealed.data))
                if reason:
                    raise OutboxFull(reason)
                self._store(sequence, sealed, key)
                self._count += 1
                self._bytes += len(sealed.data)
                return sequence
        except BaseException:
            with self._lock:
                if self._next_sequence == sequence + 1:
                    self._next_sequence = sequence
            raise
        finally:
            if key is not None:
                with self._lock:
                    self._building.discard(key)
                    self._built.notify_all()

    def _store(self, sequence: int, sealed: Sealed, key: str | None) -> None:
        """One transaction (one fsync of the WAL); the caller holds the lock."""
        try:
            self._db.execute("begin immediate")
            self._db.execute(
                "insert into outbox (sequence, envelope_id, size, header_hash) values (?, ?, ?, ?)",
                (sequence, sealed.envelope_id, len(sealed.data), sealed.header_hash),
            )
            self._db.execute("insert into payload values (?, ?)", (sequence, sealed.data))
            if key is not None:
                self._db.execute("insert into seen values (?, ?)", (key, sealed.envelope_id))
            self._db.execute(
                "update counters set value = max(value, ?) where name = 'next_sequence'",
                (sequence + 1,),
            )
            self._db.execute("commit")
        except BaseException as exc:
            self._db.execute("rollback")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                raise OutboxFull(f"outbox disk is full: {exc}") from None
            if isinstance(exc, sqlite3.DatabaseError):
                raise OutboxError(f"outbox {self.path}: {exc}") from None
            raise

    def release(self, envelope_id: str) -> bool:
        """Drop an envelope the cloud has stored. False if it was not (or no longer) here."""
        with self._lock:
            def drop():
                row = self._db.execute(
                    "delete from outbox where envelope_id = ? returning sequence, size", (envelope_id,)
                ).fetchone()
                if row:
                    self._db.execute("delete from payload where sequence = ?", (row[0],))
                return row

            row = self._write_when_full(drop)
            if row:
                self._count -= 1
                self._bytes -= row[1]
                self._released += 1
                if self._released % 64 == 0 or self._count == 0:
                    self._compact()
            return row is not None

    def reject(self, envelope_id: str, reason: str) -> bool:
        """Move an envelope the cloud refused aside, with the reason, for an operator."""

        def move():
            row = self._db.execute(
                "delete from outbox where envelope_id = ? returning sequence, size", (envelope_id,)
            ).fetchone()
            if row:  # the payload stays, for an operator to inspect
                self._db.execute(
                    "insert or replace into rejected values (?, ?, ?)", (row[0], envelope_id, reason)
                )
            return row

        with self._lock:
            row = self._write_when_full(move)
            if row:
                self._count -= 1
                self._bytes -= row[1]
            return row is not None

    # -- reads ----------------------------------------------------------------------------

    def pending(self, limit: int, skip: Container[int] = ()) -> list[OutboxEntry]:
        """Up to ``limit`` waiting envelopes, oldest first, leaving out sequences in ``skip``
        (those the uplink has in flight)."""
        with self._lock:
            rows = self._db.execute(
                "select sequence, envelope_id, size from outbox order by sequence limit ?",
                (limit + len(skip),),
            ).fetchall()
            wanted = [r for r in rows if r[0] not in skip][:limit]
            return [
                OutboxEntry(seq, eid, size, self._db.execute(
                    "select data from payload where sequence = ?", (seq,)).fetchone()[0])
                for seq, eid, size in wanted
            ]

    def header_hash(self, envelope_id: str) -> bytes | None:
        """The signed header's hash of an envelope waiting here; None when none is."""
        with self._lock:
            row = self._db.execute("select header_hash from outbox where envelope_id = ?",
                                   (envelope_id,)).fetchone()
            return row[0] if row else None

    def envelope_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("select envelope_id from outbox order by sequence")]

    def rejected(self) -> list[tuple[str, str]]:
        """(envelope id, reason) of everything the cloud refused."""
        with self._lock:
            return list(self._db.execute("select envelope_id, reason from rejected order by sequence"))
