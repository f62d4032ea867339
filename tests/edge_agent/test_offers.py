"""Offer freshness: a device refuses a replayed offer and a downgrade that is not a signed
rollback, and remembers what it accepted across a restart."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.rollout import Freshness, ModelManager, ReleaseRefused, ReleaseTrust, check_fresh
from ledger.quorum import Keyring
from medchain.identity import SigningKey
from medchain.protocol import ModelOffer, OfferStage, encode, model_offer_topic

MODEL_KEY = SigningKey.from_seed(b"\x09" * 32)


def offer(issued_ms: int, sequence: int, stage: str = OfferStage.FLEET, device: str = "edge-1"):
    return ModelOffer(device, "g", b"\x01" * 32, "v", stage, issued_ms, sequence)


def test_a_newer_offer_for_a_newer_release_passes():
    check_fresh(offer(10, 5), Freshness(last_offer_ms=9, release_sequence=4))


def test_the_last_accepted_offer_again_changes_nothing():
    check_fresh(offer(10, 5), Freshness(last_offer_ms=10, release_sequence=5))  # retained: comes back


def test_an_older_offer_is_a_replay():
    with pytest.raises(ReleaseRefused, match="replayed"):
        check_fresh(offer(9, 7), Freshness(last_offer_ms=10, release_sequence=5))


@pytest.mark.parametrize("stage", [OfferStage.CANARY, OfferStage.FLEET])
def test_an_older_release_is_a_downgrade_unless_a_rollback(stage):
    with pytest.raises(ReleaseRefused, match="not a signed rollback"):
        check_fresh(offer(11, 4, stage), Freshness(last_offer_ms=10, release_sequence=5))
    check_fresh(offer(11, 4, OfferStage.ROLLBACK), Freshness(last_offer_ms=10, release_sequence=5))


@given(st.integers(0, 50), st.integers(0, 50), st.integers(-1, 50), st.integers(-1, 50),
       st.sampled_from(OfferStage.ALL))
def test_freshness_is_exactly_the_rule(issued, sequence, last, running, stage):
    seen = Freshness(last, running)
    allowed = issued >= last and (sequence >= running or stage == OfferStage.ROLLBACK)
    try:
        check_fresh(offer(issued, sequence, stage), seen)
    except ReleaseRefused:
        assert not allowed
    else:
        assert allowed


def test_a_device_remembers_across_a_restart_and_refuses_and_counts_a_replay(tmp_path):
    trust = ReleaseTrust(MODEL_KEY.public, Keyring([SigningKey.generate().public.raw]))
    device = SigningKey.generate()

    def manager():
        return ModelManager(tmp_path / "models", device_id="edge-1", device_key=device, trust=trust)

    manager()._remember(Freshness(last_offer_ms=100, release_sequence=3))  # as accepting one does
    mgr = manager()  # restarted
    assert mgr.fresh.last_offer_ms == 100
    mgr._handle(model_offer_topic("edge-1"), encode(offer(50, 3).signed(MODEL_KEY)))
    assert mgr.offers_refused == 1 and mgr.fresh.last_offer_ms == 100
    mgr._handle(model_offer_topic("edge-1"), encode(offer(200, 3).signed(SigningKey.generate())))
    assert mgr.offers_refused == 2  # forged: counted too
    (tmp_path / "models" / "freshness.json").write_text("{not json")
    assert manager().fresh == Freshness()  # unreadable: logged, starts over as a new device would
