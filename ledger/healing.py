"""A damaged block store: found at start, set aside, rebuilt from the peers.

A validator's blocks are also on every other validator, each block self-proving (its commit
certificate), so a damaged or lost page in its own SQLite file is no reason to stay down.
At start the validator opens its store through :func:`open_store`: SQLite's ``quick_check``
must pass and everything :meth:`BlockStore.restore` reads must decode; otherwise the file
(with its ``-wal`` and ``-shm``) is moved into a folder ``<store>.damaged-<UTC time>`` beside
it, kept for inspection, with one log line saying why, and the validator starts from an
empty store at the genesis. State transfer (:mod:`ledger.transfer`) then fetches and
re-executes every block from peers, checking each certificate and comparing each header.
A store that fails while running (a read or write raises ``DatabaseError``) is marked
suspect (a ``<store>.suspect`` file) and the validator stops; the next start sets it aside.

What is lost with the file is the validator's record of its own votes and prepared
certificates: until the view it may have voted in is over, a rebuilt validator counts as
one of the ``f`` faulty ones, exactly as a validator whose disk was replaced.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import BlockStoreError, StoreDamaged
from ledger.execution import Ledger
from ledger.ready import Restored
from ledger.store import BlockStore

__all__ = ["Opened", "open_store", "mark_suspect", "SIDE_FILES"]

log = logging.getLogger("ledger.validator")
SIDE_FILES = ("-wal", "-shm")


@dataclass(frozen=True)
class Opened:
    """A validator's store, its ledger and consensus state; ``set_aside`` is where a damaged
    store was moved (None when the store was sound)."""

    store: BlockStore
    ledger: Ledger
    restored: Restored
    set_aside: Path | None = None


def suspect_marker(path: Path) -> Path:
    return path.with_name(path.name + ".suspect")


def mark_suspect(path: str | os.PathLike, why: str) -> None:
    """Remember that the store failed while running, so the next start sets it aside."""
    suspect_marker(Path(path)).write_text(why + "\n")


def _damage(path: Path, genesis, vid: int, attest) -> tuple[str | None, Opened | None]:
    """``(why it is damaged, None)`` or ``(None, the opened store)``."""
    marker = suspect_marker(path)
    if marker.exists():
        return f"failed while running: {marker.read_text().strip()}", None
    try:
        store = BlockStore(path)
    except StoreDamaged as exc:
        return str(exc), None
    why = store.quick_check()
    if why is None:
        try:
            ledger, restored = store.restore(genesis, vid, attest)
            return None, Opened(store, ledger, restored)
        except StoreDamaged as exc:
            why = str(exc)
        except BlockStoreError:  # another chain or validator: refused as it is
            store.close()
            raise
    store.close()
    return why, None


def set_aside(path: Path, now: float) -> Path:
    """Move the store and its side files into ``<store>.damaged-<UTC time>/``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    folder = path.with_name(f"{path.name}.damaged-{stamp}")
    k = 1
    while folder.exists():
        folder = path.with_name(f"{path.name}.damaged-{stamp}-{k}")
        k += 1
    folder.mkdir()
    for suffix in ("", *SIDE_FILES, ".suspect"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(folder / src.name)
    return folder


def open_store(path: str | os.PathLike, genesis, vid: int, attest=None,
               now: float | None = None) -> Opened:
    """Open validator ``vid``'s store; set it aside and start empty if it is damaged. A store
    of another chain or validator is still refused (:class:`BlockStoreError`): that is a
    mistake to fix, not damage to heal."""
    path = Path(path)
    if not path.exists():
        store = BlockStore(path)
        return Opened(store, *store.restore(genesis, vid, attest))
    why, opened = _damage(path, genesis, vid, attest)
    if opened is not None:
        return opened
    why = why.removeprefix(f"{path}: ")
    folder = set_aside(path, time.time() if now is None else now)
    log.error("validator %d: block store %s is damaged (%s); moved to %s; starting empty and "
              "rebuilding from peers", vid, path.name, why, folder.name)
    store = BlockStore(path)
    return Opened(store, *store.restore(genesis, vid, attest), set_aside=folder)
