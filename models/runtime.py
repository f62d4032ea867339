"""Running an exported model with ONNX Runtime: provider choice with fallback, and loading
that refuses a corrupt or unexpected file with a clear error.

Used by evaluation and by edge inference, so both run the model the same way. Loading is
separate from trusting: callers verify signatures and hashes before they load.
torch-free.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import InputError, ModelFileError

__all__ = ["PROVIDERS", "ProviderChoice", "choose_providers", "OnnxModel"]

log = logging.getLogger(__name__)

# firmware-profile names -> ONNX Runtime execution providers
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass(frozen=True)
class ProviderChoice:
    """Providers to ask ONNX Runtime for, in order, and why each other one was passed over."""

    providers: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def choose_providers(requested: list[str] | tuple[str, ...], available: list[str]) -> ProviderChoice:
    """Keep the requested providers (profile names or ORT names) this build offers, in order;
    CPU is always the last resort. Pure: ``available`` is ``onnxruntime.get_available_providers()``."""
    chosen: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in requested:
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values():
            skipped.append((name, "unknown execution provider"))
        elif full not in available:
            skipped.append((full, "not available in this onnxruntime build"))
        elif full not in chosen:
            chosen.append(full)
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return ProviderChoice(tuple(chosen), tuple(skipped))


class OnnxModel:
    """An ONNX classifier: one ``(N, C, H, W)`` float32 input, one ``(N, K)`` output of class
    probabilities."""

    def __init__(self, session, path: Path) -> None:
        self._session = session
        self.path = path
        inp, out = session.get_inputs(), session.get_outputs()
        if len(inp) != 1 or len(out) != 1 or len(inp[0].shape) != 4 or len(out[0].shape) != 2:
            raise ModelFileError(f"{path.name}: expected one (N, C, H, W) input and one (N, K) output")
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.input_name = inp[0].name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp[0].shape[1:])
        self.num_classes = out[0].shape[1] if isinstance(out[0].shape[1], int) else None

    @classmethod
    def load(cls, path: str | Path, providers: list[str] | tuple[str, ...] = ("cpu",),
             threads: int | None = None) -> OnnxModel:
        """Load ``path`` with the first usable providers; refuse a missing or corrupt file."""
        import onnxruntime as ort

        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelFileError(f"{path}: model file not found") from None
        except OSError as exc:
            raise ModelFileError(f"{path}: unreadable ({exc.strerror})") from None
        choice = choose_providers(list(providers), ort.get_available_providers())
        for name, reason in choice.skipped:
            log.warning("execution provider %s skipped: %s", name, reason)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(data, sess_options=opts, providers=list(choice.providers))
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            raise ModelFileError(f"{path.name}: not a loadable ONNX model ({type(exc).__name__})") from None
        active = session.get_providers()
        for name in choice.providers:
            if name not in active:
                log.warning("execution provider %s failed to initialise; running on %s", name, active[0])
        return cls(session, path)

    def predict_proba(self, batch: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities for a preprocessed batch, run ``batch_size`` images at a time."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or any(want is not None and got != want
                              for got, want in zip(x.shape[1:], self.input_shape)):
            raise InputError(f"{self.path.name}: input of shape {x.shape} does not fit the "
                                 f"model's (N, {', '.join(map(str, self.input_shape))})")
        outs = [self._session.run(None, {self.input_name: x[i:i + batch_size]})[0]
                for i in range(0, len(x), batch_size)]
        return np.concatenate(outs).astype(np.float64)
