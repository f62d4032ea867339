"""Files that survive a crash whole or not at all: the one recipe every writer of ours uses
(spool quarantine, object store, model installs, genesis, checkpoints, key files).

Write to a temporary name unique to this writer in the same folder, fsync it, rename it into
place (or, with ``exclusive``, hard-link it so an existing file is never replaced), then fsync
the folder so the new name itself survives. After a crash at any point the final name holds
the old content or the new, never a mix; a temporary file a crash left behind is named
``.<name>.<random>.tmp`` and is never read.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "write_synced", "durable_write"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(temp: Path, data: bytes, mode: int = 0o644) -> None:
    """Write and fsync ``temp`` (created with ``mode``); the caller renames it into place and
    syncs the directory (a caller that commits a group of files at once does so itself)."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing leftover keeps its old mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(final: str | os.PathLike, data: bytes, *, mode: int = 0o644, exclusive: bool = False) -> Path:
    """Write ``data`` to ``final`` so that after a crash it is either complete or absent (or
    its previous content). ``exclusive``: raise ``FileExistsError`` rather than replace an
    existing file (key files are never overwritten)."""
    final = Path(final)
    temp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    try:
        write_synced(temp, data, mode)
        if exclusive:
            os.link(temp, final)
        else:
            os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final
