"""The durable spool: complete or absent after a crash, FIFO across restarts, bounded."""

from __future__ import annotations

import json
import threading

import pytest

from edge_agent.errors import SpoolError, SpoolFull
from edge_agent.spool import Spool


def test_put_read_remove_and_order(tmp_path):
    spool = Spool(tmp_path / "s", 10_000)
    ids = [spool.put(bytes([i]) * 100) for i in range(5)]
    assert spool.pending() == ids == sorted(ids)
    assert spool.read(ids[2]) == bytes([2]) * 100 and spool.used_bytes == 500
    spool.remove(ids[0])
    spool.remove(ids[0])  # twice is harmless (a crash between remove and bookkeeping)
    assert spool.pending() == ids[1:] and spool.used_bytes == 400
    assert not list((tmp_path / "s" / "incoming").iterdir())


def test_restart_keeps_complete_entries_and_drops_half_written(tmp_path):
    spool = Spool(tmp_path / "s", 10_000)
    kept = spool.put(b"complete")
    (tmp_path / "s" / "incoming" / "99999-half.part").write_bytes(b"half")  # crash before rename
    again = Spool(tmp_path / "s", 10_000)
    assert again.pending() == [kept] and again.used_bytes == len(b"complete")
    assert not list((tmp_path / "s" / "incoming").iterdir())
    newer = again.put(b"next")
    assert again.pending() == [kept, newer]  # FIFO across restarts


def test_max_bytes_refuses_without_storing(tmp_path):
    spool = Spool(tmp_path / "s", 250)
    spool.put(b"x" * 200)
    with pytest.raises(SpoolFull, match="exceed max_bytes 250"):
        spool.put(b"y" * 100)
    assert len(spool.pending()) == 1 and spool.used_bytes == 200


def test_concurrent_puts_never_overshoot(tmp_path):
    spool = Spool(tmp_path / "s", 100 * 50)
    outcomes = []

    def put() -> None:
        for _ in range(20):
            try:
                spool.put(b"z" * 100)
                outcomes.append(True)
            except SpoolFull:
                outcomes.append(False)

    threads = [threading.Thread(target=put) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert outcomes.count(True) == 50 == len(spool.pending()) and spool.used_bytes == 5000


def test_quarantine_keeps_object_and_reason(tmp_path):
    spool = Spool(tmp_path / "s", 10_000)
    sid = spool.put(b"bad object")
    entry = spool.quarantine(sid, "undecodable-pixel-data", "ValueError")
    assert spool.pending() == [] and entry.size == 10
    assert (tmp_path / "s" / "quarantine" / f"{sid}.dcm").read_bytes() == b"bad object"
    info = json.loads((tmp_path / "s" / "quarantine" / f"{sid}.json").read_text())
    assert info == {"spool_id": sid, "reason": "undecodable-pixel-data", "detail": "ValueError"}
    assert [q.reason for q in Spool(tmp_path / "s", 10_000).quarantined()] == ["undecodable-pixel-data"]
    assert Spool(tmp_path / "s", 10_000).used_bytes == 10  # quarantine counts against the disk budget


def test_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open"):
        Spool(tmp_path / "file" / "s", 100)
