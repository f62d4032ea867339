"""Precision per device: a release carries the run's INT8 and FP16 exports beside FP32, bound by
the hashes its signed card lists; a device serves the variant its profile asks for, FP32 (said
plainly) when the release has none, and the same variant again after a restart."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

from cloud.rollout import RolloutError, build_release, release_transaction
from edge_agent.rollout import ModelManager, ReleaseTrust
from ledger.quorum import Keyring
from medchain.identity import SigningKey
from medchain.protocol import ModelRelease, ModelState, ModelStatus, decode_message, encode
from models.card import ModelCard

pytestmark = pytest.mark.slow


@pytest.fixture
def released(ledger_cluster):
    """``released(run_dir, key)``: the run's release with its MODEL_RELEASED receipt."""
    client = ledger_cluster.client("training")

    def release(run, key):
        rel = build_release(run, key, name="hybrid", now_ms=1)
        result = client.submit(release_transaction(rel))
        assert result.committed or "already released" in result.reason, result.reason
        return dataclasses.replace(rel, receipt=client.model_receipt(rel.model_hash).to_wire())

    yield release
    client.close()


@pytest.fixture
def devices(ledger_cluster, tmp_path):
    """``device(precision, name)``: a model manager whose profile asks for ``precision``."""
    model_key = SigningKey.generate()
    trust = ReleaseTrust(model_key.public, Keyring(ledger_cluster.genesis.validator_keys()))
    device_key = SigningKey.generate()

    def device(precision: str, name: str = "dev") -> ModelManager:
        return ModelManager(tmp_path / name, device_id="edge-p", device_key=device_key,
                            trust=trust, precision=precision)

    return device, model_key


def _images(run, n=24):
    """Validation images of the run's data (raw values, as a device receives them)."""
    with np.load(run.parent / f"data{run.name[-1]}.npz") as data:
        return [img.astype(np.float32) for img in data["val_images"][:n]]


def _served_file(mgr: ModelManager) -> str:
    return mgr.current.model._model.path.name


def test_the_release_carries_the_variants_its_card_lists_and_refuses_a_mismatch(model_runs, tmp_path):
    key = SigningKey.generate()
    card = ModelCard.load(model_runs[0] / "model_card.json")
    rel = build_release(model_runs[0], key, name="hybrid", now_ms=1)
    assert sorted(rel.variants) == ["fp16", "int8"]
    for precision, data in rel.variants.items():
        assert data == (model_runs[0] / card.variants()[precision]["file"]).read_bytes()
    # on the wire and back; unsigned: the signature covers them through the card's hash
    again = decode_message(encode(rel), ModelRelease)
    assert again.variants == rel.variants
    again.verify(key.public)
    assert dataclasses.replace(rel, variants={}).body() == rel.body()
    # a run folder whose int8 file is not the one its card lists is not released
    bad = tmp_path / "bad"
    shutil.copytree(model_runs[0], bad)
    (bad / "model.int8.onnx").write_bytes(b"\x00" + (bad / "model.int8.onnx").read_bytes()[1:])
    with pytest.raises(RolloutError, match="int8"):
        build_release(bad, key, name="hybrid", now_ms=1)


def test_an_int8_device_serves_the_int8_file_and_agrees_with_fp32(devices, released, model_runs):
    device, key = devices
    rel = released(model_runs[0], key)
    int8, fp32 = device("int8", "int8"), device("fp32", "fp32")
    s8, s32 = int8.install(rel, rel.model_hash), fp32.install(rel, rel.model_hash)
    assert s8.state == s32.state == ModelState.INSTALLED, (s8.reason, s32.reason)
    assert (s8.precision, s8.reason, s32.precision) == ("int8", "", "fp32")
    s8.verify(int8._key.public)  # the precision is part of what the device signs
    assert _served_file(int8) == "model.int8.onnx" and _served_file(fp32) == "model.onnx"
    folder = int8.dir / rel.model_hash.hex()
    assert (folder / "model.int8.onnx").read_bytes() == rel.variants["int8"]
    assert not (folder / "model.fp16.onnx").exists()  # only the variant it serves is kept
    # an fp32 device ignores the variants: none written, none cached
    folder32 = fp32.dir / rel.model_hash.hex()
    assert sorted(p.name for p in folder32.iterdir()) == ["model.onnx", "model_card.json", "release.cbor"]
    assert decode_message((folder32 / "release.cbor").read_bytes(), ModelRelease).variants == {}

    images = _images(model_runs[0])
    p8 = [int8.predict("CR", img) for img in images]
    p32 = [fp32.predict("CR", img) for img in images]
    probs8 = np.array([p["probabilities"] for p in p8])
    probs32 = np.array([p["probabilities"] for p in p32])
    assert not np.array_equal(probs8, probs32)  # a different model computed them
    recorded = ModelCard.from_json(rel.card.decode()).variants()["int8"]["agreement_with_fp32"]
    agree = float(np.mean([a["label"] == b["label"] for a, b in zip(p8, p32)]))
    # the card's agreement was measured on the held-out split; 24 other images, 0.1 slack
    assert agree >= recorded - 0.1, (agree, recorded)
    assert np.max(np.abs(probs8 - probs32)) < 0.25


def test_a_tampered_or_unlisted_variant_is_refused(devices, released, model_runs, tmp_path):
    device, key = devices
    rel = released(model_runs[0], key)
    int8, fp32 = device("int8", "int8"), device("fp32", "fp32")
    flipped = bytearray(rel.variants["int8"])
    flipped[len(flipped) // 2] ^= 0x01
    tampered = dataclasses.replace(rel, variants={**rel.variants, "int8": bytes(flipped)})
    for mgr in (int8, fp32):  # card and signature untouched: the card's hash catches it
        status = mgr.install(tampered, rel.model_hash)
        assert status.state == ModelState.REFUSED and "tampered" in status.reason, status.reason
        assert "int8 variant does not match" in status.reason
        assert mgr.current is None
        assert not (mgr.dir / rel.model_hash.hex()).exists()
    # a card that lists no int8 export: int8 bytes slipped into its release are refused
    unlisted_run = tmp_path / "unlisted"
    shutil.copytree(model_runs[0], unlisted_run)
    card = json.loads((unlisted_run / "model_card.json").read_text())
    del card["metrics"]["variants"]["int8"]
    (unlisted_run / "model_card.json").write_text(json.dumps(card))
    unlisted = released(unlisted_run, key)  # same model hash: already on the ledger
    assert sorted(unlisted.variants) == ["fp16"]
    smuggled = dataclasses.replace(unlisted, variants={**unlisted.variants, "int8": rel.variants["int8"]})
    status = int8.install(smuggled, rel.model_hash)
    assert status.state == ModelState.REFUSED and "lists no int8 variant" in status.reason
    # the honest release still installs afterwards
    assert int8.install(rel, rel.model_hash).precision == "int8"


def test_a_release_without_the_variant_serves_fp32_and_says_why(devices, released, model_runs, caplog):
    device, key = devices
    rel = dataclasses.replace(released(model_runs[0], key), variants={})
    int8 = device("int8")
    with caplog.at_level(logging.WARNING, logger="edge_agent.rollout"):
        status = int8.install(rel, rel.model_hash)
    assert status.state == ModelState.INSTALLED
    assert status.precision == "fp32" and _served_file(int8) == "model.onnx"
    assert "profile asks for int8" in status.reason and "no int8 variant" in status.reason
    assert int8.current.note == status.reason
    assert any("no int8 variant: serving fp32" in r.getMessage() for r in caplog.records)


def test_a_restarted_device_serves_the_same_variant_and_re_verifies_it(devices, released, model_runs):
    device, key = devices
    rel = released(model_runs[0], key)
    assert device("int8").install(rel, rel.model_hash).precision == "int8"
    again = device("int8")  # restarted: restored from the cached release
    assert again.current is not None and again.current.model_hash == rel.model_hash
    assert (again.serving_precision(), _served_file(again)) == ("int8", "model.int8.onnx")
    # a corrupted variant file on disk is rewritten from the (re-verified) cached release
    path = again.dir / rel.model_hash.hex() / "model.int8.onnx"
    path.write_bytes(b"\x00" * 64)
    third = device("int8")
    assert third.serving_precision() == "int8" and path.read_bytes() == rel.variants["int8"]
    # a cached release whose variant no longer matches its card is not trusted, even when
    # the bytes are a model that would load (here the FP16 file under the int8 name)
    cache = again.dir / rel.model_hash.hex() / "release.cbor"
    cached = decode_message(cache.read_bytes(), ModelRelease)
    cache.write_bytes(encode(dataclasses.replace(cached, variants={"int8": rel.variants["fp16"]})))
    assert device("int8").current is None


def test_status_without_precision_keeps_its_old_bytes():
    key = SigningKey.from_seed(b"\x05" * 32)
    old = ModelStatus("d", b"\x01" * 32, "v", ModelState.REFUSED, "why", "", 7).signed(key)
    assert "precision" not in old.to_wire() and "precision" not in old.body()
    new = dataclasses.replace(old, precision="int8").signed(key)
    assert new.to_wire()["precision"] == "int8" and new.body()["precision"] == "int8"
    assert decode_message(encode(new), ModelStatus) == new
    with pytest.raises(Exception, match="signature|verif"):
        dataclasses.replace(new, precision="fp32").verify(key.public)
