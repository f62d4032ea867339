"""Fragmenting and reassembly: any order, any repetition, and nothing mixed up."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlalchemy import create_engine

from cloud.reassembly import Reassembler, SharedReassembler
from medchain.errors import ProtocolError
from medchain.protocol import Fragment, decode_message, fragment


def frags(data: bytes, limit: int, mid: bytes = b"m" * 16) -> list[Fragment]:
    return [decode_message(f, expect=Fragment) for f in fragment(mid, data, limit)]


def test_every_encoded_fragment_respects_the_limit():
    data = os.urandom(100_000)
    for limit in (300, 1000, 4096, 65536):
        assert all(len(f) <= limit for f in fragment(b"m" * 16, data, limit))


@given(st.binary(max_size=3000), st.integers(200, 900), st.randoms(), st.integers(0, 3))
def test_reassembles_in_any_order_with_duplicates(data, limit, rnd, dups):
    pieces = frags(data, limit)
    pieces += [rnd.choice(pieces) for _ in range(dups)]
    rnd.shuffle(pieces)
    r = Reassembler()
    out = [m for f in pieces if (m := r.add("dev", f, 0)) is not None]
    assert out[0] == data
    assert r.pending_bytes == 0 or len(out) > 1  # a late duplicate may start a new partial


def test_same_id_from_two_devices_is_kept_apart():
    a, b = os.urandom(2000), os.urandom(2000)
    fa, fb = frags(a, 500), frags(b, 500)
    r = Reassembler()
    results = []
    for x, y in zip(fa, fb):
        results += [r.add("dev-a", x, 0), r.add("dev-b", y, 0)]
    assert [m for m in results if m] == [a, b]


def test_forged_fragment_fails_the_digest():
    pieces = frags(os.urandom(2000), 500)
    bad = Fragment(pieces[1].message_id, 1, pieces[1].count, pieces[1].total, pieces[1].digest,
                   bytes(len(pieces[1].data)))
    r = Reassembler()
    for f in [pieces[0], bad, *pieces[2:]]:
        try:
            r.add("dev", f, 0)
        except ProtocolError as exc:
            assert "digest" in str(exc)
            return
    pytest.fail("a forged slice was accepted")


def test_stale_partials_expire_and_memory_is_bounded():
    r = Reassembler(max_pending_bytes=5000, max_age_ms=1000)
    r.add("dev", frags(os.urandom(4000), 600, b"a" * 16)[0], now_ms=0)
    assert r.pending_bytes > 0
    r.expire(now_ms=2000)
    assert r.pending_bytes == 0 and r.dropped == 1
    for i in range(20):
        r.add("dev", frags(os.urandom(4000), 2000, bytes([i]) * 16)[0], now_ms=3000 + i)
    assert r.pending_bytes <= 5000 + 2000


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=3000), st.integers(200, 900), st.randoms(), st.integers(0, 3))
def test_group_members_sharing_a_database_reassemble_once_between_them(tmp_path_factory, data,
                                                                       limit, rnd, dups):
    """The broker deals fragments round-robin to a group's members: whichever member files
    the last piece returns the message (a late redelivery may start it again, as in memory;
    ingest's idempotence stores it once)."""
    engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp('group') / 'catalog.sqlite'}")
    members = [SharedReassembler(engine), SharedReassembler(engine)]
    pieces = frags(data, limit)
    pieces += [rnd.choice(pieces) for _ in range(dups)]
    rnd.shuffle(pieces)
    out = [m for f in pieces if (m := rnd.choice(members).add("dev", f, 0)) is not None]
    assert out and all(m == data for m in out)
    assert len(out) == 1 or dups > 0
    engine.dispose()


def test_shared_reassembly_refuses_pieces_that_do_not_add_up(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'c.sqlite'}")
    member = SharedReassembler(engine)
    pieces = frags(os.urandom(2000), 500)
    bad = [pieces[0]] + [Fragment(p.message_id, p.index, p.count, p.total, p.digest,
                                  bytes(len(p.data))) for p in pieces[1:]]
    with pytest.raises(ProtocolError, match="digest"):
        for p in bad:
            member.add("dev", p, 0)
    # stale partials expire; the edge resends what was never acked
    member.add("dev", pieces[0], 0)
    member.expire(10**9)
    assert member.dropped == 1


@pytest.mark.parametrize("kind", ["memory", "shared"])
def test_a_forged_fragment_under_the_same_id_never_displaces_the_genuine_partial(kind, tmp_path):
    """Before this change (c1ffc7f) a fragment with the genuine message id and another digest
    replaced the genuine partial, so a device's envelope never completed."""
    genuine = frags(os.urandom(3000), 600)
    forged = frags(os.urandom(3000), 600, mid=genuine[0].message_id)
    r = Reassembler() if kind == "memory" else SharedReassembler(create_engine(f"sqlite:///{tmp_path / 'f.db'}"))
    out = []
    for g, f in zip(genuine, forged):
        out += [r.add("dev", g, 0), r.add("dev", f, 0)]
    done = [m for m in out if m]
    assert b"".join(g.data for g in genuine) in done


@pytest.mark.parametrize("kind", ["memory", "shared"])
def test_one_source_flooding_sheds_only_its_own_partials(kind, tmp_path):
    """Before this change (c1ffc7f) the memory bound was global: another device's flood of
    partials pushed the victim's genuine partial out first (it was the oldest)."""
    victim = frags(os.urandom(4000), 800)
    r = (Reassembler(max_source_bytes=10_000, max_pending_bytes=20_000) if kind == "memory"
         else SharedReassembler(create_engine(f"sqlite:///{tmp_path / 'f.db'}"), max_source_bytes=10_000))
    assert r.add("victim", victim[0], 0) is None
    for i in range(40):  # another device's endless partials, each never completed
        flood = frags(os.urandom(3000), 600, mid=os.urandom(16))
        r.add("attacker", flood[0], i)
        r.add("attacker", flood[1], i)
    done = [m for f in victim[1:] if (m := r.add("victim", f, 50)) is not None]
    assert done and len(done[0]) == 4000
