"""Evaluate an exported model on any data source, the way the edge would run it: the model
card's preprocessing chain, then ONNX Runtime, then the card's decision rule. torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.card import ModelCard
from models.datasets import load_source
from models.errors import DatasetError, ModelFileError
from models.metrics import classification_metrics
from models.runtime import OnnxModel
from models.transforms import apply_batch

__all__ = ["evaluate", "card_path_for"]


def card_path_for(model_path: str | Path) -> Path:
    """Where a model's card lives by default: ``model_card.json`` beside the ONNX file."""
    return Path(model_path).with_name("model_card.json")


def evaluate(model_path: str | Path, data: str | Path, split: str = "test", *,
             card_path: str | Path | None = None, labels_csv: str | Path | None = None,
             providers: tuple[str, ...] = ("cpu",)) -> dict:
    """Metrics of ``model_path`` on ``split`` of ``data`` (accuracy, precision, recall, f1,
    auc, confusion matrix), with the decision rule its card fixed on validation."""
    card = ModelCard.load(card_path or card_path_for(model_path))
    card.check_model_file(model_path)
    source = load_source(data, labels_csv)
    part = source.split(split)
    if int(part.labels.max()) >= card.num_classes:
        raise DatasetError(f"{data}: {split} labels go up to {int(part.labels.max())} but the model "
                           f"knows {card.num_classes} classes")
    x = apply_batch(card.preprocessing_chain(), part.images)
    if tuple(x.shape[1:]) != tuple(card.input_shape):
        raise ModelFileError(f"preprocessing gives {tuple(x.shape[1:])}, the card says {card.input_shape}")
    probs = OnnxModel.load(model_path, providers=providers).predict_proba(x)
    metrics = classification_metrics(part.labels, probs, card.decision)
    return {"model_version": card.model_version, "data": str(data), "split": split,
            "data_manifest_sha256": source.manifest_sha256, "decision": card.decision,
            "class_names": list(card.class_names), **metrics,
            "predicted_counts": np.bincount(card.decide(probs), minlength=card.num_classes).tolist()}
