"""The durable outbox: survives restarts, keeps sequence numbers rising, refuses when full."""

import os
import uuid

import pytest

from edge_agent.outbox import Outbox, OutboxFull, OutboxLimits, Sealed


def put(box: Outbox, size: int = 100) -> tuple[int, str]:
    eid = uuid.uuid4().hex
    seq = box.enqueue(lambda s: Sealed(eid, os.urandom(size), bytes(32)))
    return seq, eid


def test_enqueue_release_and_restart(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        (s1, e1), (s2, e2), (s3, e3) = put(box), put(box), put(box)
        assert (s1, s2, s3) == (1, 2, 3)
        assert box.release(e2) is True and box.release(e2) is False
        assert box.depth == 2 and box.queued_bytes == 200
    with Outbox(path) as box:  # a restart keeps what was not released, and the counter
        assert box.envelope_ids() == [e1, e3]
        assert box.depth == 2 and box.queued_bytes == 200
        s4, _ = put(box)
        assert s4 == 4


def test_pending_in_order_skipping_what_is_in_flight(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        (s1, _), (s2, _) = put(box), put(box)
        assert [e.sequence for e in box.pending(10)] == [s1, s2]
        assert [e.sequence for e in box.pending(10, skip={s1})] == [s2]
        assert [e.sequence for e in box.pending(1)] == [s1] and box.pending(1)[0].size == 100


def test_rejected_envelopes_are_kept_aside_with_the_reason(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        _, eid = put(box)
        assert box.reject(eid, "device revoked") is True
        assert box.depth == 0 and box.rejected() == [(eid, "device revoked")]


def test_count_and_byte_limits(tmp_path):
    with Outbox(tmp_path / "o.db", OutboxLimits(max_count=2, max_bytes=10_000, min_disk_free_bytes=0)) as box:
        put(box), put(box)
        assert "2 envelopes" in box.full_reason()
        with pytest.raises(OutboxFull, match="limit 2"):
            put(box)
        box.release(box.envelope_ids()[0])
        with pytest.raises(OutboxFull, match="limit 10000"):
            put(box, size=20_000)
        seq, _ = put(box)
        assert seq == 3  # a refused build consumes no sequence number


def test_a_failing_build_stores_nothing(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        with pytest.raises(RuntimeError):
            box.enqueue(lambda s: (_ for _ in ()).throw(RuntimeError("packaging failed")))
        assert box.depth == 0
        assert put(box)[0] == 1


@pytest.fixture
def small_disk(tmp_path, small_tmpfs):
    """A real 8 MiB filesystem, so 'disk full' is the kernel's ENOSPC, not a pretend one."""
    return small_tmpfs(tmp_path / "disk", 8)


def fill(path, chunk=64 * 1024):
    """Another program takes every free byte (real ENOSPC at the end)."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * chunk)
                fh.flush()
        except OSError:
            pass


LIMITS = OutboxLimits(min_disk_free_bytes=1024**2, reserve_bytes=512 * 1024)


def test_free_space_threshold_is_back_pressure(small_disk):
    with Outbox(small_disk / "o.db", LIMITS) as box:
        stored = []
        with pytest.raises(OutboxFull, match="free on the outbox disk"):
            for _ in range(100):
                stored.append(put(box, size=300_000)[1])
        assert 5 < len(stored) < 30
        assert box.envelope_ids() == stored  # all accepted before the refusal is intact


def test_disk_filled_by_others_loses_nothing_and_recovers(small_disk):
    box = Outbox(small_disk / "o.db", LIMITS)
    stored = [put(box, size=300_000)[1] for _ in range(6)]
    fill(small_disk / "other-program.log")  # the disk is now really full
    with pytest.raises(OutboxFull):
        put(box, size=300_000)
    assert box.release(stored[0]) and box.release(stored[1])
    box.close()
    with Outbox(small_disk / "o.db", LIMITS) as again:  # a restart while the disk is full
        assert again.envelope_ids() == stored[2:]
        (small_disk / "other-program.log").unlink()  # the operator frees space
        for eid in stored[2:]:
            assert again.release(eid)
        assert again.depth == 0
        assert again.disk_free_bytes() > 5 * 1024**2  # compaction gave the space back
        assert (small_disk / "o.db.reserve").exists()  # and the ballast is back in place
        assert put(again, size=300_000)[0] == len(stored) + 1


def test_a_key_is_enqueued_once_even_after_release(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        eid = uuid.uuid4().hex
        assert box.enqueue(lambda s: Sealed(eid, b"x", bytes(32)), key="sop-1") == 1
        assert box.enqueue(lambda s: Sealed(uuid.uuid4().hex, b"y", bytes(32)), key="sop-1") is None
        box.release(eid)
    with Outbox(tmp_path / "o.db") as box:  # and across a restart
        assert box.enqueue(lambda s: Sealed(uuid.uuid4().hex, b"z", bytes(32)), key="sop-1") is None
        assert box.depth == 0


def test_concurrent_producers_seal_in_parallel_and_each_key_lands_once(tmp_path):
    """Sealing runs outside the lock: sequences stay unique, a key racing itself is stored
    once, and a failed build in the middle leaves nothing behind."""
    import threading

    box = Outbox(tmp_path / "o.db")
    results, errors = [], []

    def producer(i):
        def build(seq):
            if i % 7 == 3:
                raise RuntimeError("packaging failed")
            return Sealed(f"{i % 20:032x}", bytes([i % 256]) * 1000, bytes(32))

        try:
            results.append(box.enqueue(build, key=f"sop-{i % 20}"))
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = [r for r in results if r is not None]
    assert len(stored) == len(set(stored)) == box.depth == len(set(box.envelope_ids()))
    assert box.depth == len({i % 20 for i in range(60) if i % 7 != 3})
    box.close()
    with Outbox(tmp_path / "o.db") as again:  # the counter survives: no sequence reused
        assert put(again)[0] > max(stored)
