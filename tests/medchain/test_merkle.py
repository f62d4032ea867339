"""Merkle trees: RFC 6962 known answers, and properties over every size and leaf."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medchain.errors import ProofInvalid
from medchain.merkle import (
    EMPTY_ROOT,
    InclusionProof,
    MerkleTree,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)

# The Certificate Transparency reference leaves and tree heads (RFC 6962 test data).
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PROOF_0_OF_8 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
]


def test_empty_tree_root_is_sha256_of_nothing():
    assert merkle_root([]) == EMPTY_ROOT
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_rfc6962_reference(size):
    assert merkle_root(CT_LEAVES[:size]).hex() == CT_ROOTS[size - 1]


def test_inclusion_proof_matches_rfc6962_reference():
    proof = MerkleTree(CT_LEAVES).proof(0)
    assert [p.hex() for p in proof.path] == CT_PROOF_0_OF_8
    verify_inclusion(bytes.fromhex(CT_ROOTS[7]), CT_LEAVES[0], proof)


def test_leaf_cannot_pose_as_inner_node():
    a, b = b"left", b"right"
    root = merkle_root([a, b])
    # The naive attack: a one-leaf "tree" whose leaf is the concatenated child hashes.
    forged_leaf = leaf_hash(a) + leaf_hash(b)
    assert merkle_root([forged_leaf]) != root
    assert node_hash(leaf_hash(a), leaf_hash(b)) == root


def test_single_leaf_tree():
    tree = MerkleTree([b"only"])
    assert tree.root == leaf_hash(b"only")
    proof = tree.proof(0)
    assert proof.path == ()
    verify_inclusion(tree.root, b"only", proof)


def test_proof_index_out_of_range_is_refused():
    with pytest.raises(IndexError):
        MerkleTree([b"a", b"b"]).proof(2)


leaves_st = st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=70)


@given(leaves_st)
def test_every_leaf_of_every_size_verifies(leaves):
    tree = MerkleTree(leaves)
    for i, leaf in enumerate(leaves):
        proof = tree.proof(i)
        verify_inclusion(tree.root, leaf, InclusionProof.from_wire(proof.to_wire()))


def _flip(data: bytes, bit: int) -> bytes:
    i = bit % (len(data) * 8)
    out = bytearray(data)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


@given(leaves_st, st.data())
def test_any_flipped_bit_in_leaf_proof_or_root_fails(leaves, data):
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    leaf, proof, root = leaves[index], tree.proof(index), tree.root
    bit = data.draw(st.integers(0, 10_000))
    target = data.draw(st.sampled_from(["leaf", "proof", "root"] if proof.path else ["leaf", "root"]))
    if target == "leaf":
        bad_leaf = _flip(leaf, bit) if leaf else b"\x00"
        with pytest.raises(ProofInvalid):
            verify_inclusion(root, bad_leaf, proof)
    elif target == "proof":
        k = data.draw(st.integers(0, len(proof.path) - 1))
        path = list(proof.path)
        path[k] = _flip(path[k], bit)
        with pytest.raises(ProofInvalid):
            verify_inclusion(root, leaf, InclusionProof(proof.index, proof.size, tuple(path)))
    else:
        with pytest.raises(ProofInvalid):
            verify_inclusion(_flip(root, bit), leaf, proof)


@given(leaves_st, st.data())
def test_proof_for_another_position_or_size_fails(leaves, data):
    if len(leaves) < 2 or len(set(leaves)) < len(leaves):
        return
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    other = data.draw(st.integers(0, len(leaves) - 1).filter(lambda j: j != index))
    proof = tree.proof(index)
    with pytest.raises(ProofInvalid):
        verify_inclusion(tree.root, leaves[other], proof)
    with pytest.raises(ProofInvalid):
        verify_inclusion(tree.root, leaves[index], InclusionProof(other, proof.size, proof.path))


def test_malformed_wire_proof_is_refused():
    with pytest.raises(ProofInvalid, match="32 bytes"):
        InclusionProof.from_wire({"index": 0, "size": 2, "path": [b"short"]})
    with pytest.raises(ProofInvalid, match="missing"):
        InclusionProof.from_wire({"index": 0})
