"""The pure parts of rollout and the prediction log: canary planning, the rollout step
decision, and what becomes a committed prediction record."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.catalog import CatalogEntry, Receipt
from cloud.predictions import prediction_record
from cloud.rollout import DeviceView, RolloutError, plan_canary, rollout_step
from medchain.protocol import Heartbeat, ModelState, ModelStatus

devices = st.lists(st.text("abcdef0123456789-", min_size=1, max_size=12), unique=True, max_size=40)


@given(devices, st.floats(0.01, 1.0), st.binary(min_size=32, max_size=32), st.randoms())
def test_plan_canary_partitions_deterministically(group, share, salt, rnd):
    canary, rest = plan_canary(group, share, salt)
    assert sorted(canary + rest) == sorted(group)
    if group:
        assert 1 <= len(canary) <= len(group) and len(canary) >= min(len(group), share * len(group))
    shuffled = list(group)
    rnd.shuffle(shuffled)
    assert plan_canary(shuffled, share, salt) == (canary, rest)


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_plan_canary_refuses_a_bad_share(share):
    with pytest.raises(RolloutError):
        plan_canary(["a"], share, b"x" * 32)


H, OTHER = b"\x01" * 32, b"\x02" * 32


def _status(state, model_hash=H, sent=100, reason=""):
    return ModelStatus("d", model_hash, "v2", state, reason, "v2", sent)


def _beat(version="v2", sent=200, state="ok"):
    return Heartbeat("d", sent, 0, 0, 0, version, state)


@given(st.lists(st.sampled_from(["none", "refused", "installed-no-beat", "stale-beat",
                                 "healthy", "unhealthy", "other-model"]), max_size=20))
def test_rollout_step_puts_every_device_in_exactly_one_bucket(kinds):
    views = {}
    for i, kind in enumerate(kinds):
        views[f"d{i}"] = {
            "none": DeviceView(),
            "refused": DeviceView(_status(ModelState.REFUSED, reason="fails to load"), _beat("v1")),
            "installed-no-beat": DeviceView(_status(ModelState.INSTALLED), None),
            "stale-beat": DeviceView(_status(ModelState.INSTALLED), _beat("v1", sent=50)),
            "healthy": DeviceView(_status(ModelState.INSTALLED), _beat()),
            "unhealthy": DeviceView(_status(ModelState.INSTALLED), _beat(state="disk-full")),
            "other-model": DeviceView(_status(ModelState.REFUSED, model_hash=OTHER), _beat("v1")),
        }[kind]
    names = [f"d{i}" for i in range(len(kinds))]
    healthy, refused, waiting = rollout_step(names, H, "v2", views)
    assert sorted(healthy + list(refused) + waiting) == sorted(names)
    for name, kind in zip(names, kinds):
        bucket = "healthy" if name in healthy else "refused" if name in refused else "waiting"
        assert bucket == {"healthy": "healthy", "refused": "refused", "unhealthy": "refused"}.get(
            kind, "waiting"), kind


def _entry(meta):
    return CatalogEntry("ab" * 16, "edge-1", 3, "cd" * 32, 10, 5, Receipt(1, 0), meta)


def test_prediction_records_bind_the_image_and_refuse_malformed_ones():
    good = {"label": 1, "class_name": "benign", "probabilities": [0.2, 0.7, 0.1],
            "model_version": "hybrid-x", "model_hash": "ef" * 32}
    record = prediction_record(_entry({"prediction": good}))
    assert record["image_merkle_root"] == "cd" * 32 and record["envelope_id"] == "ab" * 16
    assert prediction_record(_entry({})) is None
    for bad in ({**good, "probabilities": [float("nan")]}, {**good, "model_hash": "zz"},
                {k: v for k, v in good.items() if k != "label"}, "not a map"):
        assert prediction_record(_entry({"prediction": bad})) is None
