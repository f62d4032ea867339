"""The cloud store as a training source: consented images of one modality, labelled by
pseudonym, split by patient.

Pure core, I/O shell. :func:`read_image` and :func:`build_source` turn decrypted parts into a
:class:`models.datasets.DataSource` (kind ``store``) and touch nothing; :func:`collect` asks
the :class:`~cloud.custodian.Custodian` for the catalog's images of one modality (only what
the ledger grants is decrypted) and feeds them to the core.

Each envelope's ``tensor`` part is what the edge's chain (``meta["preprocess"]``) made of the
instance's modality values: ``(frames, 1, S, S)`` in [0, 1]. One frame stands for the
instance (the middle kept frame, as the DICOM-folder loader takes the middle frame). The
edge chain minus its final ``ToChannelsFirst`` is returned as the *prefix*: put in front of
the chain training fits, it makes the model card describe raw modality values -> model
input, so the edge can run the card on what it has. All chosen images must share one edge
chain, or that prefix would be a lie for some of them.

The manifest lists every image used (envelope id, Merkle root, label, split, frame) and the
edge chain; its hash goes to the model card, so a model traces to the ledger's records.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from medchain.canonical import canonical_bytes
from models.datasets import SPLITS, DataSource, Split
from models.errors import TransformError
from models.transforms import Compose, ToChannelsFirst

from cloud.catalog import Catalog, CatalogEntry
from cloud.custodian import AccessReport, Custodian
from cloud.errors import TrainingDataError

__all__ = ["StoreImage", "StoreTrainset", "read_image", "stable_split", "build_source", "candidates", "collect",
           "PURPOSE"]

PURPOSE = "training"
PARTS = ("tensor", "meta")


@dataclass(frozen=True)
class StoreImage:
    """One decrypted instance, reduced to what training needs."""

    envelope_id: str
    merkle_root: str
    patient: str
    label: str | None
    frame: np.ndarray          # (S, S) float32, the edge chain's output for ``frame_index``
    frame_index: int           # which frame of the original instance that is
    preprocess: dict           # the edge chain's config


@dataclass
class StoreTrainset:
    """A store source ready for ``train_run``, with how it was gathered."""

    source: DataSource
    prefix: Compose
    report: AccessReport = field(default_factory=AccessReport)
    skipped: Counter = field(default_factory=Counter)


def read_image(entry: CatalogEntry, parts: dict[str, bytes]) -> StoreImage:
    """Parse a granted envelope's ``tensor`` and ``meta`` parts (raises
    :class:`TrainingDataError` naming the envelope, never a value from it)."""
    where = f"envelope {entry.envelope_id}"
    try:
        meta = json.loads(parts["meta"])
        tensor = np.load(io.BytesIO(parts["tensor"]), allow_pickle=False)
    except (KeyError, ValueError, OSError, EOFError):
        raise TrainingDataError(f"{where}: meta or tensor part unreadable") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("preprocess"), dict):
        raise TrainingDataError(f"{where}: meta lacks the edge's preprocessing chain")
    if tensor.ndim != 4 or tensor.shape[1] != 1 or tensor.shape[0] < 1 or \
            not np.issubdtype(tensor.dtype, np.floating):
        raise TrainingDataError(f"{where}: tensor of shape {tensor.shape} / {tensor.dtype} is not "
                                "float (frames, 1, S, S)")
    kept = meta.get("kept_frames") or list(range(len(tensor)))
    if len(kept) != len(tensor):
        raise TrainingDataError(f"{where}: {len(tensor)} tensor frames but {len(kept)} kept frames")
    label = meta.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise TrainingDataError(f"{where}: label is not a class name")
    mid = len(tensor) // 2
    patient = str(entry.meta.get("patient_token") or meta.get("patient_token") or "")
    if not patient:
        raise TrainingDataError(f"{where}: no patient token")
    return StoreImage(entry.envelope_id, entry.merkle_root, patient, label,
                      np.ascontiguousarray(tensor[mid, 0], dtype=np.float32), int(kept[mid]),
                      meta["preprocess"])


def edge_prefix(preprocess: dict) -> Compose:
    """The edge chain without its final ``ToChannelsFirst``: (H, W) values -> (S, S) in [0, 1]."""
    try:
        chain = Compose.from_config(preprocess)
    except TransformError as exc:
        raise TrainingDataError(f"the edge's preprocessing chain cannot be rebuilt: {exc}") from None
    steps = chain.transforms
    if not steps or not isinstance(steps[-1], ToChannelsFirst) or \
            any(t.is_random for t in steps):
        raise TrainingDataError("the edge's preprocessing chain must be deterministic and end "
                                "with ToChannelsFirst")
    return Compose(steps[:-1])


def stable_split(patients: Sequence[str], seed: int = 0,
                 fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Each patient's split from a hash of its pseudonym and ``seed``, not from a shuffle of
    whoever is in the store today: a patient keeps its split in every later model version
    as new patients arrive (a shuffle moved earlier test patients into training). Where the
    hash leaves a split without a patient, the patient whose hash lies nearest that split's
    range (from a split that keeps another) moves there, so each split holds one (only small
    sets are affected)."""
    def point(p: str) -> float:
        digest = hashlib.sha256(canonical_bytes(["medchain/split", seed, p])).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    cut_val, cut_test = fractions[0], fractions[0] + fractions[1]
    ranges = {"train": (0.0, cut_val), "val": (cut_val, cut_test), "test": (cut_test, 1.0)}
    where = {p: point(p) for p in set(patients)}
    chosen = {p: next(n for n, (lo, hi) in ranges.items() if lo <= u < hi or n == "test")
              for p, u in where.items()}
    if len(where) >= len(ranges):
        for name, (lo, hi) in ranges.items():
            sizes = Counter(chosen.values())
            if sizes[name]:
                continue
            spare = [p for p in where if sizes[chosen[p]] > 1]
            chosen[min(spare, key=lambda p: (max(lo - where[p], where[p] - hi), p))] = name
    return [chosen[p] for p in patients]


def build_source(images: Iterable[StoreImage], modality: str, *, seed: int = 0,
                 skipped: Counter | None = None) -> tuple[DataSource, Compose]:
    """The ``store`` DataSource of labelled ``images`` (unlabelled ones are counted into
    ``skipped['unlabelled']``), split by patient (:func:`stable_split` with ``seed``), and the
    edge prefix chain."""
    skipped = Counter() if skipped is None else skipped
    chosen = []
    for img in images:
        if img.label is None:
            skipped["unlabelled"] += 1
        else:
            chosen.append(img)
    if not chosen:
        raise TrainingDataError(f"no labelled {modality} image among those granted for training")
    chosen.sort(key=lambda i: i.envelope_id)
    chains = Counter(canonical_bytes(i.preprocess) for i in chosen)
    if len(chains) > 1:
        sizes = ", ".join(str(n) for _, n in chains.most_common())
        raise TrainingDataError(
            f"the {len(chosen)} chosen {modality} images were prepared by {len(chains)} different "
            f"edge chains ({sizes} images each); a model card can carry only one: train on the "
            "images of one device profile (or re-prepare them with one chain)")
    prefix = edge_prefix(chosen[0].preprocess)
    shapes = {i.frame.shape for i in chosen}
    if len(shapes) != 1:
        raise TrainingDataError(f"one edge chain gave frames of several shapes {sorted(shapes)}")
    names = tuple(sorted({i.label for i in chosen}))
    if len(names) < 2:
        raise TrainingDataError(f"all {len(chosen)} labelled {modality} images are {names[0]!r}; "
                                "need at least two classes")
    patients = [i.patient for i in chosen]
    if len(set(patients)) < 3:
        raise TrainingDataError(f"{len(set(patients))} patient(s) among the labelled {modality} "
                                "images; a patient-level train/val/test split needs at least 3")
    assigned = stable_split(patients, seed=seed)
    size = next(iter(shapes))
    splits = {}
    for name in SPLITS:
        idx = [k for k, a in enumerate(assigned) if a == name]
        images = (np.stack([chosen[k].frame for k in idx]) if idx
                  else np.zeros((0, *size), np.float32))
        splits[name] = Split(name, images, np.asarray([names.index(chosen[k].label) for k in idx],
                                                      np.int64),
                             tuple(patients[k] for k in idx))
    manifest = {
        "kind": "store", "modality": modality, "purpose": PURPOSE, "class_names": list(names),
        "edge_preprocess": chosen[0].preprocess, "seed": seed,
        "columns": ["envelope_id", "merkle_root", "label", "split", "frame"],
        "images": [[i.envelope_id, i.merkle_root, i.label, a, i.frame_index]
                   for i, a in zip(chosen, assigned)],
    }
    source = DataSource("store", splits, names, 1, (int(size[0]), int(size[1])), (0.0, 1.0),
                        manifest)
    return source, prefix


def candidates(catalog: Catalog, modality: str) -> list[CatalogEntry]:
    """Stored images of ``modality`` whose envelope carries a tensor, oldest first."""
    modality = modality.upper()
    return [e for e in catalog.entries()
            if str(e.meta.get("modality", "")).upper() == modality and e.meta.get("has_tensor")]


def collect(custodian: Custodian, entries: Sequence[CatalogEntry], modality: str, *,
            seed: int = 0, max_images: int | None = None) -> StoreTrainset:
    """Ask for ``entries`` for training (in batches; with ``max_images``, only as many as it
    takes to gather that many labelled images) and build the source from what is granted."""
    if not entries:
        raise TrainingDataError(f"the store holds no {modality} image with a tensor")
    if max_images is not None and max_images < 1:
        raise TrainingDataError("--max-images must be at least 1")
    report, skipped, images = AccessReport(), Counter(), []
    labelled = 0
    position = 0
    while position < len(entries) and (max_images is None or labelled < max_images):
        take = custodian.batch if max_images is None else min(custodian.batch, max_images - labelled)
        chunk = entries[position:position + take]
        position += len(chunk)
        released, part = custodian.release(chunk, PURPOSE, names=PARTS)
        report.merge(part)
        for r in released:
            try:
                img = read_image(r.entry, r.parts)
            except TrainingDataError:
                skipped["malformed"] += 1
                continue
            images.append(img)
            labelled += img.label is not None
    if not images:
        raise TrainingDataError(f"none of the {report.requested} {modality} image(s) asked for "
                                f"could be used: {report.summary()}")
    source, prefix = build_source(images, modality, seed=seed, skipped=skipped)
    return StoreTrainset(source, prefix, report, skipped)
