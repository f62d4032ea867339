"""The carved held-out split: disjoint, stratified, whole groups, stable for a seed, and
never seen by any choice training makes."""

import numpy as np
import pytest

from models.datasets import DataSource, Split, load_npz
from models.errors import DatasetError
from models.splits import HOLDOUT, SplitPlan, carve, carve_source
from models.synthetic import synthetic_images, write_synthetic_npz


def _labels(n=400, pos=0.7, seed=0):
    return (np.random.default_rng(seed).random(n) < pos).astype(np.int64)


def test_carve_is_disjoint_complete_and_stratified():
    y = _labels()
    c = carve(y, None, SplitPlan(holdout=0.15, val=0.15, seed=3))
    parts = [c.train, c.val, c.holdout]
    assert sum(len(p) for p in parts) == len(y)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    for p in parts:
        assert abs(y[p].mean() - y.mean()) < 0.02  # every split has the file's class balance
    for k in (0, 1):
        assert abs(np.sum(y[c.holdout] == k) - 0.15 * np.sum(y == k)) <= 1


def test_carve_is_stable_for_a_seed_and_moves_with_it():
    y = _labels()
    a, b = carve(y, None, SplitPlan(seed=1)), carve(y, None, SplitPlan(seed=1))
    assert all(np.array_equal(a.indices(s), b.indices(s)) for s in ("train", "val", HOLDOUT))
    assert not np.array_equal(a.holdout, carve(y, None, SplitPlan(seed=2)).holdout)
    # the holdout is cut before validation: how much validation takes does not move it
    assert np.array_equal(a.holdout, carve(y, None, SplitPlan(val=0.3, seed=1)).holdout)


def test_groups_never_straddle_splits():
    y = _labels(300)
    groups = [f"P{i // 3}" for i in range(300)]
    c = carve(y, groups, SplitPlan(seed=0))
    where = {}
    for name in ("train", "val", HOLDOUT):
        for i in c.indices(name):
            assert where.setdefault(groups[i], name) == name


def test_duplicate_images_land_in_one_split(tmp_path):
    x, y = synthetic_images(200, (12, 12), seed=1)
    x[100:150] = x[0]  # fifty copies of one image
    y[100:150] = y[0]
    np.savez(tmp_path / "d.npz", train_images=x, train_labels=y)
    carved, _, record = carve_source(load_npz(tmp_path / "d.npz"), SplitPlan())
    holding = [name for name in ("train", "val", HOLDOUT)
               if any(np.array_equal(img, x[0]) for img in carved.split(name).images)]
    assert len(holding) == 1 and record["by"] == "image content"


def test_carve_source_pools_train_and_val_and_keeps_the_files_own_test(tmp_path):
    path = write_synthetic_npz(tmp_path / "d.npz", {"train": 120, "val": 40, "test": 30})
    carved, _, record = carve_source(load_npz(path), SplitPlan())
    assert record["counts"] == {"train": 112, "val": 24, HOLDOUT: 24, "test": 30}
    assert len(carved.split("test")) == 30


def test_too_few_images_are_refused():
    with pytest.raises(DatasetError, match="too few"):
        carve(np.array([0, 1, 0, 1]), None, SplitPlan())
    with pytest.raises(DatasetError):
        SplitPlan(holdout=0.5, val=0.45)


def test_the_held_out_split_never_influences_a_choice(tmp_path, tiny_model):
    """Two sources equal but for the held-out images (one of them noise) train to
    the same weights, epoch, temperature and threshold, and the same validation scores."""
    from models.pipeline import train_run
    from models.training import Recipe

    x, y = synthetic_images(160, (16, 16), seed=2)
    y = y[:, 0].astype(np.int64)
    plan = SplitPlan(seed=4)
    hold = carve(y, None, plan).holdout
    x2, y2 = x.copy(), y.copy()
    x2[hold] = np.random.default_rng(0).integers(0, 256, x2[hold].shape, dtype=np.uint8)

    def run(images, labels, name):
        src = DataSource("npz", {"train": Split("train", images, labels)}, ("a", "b"), 1, (16, 16),
                         (0.0, 255.0), {"kind": "npz", "name": name})
        return train_run(src, tmp_path / name, Recipe(epochs=3, batch_size=16, model=tiny_model),
                         progress=False, split_plan=plan)

    a, b = run(x, y, "a"), run(x2, y2, "b")
    for key in ("best_epoch", "temperature", "decision"):
        assert a[key] == b[key]
    assert a["hybrid"]["val"] == b["hybrid"]["val"]
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert a["hybrid"][HOLDOUT] != b["hybrid"][HOLDOUT]  # the held-out split did change


def test_the_cloud_stores_patient_split_is_kept_with_its_test_split_held_out():
    """The store splits by a hash of each pseudonym, the same in every model version: carving
    its train+val again would move patients between versions (and a small store has too few
    images to cut twice), so its test split is the held-out one, as it is."""

    def split(name, n, first):
        return Split(name, np.zeros((n, 4, 4), np.float32), np.arange(n) % 2,
                     tuple(f"P{first + i // 2}" for i in range(n)))

    source = DataSource("store", {"train": split("train", 6, 0), "val": split("val", 2, 10),
                                  "test": split("test", 2, 20)}, ("a", "b"), 1, (4, 4), (0.0, 1.0), {})
    kept, cut, record = carve_source(source, SplitPlan())
    assert kept.split("train") is source.splits["train"] and kept.split("val") is source.splits["val"]
    assert kept.split(HOLDOUT).patients == source.splits["test"].patients and "test" not in kept.splits
    assert record["plan"] is None and cut.by == "patient" and list(cut.holdout) == [8, 9]
