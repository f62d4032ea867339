"""The store training source's pure core: decrypted parts -> patient-split DataSource and the
edge prefix chain; and train_run with that prefix, whose card maps raw values to the input
training saw. (The ledger, custodian and a real site are in
tests/integration/test_store_training.py.)"""

import io
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cloud.catalog import CatalogEntry, Receipt
from cloud.errors import TrainingDataError
from cloud.trainset import build_source, edge_prefix, read_image, stable_split
from models.card import ModelCard
from models.modality import config_for, prepare
from models.transforms import Compose, ToChannelsFirst, apply_batch, from_config
from scanner_sim import phantoms

TINY_MODEL = {"stem_channels": [8, 16], "embed_dim": 16, "depth": 1, "heads": 2, "head_hidden": 16}
CLASSES = ("healthy", "benign", "malignant")


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def make_parts(k: int, *, label="auto", size=64, frames=1, cfg=None):
    """A catalog entry and the parts the edge would seal for one CR instance: raw modality
    values through the real edge chain (``prepare``)."""
    rng = np.random.default_rng(k)
    lab = CLASSES[k % 3] if label == "auto" else label
    values = np.stack([phantoms.radiograph(lab or "healthy", rng, size=size) for _ in range(frames)])
    values = values.astype(np.float32) + np.float32(k)  # distinct frames for cine
    cfg = cfg or config_for("CR", size=32)
    prepared = prepare(values, cfg)
    meta = {"label": lab, "preprocess": prepared.chain, "kept_frames": list(prepared.kept_frames),
            "modality": "CR", "patient_token": f"P{k // 2:03d}"}
    eid = f"{k:032x}"
    entry = CatalogEntry(eid, "edge-1", k, f"{k:064x}", 1, k, Receipt(1, k),
                         {"modality": "CR", "patient_token": f"P{k // 2:03d}", "has_tensor": True})
    return entry, {"tensor": _npy(prepared.tensor), "meta": json.dumps(meta).encode()}, values


def images(n, **kw):
    return [read_image(*make_parts(k, **kw)[:2]) for k in range(n)]


def test_source_is_split_by_patient_and_lists_what_it_used():
    imgs = images(24) + [read_image(*make_parts(99, label=None)[:2])]
    skipped = Counter()
    source, prefix = build_source(imgs, "CR", seed=3, skipped=skipped)
    assert skipped == {"unlabelled": 1}
    assert source.kind == "store" and source.class_names == ("benign", "healthy", "malignant")
    assert source.image_size == (32, 32) and source.channels == 1 and source.intensity_range == (0.0, 1.0)
    seen = {}
    for name, split in source.splits.items():
        assert len(split) > 0
        for p in split.patients:
            assert seen.setdefault(p, name) == name  # no patient in two splits
    assert sum(len(s) for s in source.splits.values()) == 24
    rows = source.manifest["images"]
    assert sorted(r[0] for r in rows) == sorted(i.envelope_id for i in imgs if i.label)
    assert {r[3] for r in rows} == {"train", "val", "test"}
    # the prefix is the edge chain without its layout step
    chain = from_config(imgs[0].preprocess)
    assert prefix.to_config()["transforms"] == chain.to_config()["transforms"][:-1]
    # seeded: the same images give the same split and manifest, in any order
    again, _ = build_source(list(reversed(imgs)), "CR", seed=3)
    assert again.manifest_sha256 == source.manifest_sha256
    other, _ = build_source(imgs, "CR", seed=4)
    assert other.manifest_sha256 != source.manifest_sha256


def test_middle_kept_frame_stands_for_a_cine_instance():
    entry, parts, values = make_parts(5, frames=5)
    img = read_image(entry, parts)
    kept = json.loads(parts["meta"])["kept_frames"]
    assert img.frame_index == kept[len(kept) // 2]
    # the prefix applied to that raw frame is exactly the stored frame
    np.testing.assert_array_equal(np.squeeze(edge_prefix(img.preprocess)(values[img.frame_index])),
                                  img.frame)


def test_mixed_edge_chains_are_refused_with_a_clear_error():
    imgs = images(12)
    bicubic64 = replace(config_for("CR", size=32), denoise="none")
    imgs += [read_image(*make_parts(k, cfg=bicubic64)[:2]) for k in range(12, 15)]
    with pytest.raises(TrainingDataError, match="2 different edge chains .*12, 3"):
        build_source(imgs, "CR")


@pytest.mark.parametrize("case, pattern", [
    ("one class", "need at least two classes"),
    ("two patients", "needs at least 3"),
    ("none labelled", "no labelled CR image"),
])
def test_sources_that_cannot_train_are_refused(case, pattern):
    if case == "one class":
        imgs = images(8, label="benign")
    elif case == "two patients":
        imgs = images(4)
    else:
        imgs = images(4, label=None)
    with pytest.raises(TrainingDataError, match=pattern):
        build_source(imgs, "CR")


@pytest.mark.parametrize("damage, pattern", [
    (lambda p: {**p, "tensor": b"not npy"}, "unreadable"),
    (lambda p: {**p, "tensor": _npy(np.zeros((2, 2), np.float32))}, "not float"),
    (lambda p: {**p, "meta": json.dumps({"label": "benign"}).encode()}, "preprocessing chain"),
    (lambda p: {"meta": p["meta"]}, "unreadable"),
    (lambda p: {**p, "meta": json.dumps({**json.loads(p["meta"]), "kept_frames": [0, 1]}).encode()},
     "kept frames"),
])
def test_malformed_parts_get_a_clear_error_naming_the_envelope(damage, pattern):
    entry, parts, _ = make_parts(1)
    with pytest.raises(TrainingDataError, match=pattern) as err:
        read_image(entry, damage(parts))
    assert entry.envelope_id in str(err.value)


def test_a_non_deterministic_or_unterminated_edge_chain_is_refused():
    with pytest.raises(TrainingDataError, match="ToChannelsFirst"):
        edge_prefix(Compose([ToChannelsFirst(), *from_config({"name": "Compose", "transforms": [
            {"name": "ScaleIntensity", "low": 0, "high": 1}]}).transforms]).to_config())
    with pytest.raises(TrainingDataError, match="cannot be rebuilt"):
        edge_prefix({"name": "Compose", "transforms": [{"name": "NoSuchStep"}]})


def test_train_run_card_chain_maps_raw_values_to_the_training_input(tmp_path):
    from models.pipeline import train_run
    from models.training import Recipe

    made = [make_parts(k) for k in range(18)]
    imgs = [read_image(e, p) for e, p, _ in made]
    source, prefix = build_source(imgs, "CR", seed=1)
    train_run(source, tmp_path / "run", Recipe(epochs=1, batch_size=16, model=TINY_MODEL,
                                               max_image_size=16), progress=False, prefix=prefix)
    card = ModelCard.load(tmp_path / "run" / "model_card.json")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert card.preprocessing == config["preprocessing"]
    assert card.data["manifest_sha256"] == source.manifest_sha256
    fitted = from_config(config["fitted"])
    raw = np.stack([values[img.frame_index] for (_, _, values), img in zip(made, imgs)])
    seen = apply_batch(fitted, [img.frame for img in imgs])   # what training fed the model
    from_raw = apply_batch(card.preprocessing_chain(), list(raw))  # what the edge will feed it
    assert from_raw.shape[1:] == tuple(card.input_shape) == (1, 16, 16)
    np.testing.assert_array_equal(from_raw, seen)


def _config(tmp_path, training_key=True):
    from cloud.config import parse_config

    ledger = {"genesis": "genesis.json", "ingest_key": "ingest.key"}
    if training_key:
        ledger["training_key"] = "training.key"
    return parse_config({"broker": {}, "ledger": ledger, "store": {"url": "objects"},
                         "database": {"url": f"sqlite:///{tmp_path / 'c.sqlite'}"},
                         "keys": {"custodian": "c.key", "model": "m.key"}}, state_dir=tmp_path)


def test_cloud_train_refuses_before_asking_the_ledger(tmp_path):
    """A missing training key or a used run folder fails first: every request is audited."""
    from cloud.config import ConfigError
    from cloud.training import gather, train_from_store
    from models.errors import ModelError

    with pytest.raises(ConfigError, match="training_key"):
        gather(_config(tmp_path, training_key=False), "CR")
    used = tmp_path / "run"
    used.mkdir()
    (used / "something").write_text("x")
    with pytest.raises(ModelError, match="not empty"):
        train_from_store(_config(tmp_path), "CR", used)  # genesis.json does not even exist


@given(st.lists(st.text(min_size=1, max_size=8), min_size=3, max_size=60, unique=True),
       st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=60, unique=True), st.integers(0, 5))
@example(["00", "10", "0000"], [], 3)  # the hash put nobody in train: filled too
def test_a_patient_keeps_its_split_as_new_patients_arrive(first, later, seed):
    """Model versions train on a growing store: a patient in version 1's test split must not
    be trained on by version 2. Before, a seeded shuffle of whoever was in the store moved
    earlier patients between splits when others joined."""
    v1 = dict(zip(first, stable_split(first, seed)))
    grown = first + [p for p in later if p not in v1]
    v2 = dict(zip(grown, stable_split(grown, seed)))
    assert set(v1.values()) == {"train", "val", "test"} == set(v2.values())
    moved = {p for p in first if v1[p] != v2[p]}
    assert len(moved) <= 4, moved  # only those each version moved to fill an empty split


def test_the_split_follows_the_fractions_on_many_patients():
    patients = [f"P{i:05d}" for i in range(4000)]
    counts = Counter(stable_split(patients, seed=1))
    assert abs(counts["train"] / 4000 - 0.70) < 0.03 and abs(counts["test"] / 4000 - 0.15) < 0.03
