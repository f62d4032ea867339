"""Replicas heal: a validator whose block store is damaged sets it aside and rebuilds from its
peers, on a real cluster of 4 validator processes; it refuses to start, with one line, only
when too few peers answer."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time

import pytest

from ledger.cluster import LocalCluster
from ledger.errors import BlockStoreError, LedgerError, StoreDamaged
from ledger.genesis import Params
from ledger.healing import mark_suspect, open_store
from ledger.ready import Ready
from ledger.simulation import sim_genesis
from ledger.transactions import ConsentSet
from ledger.validator import Validator

pytestmark = pytest.mark.slow

VICTIM = 3
PAGE = 4096


def store_path(cluster: LocalCluster, i: int):
    return cluster.workdir / "data" / f"validator-{i}.sqlite"


def overwrite_pages(path) -> None:
    """Garbage over pages 2..5 (page 1, the header and schema, left intact so the file still
    opens and the damage shows only when it is read)."""
    size = path.stat().st_size
    assert size > 6 * PAGE, f"store too small to damage ({size} bytes)"
    with open(path, "r+b") as f:
        f.seek(PAGE)
        f.write(os.urandom(4 * PAGE))


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def submit(cluster: LocalCluster, count: int, start: int) -> int:
    with cluster.client("operator") as op:
        height = 0
        for k in range(start, start + count):
            r = op.submit(ConsentSet(f"tok-{k}", "research", True, k))
            assert r.committed, r.reason
            height = r.height
    return height


def log_of(cluster: LocalCluster, i: int) -> str:
    return (cluster.workdir / "logs" / f"validator-{i}.log").read_text(errors="replace")


@pytest.mark.parametrize("damage", [overwrite_pages, truncate])
def test_a_damaged_store_is_set_aside_and_rebuilt_from_the_peers(tmp_path, damage, cluster_params):
    """Against the code before this change, the restarted validator died at start with
    ``sqlite3.DatabaseError: database disk image is malformed`` (in ``restore_results``, or
    on opening the truncated file), and ``restart`` raised "validator 3 exited"."""
    with LocalCluster(4, tmp_path, params=cluster_params(), log_level="INFO") as cluster:
        submit(cluster, 40, 0)
        cluster.stop(VICTIM)
        damage(store_path(cluster, VICTIM))
        height = submit(cluster, 10, 100)  # the others move on meanwhile
        cluster.restart(VICTIM)
        chain = cluster.wait_converged(min_height=height, timeout_s=60)
        assert len(chain) - 1 >= height
        aside = list((cluster.workdir / "data").glob(f"validator-{VICTIM}.sqlite.damaged-*"))
        assert len(aside) == 1, "the damaged store is kept aside for inspection"
        lines = [line for line in log_of(cluster, VICTIM).splitlines() if "damaged" in line]
        assert len(lines) == 1 and "rebuilding" in lines[0], lines
        assert "Traceback" not in log_of(cluster, VICTIM)
        # and it keeps working as a full member afterwards
        height = submit(cluster, 5, 200)
        cluster.wait_converged(min_height=height, timeout_s=60)


def test_too_few_peers_to_rebuild_refuses_to_start_with_one_line(tmp_path, cluster_params):
    """With only one peer up (f + 1 = 2 needed) a damaged validator cannot rebuild: it exits
    with a one-line reason instead of a traceback, and leaves its store set aside. Against the
    code before this change it died with a DatabaseError traceback."""
    with LocalCluster(4, tmp_path, params=cluster_params(), log_level="INFO") as cluster:
        submit(cluster, 40, 0)
        for i in (1, 2, VICTIM):
            cluster.stop(i)
        overwrite_pages(store_path(cluster, VICTIM))
        cluster.spawn(VICTIM)
        deadline = time.monotonic() + 60
        while cluster.alive(VICTIM) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cluster.alive(VICTIM)
        assert cluster.procs[VICTIM].returncode != 0
        text = log_of(cluster, VICTIM)
        assert "Traceback" not in text
        refusal = [line for line in text.splitlines() if "not starting" in line]
        assert len(refusal) == 1 and "peers" in refusal[0], text[-2000:]
        with pytest.raises(LedgerError):
            cluster.wait_ready([VICTIM], timeout_s=1)


# -- the opening rules, in process ------------------------------------------------------------


def _genesis(seed: int = 3):
    return sim_genesis(random.Random(seed), 4, Params(checkpoint_interval=4, window=16))[0]


def test_a_store_that_failed_while_running_is_set_aside_at_the_next_start(tmp_path):
    """A read or write error while running marks the store suspect and stops the validator;
    the next start sets it aside with the marker and starts from the genesis."""
    genesis = _genesis()
    path = tmp_path / "validator-1.sqlite"
    first = open_store(path, genesis, 1)
    assert first.set_aside is None
    first.store.close()
    mark_suspect(path, "DatabaseError: database disk image is malformed")
    again = open_store(path, genesis, 1)
    assert again.set_aside is not None and (again.set_aside / "validator-1.sqlite").exists()
    assert (again.set_aside / "validator-1.sqlite.suspect").exists()
    assert again.ledger.height == 0
    again.store.close()
    third = open_store(path, genesis, 1)  # the fresh store is sound: used as it is
    assert third.set_aside is None
    third.store.close()


def test_a_store_of_another_chain_or_validator_is_refused_not_healed(tmp_path):
    """A misconfiguration is not damage: the store is left where it is and start refused."""
    path = tmp_path / "validator-1.sqlite"
    open_store(path, _genesis(3), 1).store.close()
    for genesis, vid in ((_genesis(4), 1), (_genesis(3), 2)):
        with pytest.raises(BlockStoreError) as err:
            open_store(path, genesis, vid)
        assert not isinstance(err.value, StoreDamaged)
    assert not list(tmp_path.glob("*damaged*"))


def test_a_store_error_while_running_stops_the_validator_and_marks_the_store(tmp_path):
    """A ``DatabaseError`` under a running validator (here: on its next write) stops it
    instead of leaving it half-alive, and marks the store so the next start heals it."""
    genesis, vkeys, _ = sim_genesis(random.Random(5), 4, Params(checkpoint_interval=4,
                                                                 window=16))
    validator = Validator(genesis, 1, vkeys[1], tmp_path)
    validator._stop = asyncio.Event()

    def broken(ready):
        raise sqlite3.DatabaseError("database disk image is malformed")

    validator.store.persist = broken
    pending = Ready()
    pending.messages.append((0, b"frame"))
    pending.view = (1, True)
    validator._ready = pending
    validator._flush()  # would raise KeyError had it tried to send (no links): nothing sent
    assert validator._stop.is_set()
    assert (tmp_path / "validator-1.sqlite.suspect").exists()
    validator.store.close()
    reopened = open_store(tmp_path / "validator-1.sqlite", genesis, 1)
    assert reopened.set_aside is not None
    reopened.store.close()
