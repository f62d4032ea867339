"""The durable on-disk spool between the network and everything downstream.

A received object is written to ``incoming/<id>.part``, flushed and fsynced, renamed to
``ready/<id>.dcm`` and the directory fsynced — only then may the SCP answer Success. A crash
before the rename leaves a ``.part`` file that start-up deletes (the scanner got no Success
and retries); a crash after it leaves a complete file that start-up hands downstream again.
Ids sort in arrival order, so processing is first-in, first-out across restarts.

Quarantined objects move to ``quarantine/<id>.dcm`` with ``<id>.json`` holding the reason
(a code and a short detail, never an attribute value). Everything on disk counts against
``max_bytes``; a put that would exceed it raises :class:`SpoolFull` and stores nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import SpoolError, SpoolFull

__all__ = ["Spool", "QuarantineEntry", "fsync_dir", "durable_write", "DirSync"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(final: Path, data: bytes, temp: Path | None = None) -> None:
    """Write ``data`` to ``final`` so that after a crash it is either complete or absent."""
    temp = temp or final.with_name(final.name + ".part")
    write_synced(temp, data)
    os.replace(temp, final)
    fsync_dir(final.parent)


class DirSync:
    """Group commit for one directory's entries: a caller that renamed a file into it waits for
    one fsync of the directory that began after its rename; that fsync is shared by every
    caller who renamed before it began. Under concurrent C-STOREs (or sink hand-offs) this
    turns one directory fsync per file into one per burst, with the same guarantee."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._busy = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket and self._busy:
                self._cond.wait()
            if self._done >= ticket:
                return
            self._busy = True
            target = self._requested
        try:
            fsync_dir(self.path)
        except BaseException:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._done = max(self._done, target)
            self._busy = False
            self._cond.notify_all()


def write_synced(temp: Path, data: bytes) -> None:
    """Write and fsync ``temp``; the caller renames it into place and syncs the directory."""
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class QuarantineEntry:
    spool_id: str
    reason: str
    detail: str
    size: int


class Spool:
    """Thread-safe; one process owns a spool directory at a time."""

    def __init__(self, root: str | os.PathLike, max_bytes: int, *,
                 clock_ns: Callable[[], int] = time.time_ns, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._clock_ns = clock_ns
        self._rng = rng
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self.incoming, self.ready, self.quarantine_dir = (self.root / n for n in ("incoming", "ready", "quarantine"))
        self._ready_sync = DirSync(self.ready)
        try:
            for d in (self.incoming, self.ready, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
            for stale in self.incoming.glob("*.part"):  # a crash before Success: never acknowledged
                stale.unlink()
            self._used = sum(p.stat().st_size for d in (self.ready, self.quarantine_dir) for p in d.glob("*.dcm"))
        except OSError as exc:
            raise SpoolError(f"spool {self.root}: cannot open ({exc.strerror or exc})") from None

    @property
    def used_bytes(self) -> int:
        return self._used

    def _new_id(self) -> str:
        return f"{self._clock_ns():020d}-{next(self._counter) % 1_000_000:06d}-{self._rng(4).hex()}"

    def put(self, data: bytes) -> str:
        """Store durably and return the spool id; :class:`SpoolFull` when over ``max_bytes``."""
        with self._lock:
            if self._used + len(data) > self.max_bytes:
                raise SpoolFull(f"spool {self.root}: {len(data)} bytes would exceed max_bytes "
                                f"{self.max_bytes} ({self._used} used)")
            self._used += len(data)  # reserve, so concurrent puts cannot overshoot together
            spool_id = self._new_id()
        try:
            part = self.incoming / f"{spool_id}.part"
            write_synced(part, data)
            os.replace(part, self.ready / f"{spool_id}.dcm")
            self._ready_sync.sync()  # the rename is durable once this returns: Success may go out
        except OSError as exc:
            with self._lock:
                self._used -= len(data)
            (self.incoming / f"{spool_id}.part").unlink(missing_ok=True)
            raise SpoolError(f"spool {self.root}: cannot store object ({exc.strerror or exc})") from None
        return spool_id

    def pending(self) -> list[str]:
        """Ids waiting to be processed, oldest first."""
        return sorted(p.stem for p in self.ready.glob("*.dcm"))

    def path(self, spool_id: str) -> Path:
        return self.ready / f"{spool_id}.dcm"

    def read(self, spool_id: str) -> bytes:
        try:
            return self.path(spool_id).read_bytes()
        except OSError as exc:
            raise SpoolError(f"spool entry {spool_id}: cannot read ({exc.strerror or exc})") from None

    def remove(self, spool_id: str) -> None:
        """Forget an entry once downstream holds it durably. The unlink is not fsynced: if a
        crash undoes it, the entry is simply handed downstream again after the restart, and
        sinks take a repeated instance as the same one (it is keyed by its pseudonymous UID)."""
        path = self.path(spool_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._used -= size

    def quarantine(self, spool_id: str, reason: str, detail: str = "") -> QuarantineEntry:
        src = self.path(spool_id)
        dst = self.quarantine_dir / f"{spool_id}.dcm"
        size = src.stat().st_size
        durable_write(self.quarantine_dir / f"{spool_id}.json",
                      json.dumps({"spool_id": spool_id, "reason": reason, "detail": detail}).encode())
        os.replace(src, dst)
        fsync_dir(self.quarantine_dir)
        fsync_dir(self.ready)
        return QuarantineEntry(spool_id, reason, detail, size)

    def quarantined(self) -> list[QuarantineEntry]:
        entries = []
        for meta in sorted(self.quarantine_dir.glob("*.json")):
            info = json.loads(meta.read_text())
            data = meta.with_suffix(".dcm")
            entries.append(QuarantineEntry(info["spool_id"], info["reason"], info.get("detail", ""),
                                           data.stat().st_size if data.exists() else 0))
        return entries
