"""Model-side exceptions, rooted in :class:`medchain.errors.MedChainError`.

Messages name the file, split or setting at fault and the reason; they never carry pixel
data or patient identifiers.
"""

from medchain.errors import MedChainError, VerificationError

__all__ = [
    "ModelError",
    "DatasetError",
    "TransformError",
    "ModelFileError",
    "CardError",
    "ParityError",
    "InputError",
]


class ModelError(MedChainError):
    """Base of model errors."""


class DatasetError(ModelError):
    """A data source is missing, malformed or of a kind we do not train on (3D, multi-label)."""


class TransformError(ModelError):
    """A preprocessing config names an unknown transform or bad parameters, or an image does
    not fit the chain (wrong number of dimensions or channels)."""


class ModelFileError(ModelError):
    """A model file is missing, corrupt, or not the model its card describes."""


class CardError(ModelError):
    """A model card is missing, unreadable or of an unsupported format version."""


class InputError(ModelError):
    """A batch handed to a model does not have the shape the model takes."""


class ParityError(VerificationError):
    """The exported ONNX model does not reproduce the PyTorch model within tolerance."""
