"""Signed model rollout on a real ledger and broker: releases the edge must refuse (the old
model keeps serving), a canary rollout across two devices, a halted one, a rollback, and the
edge's predictions committed to the ledger in provable batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest

from cloud.enrolment import enroll, write_enrollment
from cloud.rollout import Rollout, build_release, plan_canary, release_transaction
from edge_agent.rollout import ModelManager, ReleaseTrust
from medchain.identity import SigningKey
from ledger.quorum import Keyring
from medchain_app.cli import main
from medchain.protocol import ModelState

pytestmark = pytest.mark.slow


@pytest.fixture
def released(ledger_cluster, tmp_path):
    """``released(run_dir, key)``: a release of the run, its hash committed by MODEL_RELEASED
    (as the training principal) and its receipt attached."""
    client = ledger_cluster.client("training")

    def release(run, key, submit=True):
        rel = build_release(run, key, name="hybrid", now_ms=1)
        if submit:
            result = client.submit(release_transaction(rel))
            assert result.committed or "already released" in result.reason, result.reason
        receipt = client.model_receipt(rel.model_hash)
        return dataclasses.replace(rel, receipt=receipt.to_wire() if receipt else None)

    yield release
    client.close()


@pytest.fixture
def manager(ledger_cluster, tmp_path):
    model_key = SigningKey.generate()
    trust = ReleaseTrust(model_key.public, Keyring(ledger_cluster.genesis.validator_keys()))
    mgr = ModelManager(tmp_path / "models", device_id="edge-x", device_key=SigningKey.generate(),
                       trust=trust)
    return mgr, model_key


def _tampered(rel):
    onnx = bytearray(rel.onnx)
    onnx[len(onnx) // 2] ^= 0x01
    return dataclasses.replace(rel, onnx=bytes(onnx))


def test_bad_releases_are_refused_and_the_old_model_keeps_serving(manager, released, model_runs,
                                                                  tmp_path):
    mgr, key = manager
    good = released(model_runs[0], key)
    status = mgr.install(good, good.model_hash)
    assert status.state == ModelState.INSTALLED, status.reason
    image = np.random.default_rng(0).integers(0, 4096, (96, 80)).astype(np.float32)
    before = mgr.predict("CR", image)
    assert before["model_hash"] == good.model_hash.hex() and len(before["probabilities"]) == 2
    assert mgr.predict("CT", image) is None  # a CR model does not judge CT images

    other = released(model_runs[1], key)
    stranger = SigningKey.generate()
    by_stranger = build_release(model_runs[1], stranger, name="hybrid", now_ms=1)
    # a valid model whose hash never reached the ledger
    unlisted_run = tmp_path / "unlisted"
    shutil.copytree(model_runs[1], unlisted_run)
    proto = onnx.load(unlisted_run / "model.onnx")
    proto.doc_string = "a model nobody released"
    onnx.save(proto, unlisted_run / "model.onnx")
    card = json.loads((unlisted_run / "model_card.json").read_text())
    card["onnx_sha256"] = hashlib.sha256((unlisted_run / "model.onnx").read_bytes()).hexdigest()
    (unlisted_run / "model_card.json").write_text(json.dumps(card))
    # a file that hashes right, is signed and on the ledger, but is no model
    broken_run = tmp_path / "broken"
    shutil.copytree(model_runs[1], broken_run)
    (broken_run / "model.onnx").write_bytes(b"not an onnx model" * 100)
    card = json.loads((broken_run / "model_card.json").read_text())
    card["onnx_sha256"] = hashlib.sha256((broken_run / "model.onnx").read_bytes()).hexdigest()
    (broken_run / "model_card.json").write_text(json.dumps(card))
    unlisted = released(unlisted_run, key, submit=False)
    cases = {
        "tampered": (_tampered(other), "tampered"),
        "unsigned": (dataclasses.replace(other, signature=b""), "unsigned"),
        "unknown key": (dataclasses.replace(by_stranger, receipt=other.receipt), "unknown key"),
        "forged key id": (dataclasses.replace(by_stranger, key_id=key.public.id,
                                              receipt=other.receipt), "does not verify"),
        "not on ledger": (unlisted, "not on the ledger"),
        "receipt of another model": (dataclasses.replace(unlisted, receipt=other.receipt),
                                     "not on the ledger"),
        "fails to load": (released(broken_run, key), "fails to load"),
    }
    assert unlisted.receipt is None
    for name, (rel, reason) in cases.items():
        status = mgr.install(rel, rel.model_hash)
        assert status.state == ModelState.REFUSED, name
        assert reason in status.reason, (name, status.reason)
        assert mgr.current.model_hash == good.model_hash, name
        assert mgr.predict("CR", image) == before, name
    assert mgr.install(other, other.model_hash).state == ModelState.INSTALLED


def test_a_restarted_device_serves_its_model_again_and_a_corrupt_cache_is_not_trusted(
        manager, released, model_runs, tmp_path, ledger_cluster):
    mgr, key = manager
    good = released(model_runs[0], key)
    assert mgr.install(good, good.model_hash).state == ModelState.INSTALLED
    again = ModelManager(mgr.dir, device_id="edge-x", device_key=SigningKey.generate(), trust=mgr.trust)
    assert again.current is not None and again.current.model_hash == good.model_hash
    folder = mgr.dir / good.model_hash.hex()
    raw = bytearray((folder / "release.cbor").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (folder / "release.cbor").write_bytes(bytes(raw))
    third = ModelManager(mgr.dir, device_id="edge-x", device_key=SigningKey.generate(), trust=mgr.trust)
    assert third.current is None  # re-verified on start-up, and refused


def test_plan_canary_is_deterministic_and_takes_at_least_one():
    devices = [f"d{i}" for i in range(10)]
    canary, rest = plan_canary(devices, 0.25, b"h" * 32)
    assert len(canary) == 3 and sorted(canary + rest) == sorted(devices)
    assert plan_canary(list(reversed(devices)), 0.25, b"h" * 32) == (canary, rest)
    assert len(plan_canary(devices[:1], 0.01, b"x")[0]) == 1


def _second_device(site, site_on):
    """Another edge device enrolled into ``site``'s cloud (same group), started."""
    other = site_on(site.endpoint, broker=site.broker)
    if site.broker is not None:
        other.admit()
    enrollment = enroll(site.config, site.coordinator.fleet, device_id=other.device_id,
                        public_key=other.device_key.public, site="site-a", group="x86-cpu",
                        profile="x86-cpu")
    write_enrollment(enrollment, other.profile.cloud.enrollment)
    other.start_edge()
    return other


def test_canary_rollout_predictions_on_the_ledger_halt_and_rollback(make_site, site_on, model_runs,
                                                                     ledger_cluster, wait_for,
                                                                     tmp_path):
    """Also the downgrade attack (issue 17, item 3): an older signed offer, recorded off the
    broker and played back once a newer model runs, rolled a device back to the older model
    (it sat in the verified cache) before offers carried a release sequence; now it is refused
    and counted."""
    from medchain.mqtt import MqttLink
    from medchain.protocol import ModelOffer, decode_message, model_offer_topic

    site = make_site()
    site.enroll()
    offers = []  # what anyone who can read the device's offer topic records
    recorder = MqttLink(site.endpoint, subscriptions=[(model_offer_topic(site.device_id), 1)],
                        persistent_session=False, on_message=lambda t, p: p and offers.append(p))
    with site.coordinator, recorder:
        site.start_edge()
        other = _second_device(site, site_on)
        agents = {site.device_id: site.agent, other.device_id: other.agent}
        training = ledger_cluster.client("training")
        key = SigningKey.load(site.config.model_key)
        shell = Rollout(endpoint=site.endpoint, fleet=site.coordinator.fleet,
                        database=site.config.database_url, model_key=key)
        lines = []
        with shell:
            first = shell.release(model_runs[0], training)
            report = shell.run(first.model_hash, "x86-cpu", canary_share=0.5, timeout_s=90,
                               progress=lines.append)
            assert report.result == "complete", report.to_dict()
            assert len(report.canary) == 1 and len(report.rest) == 1
            assert sorted(report.healthy) == sorted(agents)
            assert sorted(first.variants) == ["fp16", "int8"]  # they travel; x86-cpu serves fp32
            for agent in agents.values():
                assert agent.models.current.model_hash == first.model_hash
                assert agent.models.precision == agent.profile.inference.precision == "fp32"
                assert agent.stats()["model_precision"] == "fp32"

            # new CR images now carry predictions, committed to the ledger in batches
            sims, result = site.send("CR", studies=2, seed=5, per_study=2)
            assert result.success == 4 and site.settled()
            log = site.coordinator.predictions
            catalog = site.coordinator.catalog
            assert wait_for(lambda: log.pending() == 0 and all(
                log.get(e.envelope_id) and log.get(e.envelope_id)["batch_root"]
                for e in catalog.entries()), 30)
            keyring = Keyring(ledger_cluster.genesis.validator_keys())
            for entry in catalog.entries():
                pred = entry.meta["prediction"]
                assert pred["model_hash"] == first.model_hash.hex()
                proof = log.prove(entry.envelope_id)
                record = proof.verify(keyring)
                assert record["envelope_id"] == entry.envelope_id
                assert record["image_merkle_root"] == entry.merkle_root
                assert record["label"] == pred["label"]
                forged = dict(record, label=1 - record["label"])
                with pytest.raises(Exception, match="(?i)proof|root"):
                    dataclasses.replace(proof, record=forged).verify(keyring)

            # a release every device refuses: the canary refuses, the rest is never offered
            broken_run = tmp_path / "broken"
            shutil.copytree(model_runs[1], broken_run)
            (broken_run / "model.onnx").write_bytes(b"garbage" * 200)
            card = json.loads((broken_run / "model_card.json").read_text())
            card["onnx_sha256"] = hashlib.sha256((broken_run / "model.onnx").read_bytes()).hexdigest()
            card["model_version"] = "hybrid-broken"
            (broken_run / "model_card.json").write_text(json.dumps(card))
            broken = shell.release(broken_run, training)
            report = shell.run(broken.model_hash, "x86-cpu", canary_share=0.5, timeout_s=60)
            assert report.result == "halted", report.to_dict()
            (canary,) = report.canary
            assert "fails to load" in report.refused[canary]
            for agent in agents.values():
                assert agent.models.current.model_hash == first.model_hash

            # a good second model everywhere, then back to the first
            second = shell.release(model_runs[1], training)
            assert shell.run(second.model_hash, "x86-cpu", canary_share=0.5,
                             timeout_s=90).result == "complete"
            assert all(a.models.current.model_hash == second.model_hash for a in agents.values())

            # the downgrade attack: the first model's signed offer, played back
            old = next(p for p in offers if decode_message(p, ModelOffer).model_hash == first.model_hash)
            refused = site.agent.models.offers_refused
            recorder.publish(model_offer_topic(site.device_id), old).wait_for_publish(10)
            assert wait_for(lambda: site.agent.models.offers_refused == refused + 1, 20)
            assert site.agent.models.current.model_hash == second.model_hash

            back = shell.rollback("x86-cpu", timeout_s=90)
            assert back.result == "complete" and back.model_hash == first.model_hash.hex()
            assert all(a.models.current.model_hash == first.model_hash for a in agents.values())
            assert [r["result"] for r in shell.history("x86-cpu")] == [
                "complete", "halted", "complete", "complete"]
            for rel in (first, second, broken):  # Mosquitto would keep them for later runs
                shell.retire(rel.model_hash)
        training.close()
        # the operator's command: rolling back the rollback brings the second model back
        # (from the devices' verified caches: its retained release is gone)
        assert main(["cloud", "rollback", "--config", str(site.cloud_config_file()),
                     "--group", "x86-cpu", "--timeout", "60"]) == 0
        assert all(a.models.current.model_hash == second.model_hash for a in agents.values())
        assert any("healthy" in line for line in lines)


def test_offers_over_the_broker_forged_ones_are_ignored_missing_releases_refused(
        broker_endpoint, ledger_cluster, tmp_path, wait_for, new_device_id):
    from medchain.mqtt import MqttLink
    from medchain.protocol import (ModelOffer, ModelStatus, decode_message, encode,
                                   model_offer_topic, model_status_topic)

    model_key, device_key = SigningKey.generate(), SigningKey.generate()
    device = new_device_id()  # marked: what it leaves retained on Mosquitto is cleared
    trust = ReleaseTrust(model_key.public, Keyring(ledger_cluster.genesis.validator_keys()))
    statuses = []
    watcher = MqttLink(broker_endpoint, subscriptions=[(model_status_topic(device), 1)],
                       persistent_session=False,
                       on_message=lambda t, p: p and statuses.append(decode_message(p, ModelStatus)))
    mgr = ModelManager(tmp_path / "models", device_id=device, device_key=device_key, trust=trust,
                       endpoint=broker_endpoint, fetch_timeout_s=2.0)
    publisher = MqttLink(broker_endpoint, persistent_session=False)
    with watcher, mgr, publisher:
        assert wait_for(lambda: watcher.connected and publisher.connected, 20)
        forged = ModelOffer(device, "g", b"\x07" * 32, "v9", "canary", 1, 0).signed(SigningKey.generate())
        publisher.publish(model_offer_topic(device), encode(forged), retain=True)
        offer = ModelOffer(device, "g", b"\x08" * 32, "v8", "canary", 2, 0).signed(model_key)
        publisher.publish(model_offer_topic(device), encode(offer), retain=True)
        assert wait_for(lambda: statuses, 20)
        (status,) = statuses
        status.verify(device_key.public)
        assert status.model_hash == b"\x08" * 32 and status.state == ModelState.REFUSED
        assert status.reason == "release not available on the broker"
        assert mgr.current is None
        for topic in (model_offer_topic(device), model_status_topic(device)):
            publisher.publish(topic, b"", retain=True)  # leave the broker clean
