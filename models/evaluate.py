"""Evaluate an exported model on any data source, the way the edge would run it: the model
card's preprocessing chain, then ONNX Runtime, then the card's decision rule. torch-free.

A model is never scored on images it was trained or selected on: on the very data it was
trained from (same manifest), ``train`` and ``val`` are refused and ``holdout`` is the split
carved there, rebuilt from the card's record and checked against it; on any data, images
identical to a training or validation image (``split.json`` beside the card lists their
digests) are left out of the score and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.card import ModelCard
from models.datasets import Split, load_source
from models.errors import DatasetError, ModelFileError
from models.metrics import classification_metrics
from models.runtime import OnnxModel
from models.splits import HOLDOUT, SplitPlan, carve_source, image_digests
from models.transforms import apply_batch

__all__ = ["evaluate", "card_path_for"]


def card_path_for(model_path: str | Path) -> Path:
    """Where a model's card lives by default: ``model_card.json`` beside the ONNX file."""
    return Path(model_path).with_name("model_card.json")


def evaluate(model_path: str | Path, data: str | Path, split: str = "test", *,
             card_path: str | Path | None = None, labels_csv: str | Path | None = None,
             providers: tuple[str, ...] = ("cpu",), per_image: bool = False) -> dict:
    """Metrics of ``model_path`` on ``split`` of ``data`` (accuracy, precision, recall, f1,
    auc, confusion matrix), with the decision rule its card fixed on validation;
    ``per_image`` adds each image's decided label, in the split's order (``predicted``)."""
    card_path = Path(card_path or card_path_for(model_path))
    card = ModelCard.load(card_path)
    card.check_model_file(model_path)
    # a DICOM folder without a split column is split by patient with the training seed
    source = load_source(data, labels_csv, seed=int(card.training.get("recipe", {}).get("seed", 0)))
    part = _split(card, source, split, str(data))
    part, excluded = _unseen(part, card_path.with_name("split.json"), str(data), split)
    if int(part.labels.max()) >= card.num_classes:
        raise DatasetError(f"{data}: {split} labels go up to {int(part.labels.max())} but the model "
                           f"knows {card.num_classes} classes")
    x = apply_batch(card.preprocessing_chain(), part.images)
    if tuple(x.shape[1:]) != tuple(card.input_shape):
        raise ModelFileError(f"preprocessing gives {tuple(x.shape[1:])}, the card says {card.input_shape}")
    probs = OnnxModel.load(model_path, providers=providers).predict_proba(x)
    metrics = classification_metrics(part.labels, probs, card.decision)
    decided = card.decide(probs)
    return {**({"predicted": decided.tolist()} if per_image else {}),"model_version": card.model_version, "data": str(data), "split": split,
            "data_manifest_sha256": source.manifest_sha256, "decision": card.decision,
            "class_names": list(card.class_names), "excluded_seen_in_training": excluded, **metrics,
            "predicted_counts": np.bincount(decided, minlength=card.num_classes).tolist()}


def _split(card: ModelCard, source, split: str, where: str) -> Split:
    """The split to score, refusing the ones the model learned or was selected on."""
    trained_here = source.manifest_sha256 == card.data.get("manifest_sha256")
    record = card.data.get("split")
    if trained_here and record and split in ("train", "val"):
        raise DatasetError(f"{where}: the model was trained and selected on the {split} images of "
                           f"this data; score it on '{HOLDOUT}' (carved from it) or on other data")
    if split != HOLDOUT:
        return source.split(split)
    if not (trained_here and record):
        raise DatasetError(f"{where}: '{HOLDOUT}' is carved from the data a model was trained on, "
                           "and this is not that data")
    carved, _, again = carve_source(source, SplitPlan(**record["plan"]) if record["plan"] else SplitPlan())
    if again["holdout_sha256"] != record["holdout_sha256"]:
        raise DatasetError(f"{where}: the held-out split rebuilt from the card differs from the one "
                           "training carved")
    return carved.split(HOLDOUT)


def _unseen(part: Split, split_file: Path, where: str, split: str) -> tuple[Split, int]:
    """``part`` without the images identical to ones training saw, and how many those were."""
    try:
        seen = set(json.loads(split_file.read_text()).get("seen_images_sha256", ()))
    except FileNotFoundError:
        return part, 0
    except (OSError, ValueError, AttributeError):
        raise DatasetError(f"{split_file}: unreadable split record") from None
    keep = np.array([d not in seen for d in image_digests(part.images)], bool)
    if keep.all():
        return part, 0
    if not keep.any():
        raise DatasetError(f"{where}: every {split} image is one the model was trained or selected on")
    idx = np.flatnonzero(keep)
    images = part.images[idx] if isinstance(part.images, np.ndarray) else tuple(part.images[i] for i in idx)
    patients = tuple(part.patients[i] for i in idx) if part.patients is not None else None
    return Split(part.name, images, part.labels[idx], patients), int((~keep).sum())
