"""Files that survive a crash whole or not at all: write, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
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
    syncs the directory."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing leftover keeps its old mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(final: Path, data: bytes, temp: Path | None = None, mode: int = 0o644) -> None:
    """Write ``data`` to ``final`` so that after a crash it is either complete or absent."""
    temp = temp or final.with_name(final.name + ".part")
    write_synced(temp, data, mode)
    os.replace(temp, final)
    fsync_dir(final.parent)
