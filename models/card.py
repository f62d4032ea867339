"""The model card: everything needed to run, trust and trace an exported model.

It travels beside ``model.onnx`` and holds the preprocessing config (rebuilt with
:func:`models.transforms.from_config`, so edge and evaluation run exactly what training
ran), class names, input shape, the decision rule fitted on validation, metrics, the data
manifest hash and the ONNX file's SHA-256. torch-free: the edge reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import CardError, ModelFileError

__all__ = ["CARD_FORMAT", "ModelCard", "decide", "file_sha256"]

CARD_FORMAT = 1


def decide(probs: np.ndarray, decision: dict | None = None) -> np.ndarray:
    """Predicted labels: argmax, or for two classes ``P(1) >= threshold`` when the decision
    is ``{"rule": "threshold", "threshold": t}``."""
    probs = np.asarray(probs)
    if decision and decision.get("rule") == "threshold":
        if probs.shape[1] != 2:
            raise CardError("a threshold decision needs exactly two classes")
        return (probs[:, 1] >= float(decision["threshold"])).astype(np.int64)
    if decision and decision.get("rule") not in (None, "argmax"):
        raise CardError(f"unknown decision rule {decision.get('rule')!r}")
    return probs.argmax(axis=1).astype(np.int64)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """A trained model's description (JSON on disk, ``format`` versioned)."""

    model_version: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    preprocessing: dict
    decision: dict
    temperature: float
    onnx_sha256: str
    data: dict
    metrics: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    created: str = ""
    format: int = CARD_FORMAT

    def to_json(self) -> str:
        d = asdict(self)
        d["class_names"], d["input_shape"] = list(self.class_names), list(self.input_shape)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "model card") -> ModelCard:
        try:
            d: dict[str, Any] = json.loads(text)
        except ValueError:
            raise CardError(f"{where}: not valid JSON") from None
        if not isinstance(d, dict):
            raise CardError(f"{where}: not a JSON object")
        if d.get("format") != CARD_FORMAT:
            raise CardError(f"{where}: unsupported card format {d.get('format')!r} (expected {CARD_FORMAT})")
        try:
            card = cls(**{**d, "class_names": tuple(d["class_names"]),
                          "input_shape": tuple(int(x) for x in d["input_shape"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise CardError(f"{where}: missing or malformed field ({exc})") from None
        if len(card.input_shape) != 3 or len(card.class_names) < 2:
            raise CardError(f"{where}: input_shape must be (C, H, W) and there must be >= 2 classes")
        return card

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise CardError(f"{path}: model card not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CardError(f"{path}: unreadable ({type(exc).__name__})") from None
        return cls.from_json(text, str(path))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocessing_chain(self):
        """The exact transform chain the model was trained with."""
        from models.transforms import from_config

        return from_config(self.preprocessing)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return decide(probs, self.decision)

    def variants(self) -> dict[str, dict]:
        """The exported precisions the card lists (``metrics["variants"]``: precision ->
        ``{"file", "sha256", "holdout_accuracy", "agreement_with_fp32", "latency_ms"}``),
        those whose file name and SHA-256 are texts; ``{}`` for a card without them."""
        listed = self.metrics.get("variants") if isinstance(self.metrics, dict) else None
        if not isinstance(listed, dict):
            return {}
        return {str(p): v for p, v in listed.items() if isinstance(v, dict)
                and isinstance(v.get("file"), str) and isinstance(v.get("sha256"), str)}

    def check_model_file(self, path: str | Path) -> None:
        """Raise :class:`ModelFileError` unless ``path`` is the ONNX file this card describes
        (an integrity check, not a signature: trust comes from the signed release)."""
        try:
            digest = file_sha256(path)
        except FileNotFoundError:
            raise ModelFileError(f"{path}: model file not found") from None
        if digest != self.onnx_sha256:
            raise ModelFileError(f"{path}: SHA-256 does not match its model card "
                                 f"(card {self.onnx_sha256[:12]}, file {digest[:12]})")
