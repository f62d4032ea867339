"""Blocks: what every validator appends after executing a committed batch.

A header names the height, the primary's proposal time ``t``, the Merkle root of the batch's
requests (RFC 6962 over the signed request frames, so an inclusion proof shows a
principal-signed transaction), the hash of the previous header, the state root after
execution and a hash of the per-transaction results. The commit certificate (2f + 1 commit
signatures) certifies the *batch digest* ``H(height, t, tx_root)``, which is what consensus
ordered; the state root cannot be in it (execution follows commitment) and is instead
covered by checkpoint certificates, which sign the header hash, and by the next header's
``prev_hash``. Certificates are not part of the header hash: two honest validators may hold
different (equally valid) sets of 2f + 1 signatures for the same block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from medchain.canonical import canonical_bytes
from ledger.errors import MessageInvalid
from medchain.merkle import EMPTY_ROOT, MerkleTree, merkle_root
from ledger.messages import Certificate

__all__ = ["BlockHeader", "Block", "batch_digest", "tx_root", "genesis_header", "ZERO_HASH"]

ZERO_HASH = bytes(32)


def tx_root(requests: Sequence[bytes]) -> bytes:
    return merkle_root(requests) if requests else EMPTY_ROOT


def batch_digest(seq: int, t: int, root: bytes) -> bytes:
    """What pre-prepares, prepares and commits vote on: the sequence number, the agreed
    time and the requests' Merkle root."""
    return hashlib.sha256(canonical_bytes({"n": seq, "t": t, "root": root})).digest()


@dataclass(frozen=True, slots=True)
class BlockHeader:
    chain: str
    height: int
    t: int
    tx_root: bytes
    tx_count: int
    prev_hash: bytes
    state_root: bytes
    results_hash: bytes

    def to_wire(self) -> dict:
        return {"chain": self.chain, "height": self.height, "t": self.t, "tx_root": self.tx_root,
                "tx_count": self.tx_count, "prev": self.prev_hash, "state": self.state_root,
                "results": self.results_hash}

    @classmethod
    def from_wire(cls, d: object) -> BlockHeader:
        if not isinstance(d, dict):
            raise MessageInvalid("block header: expected a map")
        try:
            h = cls(d["chain"], d["height"], d["t"], d["tx_root"], d["tx_count"], d["prev"],
                    d["state"], d["results"])
        except KeyError as exc:
            raise MessageInvalid(f"block header: missing field {exc.args[0]!r}") from None
        ints = (h.height, h.t, h.tx_count)
        hashes = (h.tx_root, h.prev_hash, h.state_root, h.results_hash)
        if (not isinstance(h.chain, str) or not all(type(x) is int and x >= 0 for x in ints)
                or not all(isinstance(x, bytes) and len(x) == 32 for x in hashes)):
            raise MessageInvalid("block header: mistyped field")
        return h

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(canonical_bytes(self.to_wire())).digest()

    @property
    def digest(self) -> bytes:
        """The batch digest consensus agreed on for this height."""
        return batch_digest(self.height, self.t, self.tx_root)


def genesis_header(chain: str, state_root: bytes) -> BlockHeader:
    return BlockHeader(chain, 0, 0, EMPTY_ROOT, 0, ZERO_HASH, state_root, EMPTY_ROOT)


@dataclass(frozen=True, slots=True)
class Block:
    """A header, the signed request frames it orders, and a commit certificate for it."""

    header: BlockHeader
    requests: tuple[bytes, ...]
    cert: Certificate | None  # None only for the genesis block

    def to_wire(self) -> dict:
        return {"h": self.header.to_wire(), "r": list(self.requests),
                "c": self.cert.without_requests().to_wire() if self.cert else None}

    @classmethod
    def from_wire(cls, d: object) -> Block:
        if not isinstance(d, dict) or not isinstance(d.get("r"), list):
            raise MessageInvalid("block: expected a map with a request list")
        if not all(isinstance(r, bytes) for r in d["r"]):
            raise MessageInvalid("block: requests must be byte strings")
        cert = Certificate.from_wire(d["c"]) if d.get("c") is not None else None
        return cls(BlockHeader.from_wire(d.get("h")), tuple(d["r"]), cert)

    def proof(self, index: int):
        """Inclusion proof of request ``index`` under ``header.tx_root``."""
        return MerkleTree(self.requests).proof(index)
