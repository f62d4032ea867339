"""Reassembly of fragmented messages: a pure state machine (fragments and a clock value in,
complete messages out), bounded in memory.

Fragments of one message may arrive repeated (QoS 1 redelivery) or out of order (the edge
republished after a reconnect); a message is complete when every index is present and the
SHA-256 of the joined bytes equals the digest every fragment carries. A partial is keyed by
``(source, message id, digest)``: a fragment with the same id and another digest starts a
partial of its own and never displaces the genuine one. Fragments cannot be authenticated
before the whole message is (its signature is inside), so memory is bounded twice: per
source (``max_source_bytes``: a device flooding its own topic sheds only its own oldest
partials) and overall (``max_pending_bytes``: the oldest partial anywhere goes). Partials
older than ``max_age_ms`` are dropped too: the edge resends what was never acked, so
dropping a partial loses nothing.

:class:`SharedReassembler` is the same contract over the catalog database, for the members
of an ingest group that each receive only some of an envelope's fragments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, Column, Integer, LargeBinary, MetaData, String, Table, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from medchain.errors import ProtocolError
from medchain.protocol import Fragment

__all__ = ["Reassembler", "SharedReassembler"]


@dataclass(slots=True)
class _Partial:
    count: int
    total: int
    digest: bytes
    first_ms: int
    pieces: dict[int, bytes] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(len(p) for p in self.pieces.values())


_Key = tuple[str, bytes, bytes]  # source, message id, digest


class Reassembler:
    def __init__(self, max_pending_bytes: int = 512 * 1024**2, max_age_ms: int = 10 * 60_000,
                 max_source_bytes: int = 128 * 1024**2):
        self.max_pending_bytes = max_pending_bytes
        self.max_source_bytes = max_source_bytes
        self.max_age_ms = max_age_ms
        self._partials: dict[_Key, _Partial] = {}
        self.dropped = 0

    @property
    def pending_bytes(self) -> int:
        return sum(p.held for p in self._partials.values())

    def source_bytes(self, source: str) -> int:
        return sum(p.held for k, p in self._partials.items() if k[0] == source)

    def add(self, source: str, frag: Fragment, now_ms: int) -> bytes | None:
        """Take one fragment from ``source``; return the whole message once complete."""
        self.expire(now_ms)
        key = (source, frag.message_id, frag.digest)
        partial = self._partials.get(key)
        if partial is None:
            partial = _Partial(frag.count, frag.total, frag.digest, now_ms)
            self._partials[key] = partial
        if (frag.count, frag.total) != (partial.count, partial.total):
            raise ProtocolError(f"fragment {frag.index} of {frag.message_id.hex()}: count or size changed")
        partial.pieces[frag.index] = frag.data
        if len(partial.pieces) < partial.count:
            self._shed(keep=key)
            return None
        del self._partials[key]
        data = b"".join(partial.pieces[i] for i in range(partial.count))
        if len(data) != partial.total or hashlib.sha256(data).digest() != partial.digest:
            raise ProtocolError(f"message {frag.message_id.hex()}: fragments do not add up to their digest")
        return data

    def expire(self, now_ms: int) -> None:
        for key in [k for k, p in self._partials.items() if now_ms - p.first_ms > self.max_age_ms]:
            del self._partials[key]
            self.dropped += 1

    def _shed(self, keep: _Key) -> None:
        """Drop the oldest partials (never ``keep``) until under both bounds: first the
        source's own, then anyone's."""
        source = keep[0]
        while self.source_bytes(source) > self.max_source_bytes:
            mine = [k for k in self._partials if k[0] == source and k != keep]
            if not mine:
                del self._partials[keep]  # one partial alone over the bound: it cannot be kept
                self.dropped += 1
                return
            del self._partials[min(mine, key=lambda k: self._partials[k].first_ms)]
            self.dropped += 1
        while self.pending_bytes > self.max_pending_bytes and len(self._partials) > 1:
            oldest = min((k for k in self._partials if k != keep), key=lambda k: self._partials[k].first_ms)
            del self._partials[oldest]
            self.dropped += 1


_meta = MetaData()
_fragments = Table(
    "fragment_pieces", _meta,  # keyed by digest too (the table "fragments" before was not)
    Column("source", String(128), primary_key=True),
    Column("message_id", String(64), primary_key=True),
    Column("digest", String(64), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("count", Integer, nullable=False),
    Column("total", BigInteger, nullable=False),
    Column("first_ms", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)


class SharedReassembler:
    """Reassembly whose pieces live in the database the members of an ingest group share.

    A broker deals a shared subscription's messages round-robin, so the fragments of one
    envelope land on different members; each member files what it gets here, and the member
    that files the last piece joins the message. Two members finishing at once both join it,
    and ingest's idempotence stores it once. Same contract as :class:`Reassembler`."""

    def __init__(self, engine: Engine, max_age_ms: int = 10 * 60_000, max_source_bytes: int = 128 * 1024**2):
        self.engine = engine
        self.max_age_ms = max_age_ms
        self.max_source_bytes = max_source_bytes
        _meta.create_all(engine)
        self.dropped = 0
        self._next_expiry_ms = 0

    def add(self, source: str, frag: Fragment, now_ms: int) -> bytes | None:
        if now_ms >= self._next_expiry_ms:  # a sweep per second is plenty
            self.expire(now_ms)
            self._next_expiry_ms = now_ms + 1000
        key = ((_fragments.c.source == source) & (_fragments.c.message_id == frag.message_id.hex())
               & (_fragments.c.digest == frag.digest.hex()))
        self._bound(source, len(frag.data))
        try:
            with self.engine.begin() as conn:
                conn.execute(_fragments.insert().values(
                    source=source, message_id=frag.message_id.hex(), idx=frag.index,
                    count=frag.count, total=frag.total, digest=frag.digest.hex(),
                    first_ms=now_ms, data=frag.data))
        except IntegrityError:
            return None  # a redelivered piece: whoever filed it first counts it
        with self.engine.connect() as conn:
            rows = conn.execute(select(_fragments.c.idx, _fragments.c.count, _fragments.c.total,
                                       _fragments.c.digest, _fragments.c.data).where(key)).all()
        mine = rows
        if any((r.count, r.total) != (frag.count, frag.total) for r in mine):
            raise ProtocolError(f"fragment {frag.index} of {frag.message_id.hex()}: count or size changed")
        if len(mine) < frag.count:
            return None
        with self.engine.begin() as conn:
            conn.execute(_fragments.delete().where(key))
        pieces = {r.idx: r.data for r in mine}
        data = b"".join(pieces[i] for i in range(frag.count))
        if len(data) != frag.total or hashlib.sha256(data).digest() != frag.digest:
            raise ProtocolError(f"message {frag.message_id.hex()}: fragments do not add up to their digest")
        return data

    def expire(self, now_ms: int) -> None:
        with self.engine.begin() as conn:
            self.dropped += conn.execute(_fragments.delete().where(
                _fragments.c.first_ms < now_ms - self.max_age_ms)).rowcount or 0

    def _bound(self, source: str, incoming: int) -> None:
        """Keep one source under ``max_source_bytes``: its oldest pieces go first."""
        of_source = _fragments.c.source == source
        with self.engine.begin() as conn:
            held = conn.execute(select(func.coalesce(func.sum(func.length(_fragments.c.data)), 0))
                                .where(of_source)).scalar_one()
            while held + incoming > self.max_source_bytes and held > 0:
                oldest = conn.execute(select(_fragments.c.message_id, _fragments.c.digest)
                                      .where(of_source).order_by(_fragments.c.first_ms).limit(1)).first()
                gone = conn.execute(_fragments.delete().where(
                    of_source & (_fragments.c.message_id == oldest.message_id)
                    & (_fragments.c.digest == oldest.digest)))
                self.dropped += gone.rowcount or 0
                held = conn.execute(select(func.coalesce(func.sum(func.length(_fragments.c.data)), 0))
                                    .where(of_source)).scalar_one()
