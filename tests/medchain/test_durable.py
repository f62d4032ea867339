"""The one crash-safe writer: a process killed at any moment of a write leaves the old content
or the new, never a mix; key files are never replaced; modes hold whatever the umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from medchain.durable import durable_write

WRITER = r"""
import sys
from pathlib import Path
from medchain.durable import durable_write
path = Path(sys.argv[1])
i = 0
print("ready", flush=True)
while True:  # each version is a whole block of one repeated byte, 4 MiB: a torn file shows
    i += 1
    durable_write(path, bytes([i % 250 + 1]) * (4 << 20))
"""


def _whole(data: bytes) -> bool:
    return len(data) == 4 << 20 and data == data[:1] * len(data)


def test_a_writer_killed_at_any_moment_leaves_a_whole_file(tmp_path):
    path = tmp_path / "object"
    durable_write(path, b"\x00" * (4 << 20))
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _whole(path.read_bytes()), f"torn after a kill at {delay} s"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "object"]
    assert all(n.startswith(".object.") and n.endswith(".tmp") for n in leftovers)


def test_exclusive_never_replaces_and_leaves_no_temporary(tmp_path):
    path = durable_write(tmp_path / "key", b"first", mode=0o600, exclusive=True)
    with pytest.raises(FileExistsError):
        durable_write(path, b"second", mode=0o600, exclusive=True)
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["key"]


def test_mode_holds_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        private = durable_write(tmp_path / "private", b"x", mode=0o600)
        shared = durable_write(tmp_path / "shared", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_content_and_no_temporary(tmp_path, monkeypatch):
    path = durable_write(tmp_path / "f", b"old")

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("medchain.durable.os.write", full)
    with pytest.raises(OSError):
        durable_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]
