"""Edge inference: an exported model and its card, run with ONNX Runtime on each new image.

Execution providers come from the firmware profile in order (``tensorrt``, ``cuda``,
``cpu``); one that this build or device cannot offer is skipped with a logged reason and
CPU is always the last resort. The image goes through the card's own preprocessing chain
(the one training used), and a prediction carries class, probabilities and model version.

Loading is not trusting: :meth:`EdgeModel.load` checks only that the file is a loadable
model that fits its card. Verifying the release (signature, hash, ledger record) is a
separate step that must run before ``load``; :func:`check_integrity` is the hash part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medchain.errors import MedChainError
from models.card import ModelCard
from models.errors import ModelFileError
from models.runtime import OnnxModel
from models.transforms import Transform, apply_batch

__all__ = ["DEFAULT_PROVIDERS", "Prediction", "InferenceError", "ModelFileError", "EdgeModel",
           "check_integrity"]

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("tensorrt", "cuda", "cpu")


class InferenceError(MedChainError):
    """An image the model cannot be run on (not an image, or not one the chain accepts)."""


@dataclass(frozen=True)
class Prediction:
    label: int
    class_name: str
    probabilities: tuple[float, ...]
    model_version: str

    def to_dict(self) -> dict:
        return {"label": self.label, "class_name": self.class_name,
                "probabilities": list(self.probabilities), "model_version": self.model_version}


def check_integrity(model_path: str | Path, card: ModelCard) -> None:
    """Raise :class:`ModelFileError` unless the file's SHA-256 is the one its card names."""
    card.check_model_file(model_path)


class EdgeModel:
    """A loaded model ready to classify raw images."""

    def __init__(self, model: OnnxModel, card: ModelCard) -> None:
        if model.input_shape != tuple(card.input_shape):
            raise ModelFileError(f"{model.path.name}: input {model.input_shape} does not match "
                                 f"its card's {tuple(card.input_shape)}")
        if model.num_classes not in (None, card.num_classes):
            raise ModelFileError(f"{model.path.name}: {model.num_classes} outputs but the card "
                                 f"names {card.num_classes} classes")
        self._model, self.card = model, card
        self._chain: Transform = card.preprocessing_chain()

    @classmethod
    def load(cls, model_path: str | Path, card: ModelCard | str | Path | None = None,
             providers: Sequence[str] = DEFAULT_PROVIDERS, threads: int | None = None) -> EdgeModel:
        """Load ``model_path`` (card default: ``model_card.json`` beside it) on the first
        usable providers. A missing, corrupt or mismatched file raises ModelFileError."""
        model_path = Path(model_path)
        if not isinstance(card, ModelCard):
            card = ModelCard.load(card or model_path.with_name("model_card.json"))
        model = OnnxModel.load(model_path, providers=tuple(providers), threads=threads)
        log.info("model %s loaded on %s", card.model_version, ", ".join(model.providers))
        return cls(model, card)

    @property
    def model_version(self) -> str:
        return self.card.model_version

    @property
    def providers(self) -> tuple[str, ...]:
        return self._model.providers

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Raw images -> the ``(N, C, H, W)`` batch the model was trained on."""
        for img in images:
            if not isinstance(img, np.ndarray) or not np.issubdtype(img.dtype, np.number):
                raise InferenceError("an image must be a numeric numpy array")
        try:
            return apply_batch(self._chain, images)
        except MedChainError as exc:
            raise InferenceError(f"image does not fit the model's preprocessing: {exc}") from None

    def predict_preprocessed(self, batch: np.ndarray) -> list[Prediction]:
        """Predictions for an already preprocessed ``(N, C, H, W)`` batch."""
        batch = np.asarray(batch, np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(self.card.input_shape):
            raise InferenceError(f"batch of shape {batch.shape} does not fit the model's "
                                 f"(N, {', '.join(map(str, self.card.input_shape))})")
        if not np.all(np.isfinite(batch)):
            raise InferenceError("batch holds NaN or infinite values")
        probs = self._model.predict_proba(batch)
        labels = self.card.decide(probs)
        return [Prediction(int(lbl), self.card.class_names[lbl], tuple(float(p) for p in row),
                           self.card.model_version) for lbl, row in zip(labels, probs)]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        return self.predict_preprocessed(self.preprocess(images)) if len(images) else []

    def predict(self, image: np.ndarray) -> Prediction:
        return self.predict_batch([image])[0]
