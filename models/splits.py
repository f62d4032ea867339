"""The held-out split that no choice ever sees, carved from the training data.

``medchain train`` pools a source's train and val splits and cuts them again, in this
order: first a *holdout* (the carved test split), then validation, the rest is train. The
cut is stratified by class and made of whole groups: a group is a patient where the source
knows patients, else an image's exact content (so duplicate images never straddle splits).
It is a pure function of the labels, the groups and a :class:`SplitPlan` (recorded in the
run folder and the card), so evaluation can rebuild the holdout and check it is the same.
The epoch, temperature and threshold are chosen on validation; the holdout is scored once,
at the end. A source's own ``test`` split, if any, is left as it is and reported apart.
torch-free: evaluation uses it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

import numpy as np

from models.datasets import DataSource, Split
from models.errors import DatasetError

__all__ = ["HOLDOUT", "SplitPlan", "Carve", "carve", "image_digests", "carve_source",
           "indices_digest"]

HOLDOUT = "holdout"
_POOLED = ("train", "val")


@dataclass(frozen=True)
class SplitPlan:
    """How to cut the pooled train+val images: fractions of images, and the seed."""

    holdout: float = 0.15
    val: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.holdout < 1 and 0 < self.val < 1 and self.holdout + self.val < 0.9):
            raise DatasetError("split plan needs 0 < holdout, 0 < val and holdout + val < 0.9")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Carve:
    """Indices (into the pooled train-then-val order) of each carved split, sorted."""

    train: np.ndarray
    val: np.ndarray
    holdout: np.ndarray
    by: str

    def indices(self, name: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, HOLDOUT: self.holdout}[name]


def indices_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, "<i8").tobytes()).hexdigest()


def image_digests(images) -> list[str]:
    """SHA-256 of each image's bytes (shape and dtype included)."""
    out = []
    for img in images:
        a = np.ascontiguousarray(img)
        out.append(hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest())
    return out


def carve(labels: np.ndarray, groups, plan: SplitPlan) -> Carve:
    """Cut ``labels`` (with a group per item, or None for one group per item) into train,
    val and holdout: per class (a group's majority class), groups are shuffled with
    ``plan.seed`` and taken in order, the first ``holdout`` fraction of images to the
    holdout, the next ``val`` fraction to validation."""
    labels = np.asarray(labels, np.int64).ravel()
    n = len(labels)
    by = "image" if groups is None else "group"
    keys = np.arange(n) if groups is None else np.asarray(groups)
    if len(keys) != n:
        raise DatasetError(f"{len(keys)} groups for {n} labels")
    # groups numbered by first appearance, not by key, so the cut depends on the order of
    # the items and not on what they hold (a content digest as key would move it)
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    inv = rank[inv.ravel()]
    size = np.bincount(inv, minlength=len(uniq))
    top = int(labels.max(initial=0)) + 1
    votes = np.zeros((len(uniq), top), np.int64)
    np.add.at(votes, (inv, labels), 1)
    major = votes.argmax(axis=1)
    rng = np.random.default_rng([plan.seed, 0x5EED])
    to = np.zeros(len(uniq), np.int8)  # 0 train, 1 val, 2 holdout
    for c in range(top):
        g = rng.permutation(np.flatnonzero(major == c))
        if not len(g):
            continue
        total = int(size[g].sum())
        start = np.cumsum(size[g]) - size[g]
        h, v = round(plan.holdout * total), round(plan.val * total)
        to[g] = np.where(start < h, 2, np.where(start < h + v, 1, 0))
    item = to[inv]
    parts = [np.flatnonzero(item == k) for k in (0, 1, 2)]
    if any(len(p) == 0 for p in parts):
        raise DatasetError(f"{n} images are too few to carve train, validation and held-out "
                           f"splits ({', '.join(str(len(p)) for p in parts)})")
    return Carve(parts[0], parts[1], parts[2], by)


def _take(images, idx: np.ndarray):
    if isinstance(images, np.ndarray):
        return images[idx]
    return tuple(images[i] for i in idx)


def _pool(source: DataSource) -> tuple[object, np.ndarray, tuple[str, ...] | None]:
    parts = [source.splits[s] for s in _POOLED if s in source.splits and len(source.splits[s])]
    if not parts:
        raise DatasetError(f"{source.kind} source has no train or val images to train on")
    arrays = [p.images for p in parts]
    if all(isinstance(a, np.ndarray) for a in arrays) and len({a.shape[1:] for a in arrays}) == 1:
        images = np.concatenate(arrays)
    else:
        images = tuple(img for a in arrays for img in a)
    labels = np.concatenate([p.labels for p in parts])
    patients = (tuple(x for p in parts for x in p.patients)
                if all(p.patients is not None for p in parts) else None)
    return images, labels, patients


def _kept_split(source: DataSource) -> tuple[DataSource, Carve, dict]:
    """The cloud store's own split (by patient, from a hash of each pseudonym: the same in
    every model version) kept as it is, its test split held out: carving again would move
    patients between versions, and a small store has too few images to cut twice."""
    sizes = [len(source.splits[k]) for k in ("train", "val", "test")]
    ends = np.cumsum(sizes)
    cut = Carve(np.arange(0, ends[0]), np.arange(ends[0], ends[1]), np.arange(ends[1], ends[2]), "patient")
    splits = {"train": source.splits["train"], "val": source.splits["val"],
              HOLDOUT: replace(source.splits["test"], name=HOLDOUT)}
    record = {"rule": "the store's split by patient, stable across model versions; its test split held out",
              "by": cut.by, "plan": None, "counts": {k: len(v) for k, v in splits.items()},
              "holdout_sha256": indices_digest(cut.holdout)}
    return replace(source, splits=splits), cut, record


def carve_source(source: DataSource, plan: SplitPlan) -> tuple[DataSource, Carve, dict]:
    """``source`` with its train and val replaced by the carved train, val and holdout
    (its own test split kept), the carve, and the record the card and run folder keep. The
    cloud store's stable patient split is kept instead (:func:`_kept_split`)."""
    if source.kind == "store" and all(len(source.splits.get(k, ())) for k in ("train", "val", "test")):
        return _kept_split(source)
    images, labels, patients = _pool(source)
    digests = image_digests(images)
    groups = list(patients) if patients is not None else digests
    cut = carve(labels, groups, plan)
    cut = replace(cut, by="patient" if patients is not None else "image content")
    splits: dict[str, Split] = {}
    for name in ("train", "val", HOLDOUT):
        idx = cut.indices(name)
        splits[name] = Split(name, _take(images, idx), labels[idx],
                             tuple(patients[i] for i in idx) if patients is not None else None)
    if "test" in source.splits and len(source.splits["test"]):
        splits["test"] = source.splits["test"]
    record = {"rule": "pooled train+val, holdout carved first, then val; stratified by class, "
                      "whole groups", "by": cut.by, "plan": plan.to_dict(),
              "counts": {k: len(splits[k]) for k in splits},
              "holdout_sha256": indices_digest(cut.holdout)}
    return replace(source, splits=splits), cut, record
