"""Shared memory through which worker processes hand de-identified files back to the node.

A worker process's result comes back through the executor's pipe as a pickle; for a
0.5 MB CT slice that is a pipe read, a buffer copy and an unpickling copy in the node's
process, about 1 ms of its CPU (much of it holding the GIL the SCP threads need), against
0.2 ms when the worker writes the bytes into a mapped slot and the node copies them out
once (measured on 2 cores). One slot per feeding thread: a thread waits for its object's
result before it submits the next, so nobody else writes its slot meanwhile.

The slots live in one file on a RAM file system (``/dev/shm``), allocated in full at
creation (``posix_fallocate``): a write into a sparse mapping of a full tmpfs would kill
the worker with SIGBUS, while a failed allocation only means results keep using the pipe.
Objects larger than a slot use the pipe too. The allocation is RAM: 48 MiB for the node's
default three feeding threads with 16 MiB slots. A node killed with SIGKILL cannot remove
its file; the next node removes those whose process is gone.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Slot", "Handback", "write_slot", "SHM_DIR", "PREFIX"]

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "medchain-handback-"


@dataclass(frozen=True)
class Slot:
    """Where one worker result may be written: travels to the worker with its task."""

    path: str
    offset: int
    size: int


class Handback:
    """The node's side: creates, maps, reads and finally removes the slots file."""

    def __init__(self, slots: int, slot_bytes: int, directory: Path | None = None) -> None:
        directory = SHM_DIR if directory is None else directory
        _remove_orphans(directory)
        total = slots * slot_bytes
        path = directory / f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, total)
            self._map = mmap.mmap(fd, total)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.path = path
        self.slots = [Slot(str(path), i * slot_bytes, slot_bytes) for i in range(slots)]

    def take(self, slot: Slot, length: int) -> bytes:
        """A copy of the ``length`` bytes a worker wrote into ``slot``."""
        if not 0 <= length <= slot.size:
            raise ValueError(f"result length {length} outside its slot of {slot.size} bytes")
        return self._map[slot.offset:slot.offset + length]

    def close(self) -> None:
        self._map.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_orphans(directory: Path) -> None:
    """Remove slot files left by node processes that no longer exist."""
    try:
        names = [p for p in directory.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return
    for path in names:
        try:
            pid = int(path.name[len(PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                path.unlink()
                log.info("removed %s, left by a node process that is gone", path.name)
            except OSError:
                pass
        except (ValueError, PermissionError):  # not ours, or another user's live process
            continue


_maps: dict[str, mmap.mmap] = {}  # in a worker process: slot files mapped so far


def write_slot(slot: Slot, data: bytes) -> bool:
    """In a worker process: put ``data`` into ``slot``; False when it does not fit (the
    caller returns it through the pipe instead)."""
    if len(data) > slot.size:
        return False
    m = _maps.get(slot.path)
    if m is None:
        with open(slot.path, "r+b") as f:
            m = _maps[slot.path] = mmap.mmap(f.fileno(), 0)
    m[slot.offset:slot.offset + len(data)] = data
    return True
