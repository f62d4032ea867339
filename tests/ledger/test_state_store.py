"""State roots, the undo journal, the SQLite block store and the genesis file."""

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.blocks import Block
from ledger.errors import GenesisError, BlockStoreError
from ledger.execution import Ledger
from ledger.genesis import Genesis, Params, make_local_genesis
from medchain.identity import SigningKey
from ledger.messages import Request, sign_frame
from ledger.ready import CommittedBlock, Ready
from ledger.state import State
from ledger.store import BlockStore
from ledger.transactions import ConsentSet

keys = st.text(min_size=1, max_size=6)
values = st.one_of(st.integers(), st.text(max_size=5), st.binary(max_size=5))
ops = st.lists(st.tuples(keys, st.one_of(st.none(), values)), max_size=30)


def apply(state, operations):
    for k, v in operations:
        if v is None:
            state.delete(k)
        else:
            state.put(k, v)


@given(ops, ops)
def test_rollback_undoes_exactly_what_followed_the_mark(first, second):
    s = State()
    apply(s, first)
    snapshot = dict(s.items())
    mark = s.mark()
    apply(s, second)
    s.rollback(mark)
    assert dict(s.items()) == snapshot
    reference = State()
    apply(reference, first)
    assert s.seal(1) == reference.seal(1)  # the write-set forgot the rolled-back writes too


@given(st.dictionaries(keys, values, max_size=20), st.randoms())
def test_root_depends_on_the_writes_not_their_order(writes, rnd):
    a, b = State(), State()
    items = list(writes.items())
    for k, v in items:
        a.put(k, v)
    rnd.shuffle(items)
    for k, v in items:
        b.put(k, v)
    assert a.seal(1)[0] == b.seal(1)[0]


def test_root_chains_heights_and_changes_with_any_write():
    a, b = State(), State()
    a.put("k", 1)
    b.put("k", 2)
    assert a.seal(1)[0] != b.seal(1)[0]
    c, d = State(), State()
    c.put("k", 1)
    d.put("k", 1)
    assert c.seal(1)[0] != d.seal(2)[0]


# -- store -----------------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path):
    genesis = make_local_genesis(tmp_path, genesis_time_ms=1_000_000)
    key = SigningKey.load(tmp_path / "keys" / "operator.key")
    return genesis, key, tmp_path


def block_of(ledger, key, rid_base, count, t):
    frames = [sign_frame(Request("operator", rid_base + i, t,
                                 ConsentSet(f"p{i}", "research", True, t).to_wire()), key)[1]
              for i in range(count)]
    ex = ledger.execute(ledger.height + 1, t, frames)
    ready = Ready(blocks=[CommittedBlock(Block(ex.header, tuple(frames), None), ex.time,
                                         ex.results, ex.writes, ex.attestations)])
    return ready, frames


def test_store_persists_and_restores_state_blocks_and_dedup(setup):
    genesis, key, tmp = setup
    store = BlockStore(tmp / "v0.sqlite")
    ledger, restored = store.restore(genesis, 0)
    assert ledger.height == 0 and restored.view == 0 and restored.normal
    ready, frames = block_of(ledger, key, 1, 3, 1_001_000)
    ready.votes.append((0, 1, ledger.header.digest))
    ready.view = (2, False)
    store.persist(ready)
    root = ledger.header.state_root
    store.close()

    store = BlockStore(tmp / "v0.sqlite")
    again, restored = store.restore(genesis, 0)
    assert again.height == 1 and again.header.state_root == root
    assert dict(again.state.items()) == dict(ledger.state.items())
    assert restored.view == 2 and restored.normal is False
    assert restored.votes == {(0, 1): ledger.header.digest}
    assert again.result_for("operator", 1)["status"] == "committed"  # dedup survived
    assert again.result_for("operator", 1)["state_root"] == root
    assert store.block(1).requests == tuple(frames)
    assert [h for h, _, _ in store.hashes(0, 9)] == [0, 1]


def test_stable_checkpoint_prunes_votes_and_prepared(setup):
    genesis, _, tmp = setup
    store = BlockStore(tmp / "v1.sqlite")
    store.restore(genesis, 1)
    store.persist(Ready(votes=[(0, 3, b"a" * 32), (0, 9, b"b" * 32)]))
    store.persist(Ready(stable=(8, b"d" * 32, ((0, b"s" * 64),))))
    _, restored = store.restore(genesis, 1)
    assert restored.votes == {(0, 9): b"b" * 32}
    assert restored.stable[0] == 8


def test_store_refuses_another_chain_or_validator(setup, tmp_path_factory):
    genesis, _, tmp = setup
    store = BlockStore(tmp / "v2.sqlite")
    store.restore(genesis, 2)
    with pytest.raises(BlockStoreError, match="validator 2"):
        store.restore(genesis, 3)
    other = make_local_genesis(tmp_path_factory.mktemp("other"))
    with pytest.raises(BlockStoreError, match="another chain"):
        store.restore(other, 2)


def test_a_corrupt_store_file_is_refused(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(BlockStoreError):
        BlockStore(path)


# -- genesis ---------------------------------------------------------------------------------


def test_genesis_round_trips_and_keys_are_private(tmp_path):
    g = make_local_genesis(tmp_path, 4)
    assert Genesis.load(tmp_path / "genesis.json") == g
    assert g.n == 4 and g.f == 1
    for key in (tmp_path / "keys").iterdir():
        assert key.stat().st_mode & 0o077 == 0
    text = (tmp_path / "genesis.json").read_text()
    assert "PRIVATE" not in text


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d["validators"].pop(), "3f \\+ 1"),
    (lambda d: d.update(f=2), "f=2"),
    (lambda d: d["validators"][1].update(public_key=d["validators"][0]["public_key"]), "twice"),
    (lambda d: d["validators"][1].update(public_key="zz"), "hex"),
    (lambda d: d["permissions"].update(x=["NOPE"]), "unknown transaction"),
    (lambda d: d["policies"]["default"].update(marketing=[]), "purposes"),
    (lambda d: d.update(version=9), "version"),
    (lambda d: d.pop("chain_id"), "malformed"),
    (lambda d: d["params"].update(window=1), "window"),
])
def test_bad_genesis_files_are_refused(tmp_path, mutate, why):
    make_local_genesis(tmp_path, 4)
    path = tmp_path / "genesis.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(GenesisError, match=why):
        Genesis.load(path)


def test_missing_or_non_json_genesis(tmp_path):
    with pytest.raises(GenesisError, match="not found"):
        Genesis.load(tmp_path / "nope.json")
    (tmp_path / "g.json").write_text("{not json")
    with pytest.raises(GenesisError, match="not JSON"):
        Genesis.load(tmp_path / "g.json")


def test_params_validate():
    with pytest.raises(GenesisError):
        Params(max_batch=0)


def test_ledger_rejects_out_of_order_execution(setup):
    genesis, _, _ = setup
    with pytest.raises(ValueError, match="expected height 1"):
        Ledger(genesis).execute(5, 0, [])
