"""Blocks: what every validator appends after executing a committed batch.

A header names the height, the primary's proposal time ``t``, the Merkle root of the batch's
requests (RFC 6962 over the signed request frames, so an inclusion proof shows a
principal-signed transaction), the hash of the previous header, the state root after
execution and the results root: the Merkle root over one leaf per request,
``{tx: SHA-256(request frame), result: outcome}`` (status, reason, output), so a receipt
can prove *how* a transaction executed, not only that it was ordered. The commit
certificate (2f + 1 commit signatures) certifies the *batch digest* ``H(height, t,
tx_root)``, which is what consensus ordered; the state and results roots cannot be in it
(execution follows commitment) and are instead covered by checkpoint certificates, which
sign the header hash, by the next header's ``prev_hash`` and, in a receipt, by f + 1
validators' signatures on the header hash (:mod:`ledger.receipts`). Certificates are not part of the header hash: two honest validators may hold
different (equally valid) sets of 2f + 1 signatures for the same block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ledger.errors import MessageInvalid
from ledger.messages import DIGEST, FRAMES, Certificate
from medchain.canonical import canonical_bytes
from medchain.fields import Int, Optional, Record, Text, schema, wire
from medchain.merkle import EMPTY_ROOT, MerkleTree, merkle_root

__all__ = ["BlockHeader", "Block", "batch_digest", "tx_root", "genesis_header", "ZERO_HASH",
           "outcome", "result_leaf", "results_root", "results_tree"]

ZERO_HASH = bytes(32)


def tx_root(requests: Sequence[bytes]) -> bytes:
    return merkle_root(requests) if requests else EMPTY_ROOT


# what of a result the results root commits to; the rest (height, index, state root, a
# validator's own audit signature) is implied by the position or differs per validator
OUTCOME_KEYS = ("status", "reason", "output", "of")


def outcome(result: dict) -> dict:
    return {k: result[k] for k in OUTCOME_KEYS if k in result}


def result_leaf(request_digest: bytes, result: dict) -> bytes:
    """The results-tree leaf of one request: its frame's SHA-256 and its outcome."""
    return canonical_bytes({"tx": request_digest, "result": outcome(result)}, check=False)


def results_root(leaves: Sequence[bytes]) -> bytes:
    return merkle_root(leaves) if leaves else EMPTY_ROOT


def results_tree(digests: Sequence[bytes], results: Sequence[dict]) -> MerkleTree:
    return MerkleTree([result_leaf(d, r) for d, r in zip(digests, results, strict=True)])


def batch_digest(seq: int, t: int, root: bytes) -> bytes:
    """What pre-prepares, prepares and commits vote on: the sequence number, the agreed
    time and the requests' Merkle root."""
    return hashlib.sha256(canonical_bytes({"n": seq, "t": t, "root": root})).digest()


COUNT = Int(0)


@schema("block header", MessageInvalid)
@dataclass(frozen=True, slots=True)
class BlockHeader:
    chain: str = wire("chain", Text())
    height: int = wire("height", COUNT)
    t: int = wire("t", COUNT)
    tx_root: bytes = wire("tx_root", DIGEST)
    tx_count: int = wire("tx_count", COUNT)
    prev_hash: bytes = wire("prev", DIGEST)
    state_root: bytes = wire("state", DIGEST)
    results_root: bytes = wire("results", DIGEST)

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls, d: object) -> BlockHeader:
        return cls.SCHEMA.decode(d)

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(canonical_bytes(self.to_wire())).digest()

    @property
    def digest(self) -> bytes:
        """The batch digest consensus agreed on for this height."""
        return batch_digest(self.height, self.t, self.tx_root)


def genesis_header(chain: str, state_root: bytes) -> BlockHeader:
    return BlockHeader(chain, 0, 0, EMPTY_ROOT, 0, ZERO_HASH, state_root, EMPTY_ROOT)


class _CommitProof(Record):
    """A block's certificate travels without the batch: the block holds the requests."""

    def encode(self, value: Certificate) -> dict:
        return super().encode(value.without_requests())


@schema("block", MessageInvalid)
@dataclass(frozen=True, slots=True)
class Block:
    """A header, the signed request frames it orders, and a commit certificate for it."""

    header: BlockHeader = wire("h", Record(BlockHeader))
    requests: tuple[bytes, ...] = wire("r", FRAMES)
    # None only for the genesis block
    cert: Certificate | None = wire("c", Optional(_CommitProof(Certificate)))

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls, d: object) -> Block:
        return cls.SCHEMA.decode(d)

    def proof(self, index: int):
        """Inclusion proof of request ``index`` under ``header.tx_root``."""
        return MerkleTree(self.requests).proof(index)
