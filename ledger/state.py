"""The replicated key-value state the contracts read and write, and its root.

Keys are strings, values canonical-CBOR-encodable. Each value is encoded once, when written;
the encoded bytes feed the state root and the block store, so no value is encoded twice.

The state root chains the write-sets: ``root_h = SHA-256("medchain/v1/state" || root_{h-1} ||
h || SHA-256(sorted writes of block h))``. Equal roots at a height mean the same sequence of
writes since genesis, hence the same state; computing it costs O(writes), not O(state), which
matters at thousands of transactions a second. It is a commitment, not a membership-proof
structure: what clients verify is a transaction's inclusion in a certified block
(:mod:`ledger.blocks`), and checkpoints sign the header that holds this root.

A journal allows undoing a transaction's writes when a contract rejects it half-way, so a
rejected transaction never leaves partial state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from medchain.canonical import canonical_bytes, decode

__all__ = ["State", "STATE_DOMAIN", "write_set_hash"]

STATE_DOMAIN = b"medchain/v1/state\x00"
_MISSING = object()


def write_set_hash(writes: Iterable[tuple[str, bytes | None]]) -> bytes:
    h = hashlib.sha256()
    for key, value in sorted(writes, key=lambda kv: kv[0]):
        k = key.encode()
        h.update(len(k).to_bytes(4, "big") + k)
        if value is None:
            h.update(b"\xff\xff\xff\xff")
        else:
            h.update(len(value).to_bytes(4, "big") + value)
    return h.digest()


class State:
    """In-memory state with a per-block write-set and a per-transaction undo journal.

    Values returned by :meth:`get` are shared, not copied: callers treat them as immutable
    and write a new value instead of mutating one."""

    __slots__ = ("_data", "root", "_writes", "_journal")

    def __init__(self, items: dict[str, Any] | None = None, root: bytes = bytes(32)):
        self._data: dict[str, Any] = dict(items or {})
        self.root = root
        self._writes: dict[str, bytes | None] = {}
        self._journal: list[tuple[str, Any, Any]] = []  # key, old value, old write entry

    @classmethod
    def from_encoded(cls, items: Iterable[tuple[str, bytes]], root: bytes) -> State:
        return cls({k: decode(v) for k, v in items}, root)

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._data.items())

    def _record(self, key: str) -> None:
        self._journal.append((key, self._data.get(key, _MISSING), self._writes.get(key, _MISSING)))

    def put(self, key: str, value: Any) -> None:
        encoded = canonical_bytes(value, check=False)  # contracts build values from parsed txs
        self._record(key)
        self._data[key] = value
        self._writes[key] = encoded

    def delete(self, key: str) -> None:
        if key not in self._data:
            return
        self._record(key)
        del self._data[key]
        self._writes[key] = None

    def mark(self) -> int:
        return len(self._journal)

    def rollback(self, mark: int) -> None:
        """Undo every write made since :meth:`mark` returned ``mark``."""
        while len(self._journal) > mark:
            key, old, old_write = self._journal.pop()
            if old is _MISSING:
                self._data.pop(key, None)
            else:
                self._data[key] = old
            if old_write is _MISSING:
                self._writes.pop(key, None)
            else:
                self._writes[key] = old_write

    def seal(self, height: int) -> tuple[bytes, list[tuple[str, bytes | None]]]:
        """End the block at ``height``: fold its writes into the root and hand them back
        (``None`` marks a deletion) for the block store."""
        writes = list(self._writes.items())
        self.root = hashlib.sha256(
            STATE_DOMAIN + self.root + height.to_bytes(8, "big") + write_set_hash(writes)
        ).digest()
        self._writes = {}
        self._journal = []
        return self.root, writes
