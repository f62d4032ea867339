"""The durable spool: complete or absent after a crash, FIFO across restarts, bounded."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import spool as spool_module
from edge_agent.errors import Quarantined, SpoolError, SpoolFull
from edge_agent.spool import Spool, read_ref


def _segments(root):
    return sorted((root / "segments").glob("*.log"))


def test_put_read_remove_and_order(tmp_path):
    spool = Spool(tmp_path / "s", 10_000)
    ids = [spool.put(bytes([i]) * 100) for i in range(5)]
    assert spool.pending() == ids == sorted(ids)
    assert spool.read(ids[2]) == bytes([2]) * 100 == read_ref(spool.ref(ids[2]))
    on_disk = spool.used_bytes
    assert on_disk == sum(p.stat().st_size for p in _segments(tmp_path / "s")) > 500
    spool.remove(ids[0])
    spool.remove(ids[0])  # twice is harmless (a crash between remove and bookkeeping)
    assert spool.pending() == ids[1:]
    with pytest.raises(SpoolError, match="not in the spool"):
        spool.read(ids[0])
    for sid in ids[1:]:
        spool.remove(sid)
    spool.close()  # the segment being appended to goes once nothing in it is live
    assert spool.used_bytes == 0 and not _segments(tmp_path / "s")


def test_restart_keeps_complete_records_and_drops_a_torn_tail(tmp_path, caplog):
    spool = Spool(tmp_path / "s", 10_000)
    kept = spool.put(b"complete")
    torn = spool.put(b"half written")
    [segment] = _segments(tmp_path / "s")
    os.truncate(segment, segment.stat().st_size - 3)  # a crash in the middle of the append
    with caplog.at_level("WARNING", logger="edge_agent.spool"):
        again = Spool(tmp_path / "s", 10_000)
    assert again.pending() == [kept] and again.read(kept) == b"complete" and torn not in again.pending()
    [warning] = [r.getMessage() for r in caplog.records]  # dropped bytes are said, by size only
    assert segment.name in warning and "after its last valid record (of 1)" in warning
    newer = again.put(b"next")
    assert again.pending() == [kept, newer]  # FIFO across restarts, in a new segment
    assert len(_segments(tmp_path / "s")) == 2
    again.remove(kept)  # the old segment holds nothing live any more: it goes
    assert len(_segments(tmp_path / "s")) == 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8), cut=st.integers(0, 3000),
       flip=st.one_of(st.none(), st.integers(0, 3000)))
def test_any_torn_or_corrupt_segment_never_yields_a_damaged_or_invented_object(
        tmp_path_factory, sizes, cut, flip):
    """Whatever a crash or bad sector leaves, start-up (which reads only headers) finds every
    record wholly before the damage; whatever it finds either reads back as one of the stored
    objects under its own id with its exact bytes, or is refused as ``spool-damaged`` when
    read — never forwarded damaged or invented."""
    root = tmp_path_factory.mktemp("s")
    spool = Spool(root, 1_000_000)
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    ids = [spool.put(p) for p in payloads]
    spool.close()
    [segment] = _segments(root)
    blob = bytearray(segment.read_bytes())
    ends = _record_ends(bytes(blob))
    damage = min(cut, flip if flip is not None else len(blob))
    blob = blob[:cut]
    if flip is not None and flip < len(blob):
        blob[flip] ^= 0x5A
    segment.write_bytes(bytes(blob))
    again = Spool(root, 1_000_000)
    readable = {}
    for sid in again.pending():
        try:
            readable[sid] = again.read(sid)
        except Quarantined as q:
            assert q.reason == "spool-damaged"
    assert all(readable[sid] == payloads[ids.index(sid)] for sid in readable)
    whole = [sid for sid, end in zip(ids, ends) if end <= damage]  # wholly before the damage
    assert set(whole) <= set(readable)
    if damage >= ends[-1]:  # nothing cut or flipped
        assert list(readable) == ids


def _record_ends(blob: bytes) -> list[int]:
    from edge_agent.spool import _HEADER

    ends, pos = [], 0
    while pos < len(blob):
        _, id_len, length, _ = _HEADER.unpack_from(blob, pos)
        pos += _HEADER.size + id_len + length
        ends.append(pos)
    return ends


def test_segments_roll_and_each_goes_once_drained(tmp_path):
    spool = Spool(tmp_path / "s", 1_000_000, segment_bytes=1000)
    ids = [spool.put(b"x" * 400) for _ in range(6)]
    assert len(_segments(tmp_path / "s")) == 3  # two records per segment
    for sid in ids[:3]:
        spool.remove(sid)
    assert len(_segments(tmp_path / "s")) == 2  # the first is deleted; the second is half live
    assert spool.pending() == ids[3:]


def test_max_bytes_refuses_without_storing(tmp_path):
    spool = Spool(tmp_path / "s", 300)
    spool.put(b"x" * 200)
    with pytest.raises(SpoolFull, match="exceed max_bytes 300"):
        spool.put(b"y" * 100)
    assert len(spool.pending()) == 1 and spool.used_bytes < 300
    assert spool.used_bytes == sum(p.stat().st_size for p in _segments(tmp_path / "s"))


def test_concurrent_puts_never_overshoot_and_all_survive_a_restart(tmp_path):
    one = Spool(tmp_path / "probe", 10**6)
    one.put(b"z" * 100)
    record = one.used_bytes
    spool = Spool(tmp_path / "s", record * 50)
    stored = []

    def put() -> None:
        for _ in range(20):
            try:
                stored.append(spool.put(b"z" * 100))
            except SpoolFull:
                pass

    threads = [threading.Thread(target=put) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(stored) == 50 == len(spool.pending()) and spool.used_bytes == record * 50
    assert Spool(tmp_path / "s", record * 50).pending() == sorted(stored)


def test_a_failed_append_leaves_nothing_behind(tmp_path, monkeypatch):
    """Disk full half-way through a record: the put fails, the half record is cut off again,
    and the records before and after it are intact after a restart."""
    spool = Spool(tmp_path / "s", 10_000)
    before = spool.put(b"before")
    real_writev = os.writev

    def disk_full(fd, parts):
        real_writev(fd, [b"".join(parts)[:7]])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "writev", disk_full)
    with pytest.raises(SpoolError, match="cannot store object"):
        spool.put(b"lost, never acknowledged")
    monkeypatch.setattr(spool_module.os, "writev", real_writev)
    after = spool.put(b"after")
    assert Spool(tmp_path / "s", 10_000).pending() == [before, after]


def test_quarantine_keeps_object_and_reason(tmp_path):
    spool = Spool(tmp_path / "s", 10_000)
    sid = spool.put(b"bad object")
    entry = spool.quarantine(sid, "undecodable-pixel-data", "ValueError")
    assert spool.pending() == [] and entry.size == 10
    assert (tmp_path / "s" / "quarantine" / f"{sid}.dcm").read_bytes() == b"bad object"
    info = json.loads((tmp_path / "s" / "quarantine" / f"{sid}.json").read_text())
    assert info == {"spool_id": sid, "reason": "undecodable-pixel-data", "detail": "ValueError",
                    "at": info["at"]} and info["at"] > 0
    spool.close()
    again = Spool(tmp_path / "s", 10_000)
    assert [q.reason for q in again.quarantined()] == ["undecodable-pixel-data"] and again.pending() == []
    assert again.used_bytes == len(b"bad object")


def test_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open"):
        Spool(tmp_path / "file" / "s", 100)


def test_a_spool_from_the_earlier_file_per_object_layout_is_taken_over(tmp_path):
    """An upgrade must not strand what an earlier version acknowledged: ``ready/<id>.dcm``
    files become log records under the same ids, in order; unacknowledged ``.part`` files go."""
    root = tmp_path / "s"
    (root / "ready").mkdir(parents=True)
    (root / "incoming").mkdir()
    (root / "incoming" / "00000000000000000003-000000-cc.part").write_bytes(b"torn")
    old = {"00000000000000000001-000000-aa": b"first", "00000000000000000002-000000-bb": b"second"}
    for sid, data in old.items():
        (root / "ready" / f"{sid}.dcm").write_bytes(data)
    spool = Spool(root, 10_000)
    assert spool.pending() == sorted(old)
    assert [spool.read(sid) for sid in spool.pending()] == [b"first", b"second"]
    assert not (root / "ready").exists() and not (root / "incoming").exists()
    newer = spool.put(b"third")
    spool.close()
    again = Spool(root, 10_000)  # adopted records are in the log like any other
    assert again.pending() == [*sorted(old), newer]


def test_a_crash_while_taking_over_the_earlier_layout_duplicates_nothing(tmp_path):
    root = tmp_path / "s"
    (root / "ready").mkdir(parents=True)
    (root / "ready" / "00000000000000000001-000000-aa.dcm").write_bytes(b"first")
    Spool(root, 10_000).close()
    (root / "ready").mkdir()  # as if the crash came after the append, before the delete
    (root / "ready" / "00000000000000000001-000000-aa.dcm").write_bytes(b"first")
    again = Spool(root, 10_000)
    assert again.pending() == ["00000000000000000001-000000-aa"]
    assert again.read("00000000000000000001-000000-aa") == b"first"


def test_pending_bytes_follow_puts_removals_quarantine_and_restarts(tmp_path):
    spool = Spool(tmp_path / "s", 10_000)
    a, b, c = spool.put(b"x" * 100), spool.put(b"y" * 30), spool.put(b"z" * 7)
    assert spool.pending_bytes == 137
    spool.remove(a)
    spool.quarantine(c, "deid-failed")
    assert spool.pending_bytes == 30
    spool.remove(b)
    spool.close()
    again = Spool(tmp_path / "s", 10_000)  # the emptied segment is gone: nothing comes back
    assert again.pending() == [] and again.pending_bytes == 0
    again.put(b"w" * 11)
    again.close()
    assert Spool(tmp_path / "s", 10_000).pending_bytes == 11
