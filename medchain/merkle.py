"""Merkle trees with inclusion proofs, as in RFC 6962 / RFC 9162 (Certificate Transparency).

Leaves and inner nodes are hashed with different one-byte prefixes (0x00 and 0x01), so a leaf
can never be presented as an inner node (the second-preimage attack on naive Merkle trees).
Any number of leaves works, including one; the tree of ``n`` leaves splits at the largest
power of two below ``n``, which is the same as building it bottom-up and promoting a lone
last node unchanged to the next level. Verification needs only the root, the leaf and the
proof (which carries the leaf index and the tree size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from medchain.errors import ProofInvalid
from medchain.fields import Bytes, Int, ListOf, schema, wire

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "leaf_hash",
    "node_hash",
    "merkle_root",
    "MerkleTree",
    "InclusionProof",
    "verify_inclusion",
]

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    pairs = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        pairs.append(level[-1])  # a lone last node is promoted unchanged
    return pairs


@schema("inclusion proof", ProofInvalid)
@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Audit path for leaf ``index`` in a tree of ``size`` leaves, siblings bottom-up."""

    index: int = wire("index", Int(0))
    size: int = wire("size", Int(0))
    path: tuple[bytes, ...] = wire("path", ListOf(Bytes(HASH_SIZE), limit=64))

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls, data: object) -> InclusionProof:
        """Parse; :class:`ProofInvalid` names the malformed field."""
        return cls.SCHEMA.decode(data)


class MerkleTree:
    """A built tree over leaf data (for us: SHA-256 digests of chunks)."""

    __slots__ = ("_levels", "size")

    def __init__(self, leaves: Sequence[bytes]):
        self.size = len(leaves)
        level = [leaf_hash(leaf) for leaf in leaves]
        self._levels = [level]
        while len(level) > 1:
            level = _next_level(level)
            self._levels.append(level)

    @property
    def root(self) -> bytes:
        return self._levels[-1][0] if self.size else EMPTY_ROOT

    def proof(self, index: int) -> InclusionProof:
        if not 0 <= index < self.size:
            raise IndexError(f"leaf index {index} outside a tree of {self.size} leaves")
        path = []
        i = index
        for level in self._levels[:-1]:
            sibling = i ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            i //= 2
        return InclusionProof(index, self.size, tuple(path))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    return MerkleTree(leaves).root


def verify_inclusion(root: bytes, leaf: bytes, proof: InclusionProof) -> None:
    """Raise :class:`ProofInvalid` unless ``leaf`` is at ``proof.index`` under ``root``.

    The algorithm of RFC 9162 §2.1.3.2: walk up from the leaf, using the index and size to
    know on which side each sibling sits and where a node was promoted without a sibling.
    """
    if not 0 <= proof.index < proof.size:
        raise ProofInvalid("inclusion proof: index outside the tree")
    fn, sn = proof.index, proof.size - 1
    r = leaf_hash(leaf)
    for p in proof.path:
        if sn == 0:
            raise ProofInvalid("inclusion proof: path longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise ProofInvalid("inclusion proof: does not lead to the expected root")
