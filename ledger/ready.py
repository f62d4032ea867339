"""What crosses between the pure replica and its shell (etcd raft's ``Ready``).

The replica returns a :class:`Ready` from every ``step``/``tick``; the shell must make
``blocks``, ``votes``, ``prepared``, ``view`` and ``stable`` durable *before* it sends
``messages`` and ``replies`` (persist, then send: a validator never tells anyone something
it could forget in a crash). A restarted validator hands back what it persisted as a
:class:`Restored`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.blocks import Block
from ledger.messages import Certificate

__all__ = ["BROADCAST", "Ready", "CommittedBlock", "Restored", "BlockReader"]

BROADCAST = -1


@dataclass(slots=True)
class CommittedBlock:
    """An executed block and what the store keeps beside it."""

    block: Block
    time: int                                   # agreed block time (ms)
    results: bytes                              # canonical [[client, rid, result], ...]
    writes: list[tuple[str, bytes | None]]      # state writes (None: deleted)
    attestations: list[tuple[int, bytes]]       # this validator's audit-entry signatures


@dataclass(slots=True)
class Ready:
    messages: list[tuple[int, bytes]] = field(default_factory=list)   # (replica | BROADCAST, frame)
    replies: list[tuple[str, bytes]] = field(default_factory=list)    # (client name, frame)
    blocks: list[CommittedBlock] = field(default_factory=list)
    votes: list[tuple[int, int, bytes]] = field(default_factory=list)  # (view, seq, digest)
    prepared: list[Certificate] = field(default_factory=list)
    view: tuple[int, bool] | None = None        # (view, normal) when it changed
    stable: tuple[int, bytes, tuple] | None = None  # (seq, digest, proof) when it advanced

    def merge(self, other: Ready) -> None:
        self.messages += other.messages
        self.replies += other.replies
        self.blocks += other.blocks
        self.votes += other.votes
        self.prepared += other.prepared
        if other.view is not None:
            self.view = other.view
        if other.stable is not None:
            self.stable = other.stable

    @property
    def must_persist(self) -> bool:
        return bool(self.blocks or self.votes or self.prepared or self.view or self.stable)

    def __bool__(self) -> bool:
        return bool(self.messages or self.replies or self.must_persist)


@dataclass(slots=True)
class Restored:
    """A validator's durable consensus state, as the store read it back."""

    view: int = 0
    normal: bool = True
    stable: tuple[int, bytes, tuple] | None = None
    votes: dict[tuple[int, int], bytes] = field(default_factory=dict)
    prepared: list[Certificate] = field(default_factory=list)


class BlockReader:
    """Read access to persisted blocks (the SQLite store, or memory in simulations)."""

    def block(self, height: int) -> Block | None:  # pragma: no cover - interface
        raise NotImplementedError

    def blocks(self, start: int, end: int) -> Iterable[Block]:
        for h in range(start, end + 1):
            b = self.block(h)
            if b is None:
                return
            yield b
