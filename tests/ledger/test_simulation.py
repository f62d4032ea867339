"""Randomized simulation of the pure replicas over many seeds: dropped, delayed (reordered),
duplicated messages and crash-restarts; safety always, liveness once the network heals.

CI runs a fast portion (a few seconds). More seeds and harsher faults:
``MEDCHAIN_SIM_SEEDS=500 MEDCHAIN_SIM_LONG=1 pytest tests/ledger/test_simulation.py`` or
``medchain ledger simulate --seeds 500 --long``.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.blocks import BlockHeader
from ledger.simulation import Faults, SafetyViolation, Simulation, run_seeds

SEEDS = int(os.environ.get("MEDCHAIN_SIM_SEEDS", "16"))
LONG = os.environ.get("MEDCHAIN_SIM_LONG") == "1"


def test_many_seeds_stay_safe_and_live():
    failures = run_seeds(0, SEEDS, long=LONG)
    assert failures == [], failures


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32), drop=st.sampled_from([0.0, 0.1, 0.25]),
       dup=st.sampled_from([0.0, 0.2]), crashes=st.integers(0, 3))
def test_property_any_schedule_is_safe_and_heals(seed, drop, dup, crashes):
    """Hypothesis picks the schedule (seed) and the fault mix; shrinking finds a minimal one."""
    sim = Simulation(seed, faults=Faults(drop=drop, duplicate=dup, max_delay_ms=80,
                                         crashes=crashes, faulty_until_ms=2500), requests=15)
    sim.run(60_000)
    sim.check_converged()
    assert sim.done(), sim.report()


def test_seven_replicas_tolerate_two_faults():
    for seed in range(3):
        sim = Simulation(seed, n=7, faults=Faults(drop=0.1, duplicate=0.1, max_delay_ms=50,
                                                  crashes=4, faulty_until_ms=3000),
                         requests=30)
        sim.run(60_000)
        sim.check_converged()
        assert sim.done(), sim.report()


def test_harsh_faults_still_converge_after_healing():
    sim = Simulation(1234, faults=Faults(drop=0.35, duplicate=0.3, max_delay_ms=300, crashes=5,
                                         faulty_until_ms=6000), requests=60)
    report = sim.run(120_000)
    sim.check_converged()
    assert sim.done(), report
    assert report.view >= 1 and report.crashes >= 1  # the faults really bit


def test_a_run_is_reproducible_from_its_seed():
    def once():
        sim = Simulation(42, faults=Faults(drop=0.1, duplicate=0.1, crashes=2))
        report = sim.run(60_000)
        return report, sim.nodes[0].store.hashes(0, 10**6)
    assert once() == once()


def test_the_harness_detects_divergence():
    """The safety check is real: a replica whose block differs is caught."""
    sim = Simulation(5, faults=Faults(faulty_until_ms=0), requests=5)
    sim.run(10_000)
    node = sim.nodes[2]
    header = node.store.header(1)
    forged = BlockHeader(header.chain, 1, header.t, header.tx_root, header.tx_count,
                         header.prev_hash, b"\x13" * 32, header.results_root)
    node.store.db.execute("update blocks set hash = ? where height = 1", (forged.hash,))
    from medchain.canonical import canonical_bytes
    node.store.db.execute("update blocks set header = ? where height = 1",
                          (canonical_bytes(forged.to_wire()),))
    with pytest.raises(SafetyViolation):
        sim.check_converged()


@pytest.mark.parametrize("seed", range(6))
def test_a_replaying_validator_never_forces_a_view_change(seed):
    """Validator 3 keeps re-sending its old messages (ledger.byzantine's replay mode, as in the
    process test). In virtual time, where nothing but the protocol can delay a block, every
    replay is dropped and the view never moves: replays are no liveness attack."""
    sim = Simulation(seed, faults=Faults(faulty_until_ms=0), requests=80, byzantine={3: "replay"})
    report = sim.run(60_000)
    sim.check_converged()
    assert sim.done(), report
    assert report.view == 0
    replayed = sum(v for (sender, reason), v in _dropped_from(sim).items()
                   if sender == 3 and reason in ("stale", "duplicate", "late"))
    assert sim.byzantine[3].lies > 0 and replayed > 0


def _dropped_from(sim):
    from collections import Counter

    total = Counter()
    for node in sim.nodes[:3]:
        total.update(node.replica.dropped_from)
    return total
