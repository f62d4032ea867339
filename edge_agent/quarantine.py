"""The quarantine: originals set aside with a reason, for a person to inspect, release or
delete.

A quarantined original still holds raw PHI, so the folder is 0700 and every file in it 0600.
Each entry is ``<id>.dcm`` (the bytes as received) and ``<id>.json`` (reason, detail, when).
What a person does is asked for here and carried out by whoever owns the spool:

* ``list`` and ``show`` read entries — ``show`` prints tags, VRs and lengths, never a value;
* ``release`` leaves ``<id>.release`` (the checks a reviewer waives, who, when); the running
  node picks it up, puts the original back into its spool and processes it again with those
  checks waived (:meth:`edge_agent.spool.Spool.readmit`);
* ``delete`` removes the entry for good.

Every action is appended to ``actions.log`` (JSON lines: time, action, id, reason, user,
waived checks) and logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medchain.durable import durable_write
from edge_agent.errors import QuarantineError

__all__ = ["QuarantineStore", "QuarantineEntry", "ReleaseRequest", "WAIVERS", "TagLine"]

log = logging.getLogger(__name__)

# checks a reviewer may waive on release, and what each means
WAIVERS = {
    "burned-in": "the pixels were reviewed: forward them without the burned-in text check",
    "document": "forward an encapsulated document with its body replaced by the profile's dummy",
}
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class QuarantineEntry:
    spool_id: str
    reason: str
    detail: str
    size: int
    at: float | None = None  # seconds since the epoch, when it was set aside
    release_requested: bool = False


@dataclass(frozen=True)
class ReleaseRequest:
    spool_id: str
    waived: frozenset[str]


@dataclass(frozen=True)
class TagLine:
    """One element of a quarantined original as ``show`` prints it: no value."""

    depth: int
    tag: str
    keyword: str
    vr: str
    length: int


class QuarantineStore:
    """One quarantine folder; safe to use from the node and a command-line process at once
    (each file is written whole and renamed into place)."""

    def __init__(self, root: str | os.PathLike, *, clock: Callable[[], float] | None = None,
                 user: Callable[[], str] | None = None) -> None:
        import getpass
        import time

        self.root = Path(root)
        self._clock = clock or time.time
        self._user = user or getpass.getuser
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def _path(self, spool_id: str, suffix: str) -> Path:
        if not _ID.match(spool_id):
            raise QuarantineError(f"quarantine: {spool_id!r} is not an entry id")
        return self.root / f"{spool_id}{suffix}"

    # -- the node's side -----------------------------------------------------------------------

    def put(self, spool_id: str, data: bytes, reason: str, detail: str = "") -> QuarantineEntry:
        """Set an original aside."""
        at = self._clock()
        meta = json.dumps({"spool_id": spool_id, "reason": reason, "detail": detail, "at": at}).encode()
        durable_write(self._path(spool_id, ".json"), meta, mode=0o600)
        durable_write(self._path(spool_id, ".dcm"), data, mode=0o600)
        return QuarantineEntry(spool_id, reason, detail, len(data), at)

    def release_requests(self) -> list[ReleaseRequest]:
        requests = []
        for path in sorted(self.root.glob("*.release")):
            try:
                waived = frozenset(json.loads(path.read_text()).get("waived", ()))
            except (OSError, ValueError):
                continue  # half-written by a crashed command: it is written again or deleted
            requests.append(ReleaseRequest(path.stem, waived & set(WAIVERS)))
        return requests

    def read(self, spool_id: str) -> bytes:
        try:
            return self._path(spool_id, ".dcm").read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"quarantine: no entry {spool_id}") from None

    def discard(self, spool_id: str) -> int:
        """Remove an entry's files; returns the size of the original it held."""
        freed = 0
        for suffix in (".dcm", ".json", ".release"):
            path = self._path(spool_id, suffix)
            try:
                if suffix == ".dcm":
                    freed = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        return freed

    def held_bytes(self) -> int:
        """The size of every original held (what counts against the spool's limit)."""
        return sum(p.stat().st_size for p in self.root.glob("*.dcm"))

    # -- a person's side -------------------------------------------------------------------------

    def entries(self) -> list[QuarantineEntry]:
        out = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                out.append(self._entry(meta))
            except (OSError, ValueError, KeyError):
                continue  # written by a crashed process, or gone meanwhile
        return out

    def entry(self, spool_id: str) -> QuarantineEntry:
        try:
            return self._entry(self._path(spool_id, ".json"))
        except FileNotFoundError:
            raise QuarantineError(f"quarantine: no entry {spool_id}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise QuarantineError(f"quarantine: entry {spool_id} cannot be read ({exc.__class__.__name__})") from None

    @staticmethod
    def _entry(meta: Path) -> QuarantineEntry:
        info = json.loads(meta.read_text())
        data = meta.with_suffix(".dcm")
        return QuarantineEntry(info["spool_id"], info["reason"], info.get("detail", ""),
                               data.stat().st_size if data.exists() else 0, info.get("at"),
                               meta.with_suffix(".release").exists())

    def tags(self, spool_id: str) -> Iterator[TagLine]:
        """Every element of the original, at any depth: tag, keyword, VR and length only."""
        from pydicom import dcmread

        entry = self.entry(spool_id)
        try:
            ds = dcmread(io.BytesIO(self.read(spool_id)), force=True)
            yield from _tag_lines(ds.file_meta, 0)
            yield from _tag_lines(ds, 0)
        except QuarantineError:
            raise
        except Exception as exc:
            raise QuarantineError(f"quarantine: entry {spool_id} ({entry.reason}) cannot be parsed "
                                  f"({exc.__class__.__name__})") from None
        self._record("show", entry, ())

    def request_release(self, spool_id: str, waived: frozenset[str] = frozenset()) -> QuarantineEntry:
        entry = self.entry(spool_id)
        unknown = waived - set(WAIVERS)
        if unknown:
            raise QuarantineError(f"quarantine: unknown waiver(s) {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(WAIVERS)}")
        body = {"waived": sorted(waived), "by": self._user(), "at": self._clock()}
        durable_write(self._path(spool_id, ".release"), json.dumps(body).encode(), mode=0o600)
        self._record("release", entry, waived)
        return entry

    def delete(self, spool_id: str) -> QuarantineEntry:
        entry = self.entry(spool_id)
        self.discard(spool_id)
        self._record("delete", entry, ())
        return entry

    def _record(self, action: str, entry: QuarantineEntry, waived) -> None:
        line = {"at": self._clock(), "action": action, "id": entry.spool_id, "reason": entry.reason,
                "user": self._user(), "waived": sorted(waived)}
        path = self.root / "actions.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("quarantine %s: entry %s (%s) by %s%s", action, entry.spool_id, entry.reason, line["user"],
                 f", waiving {', '.join(sorted(waived))}" if waived else "")

    def actions(self) -> list[dict]:
        path = self.root / "actions.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tag_lines(ds, depth: int) -> Iterator[TagLine]:
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        t = int(tag)
        try:
            elem = ds[tag]
            vr, keyword = elem.VR, elem.keyword or ("private" if (t >> 16) % 2 else "")
        except Exception:
            elem, vr, keyword = None, getattr(raw, "VR", None) or "??", "(undecodable)"
        length = getattr(raw, "length", None)
        if length is None:
            value = getattr(elem, "value", None)
            length = len(value) if isinstance(value, (bytes, str, list)) else 0
        yield TagLine(depth, f"({t >> 16:04X},{t & 0xFFFF:04X})", keyword, vr, int(length or 0))
        if elem is not None and vr == "SQ":
            for item in elem.value:
                yield from _tag_lines(item, depth + 1)
