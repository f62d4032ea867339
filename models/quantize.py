"""Lower-precision variants of an exported model for edge profiles that ask for them.

* ``int8``: ONNX Runtime static quantization (QDQ, weights signed per channel, activations
  unsigned), calibrated on training images only, so nothing it is scored on tunes it;
  only Conv, MatMul and Gemm are quantized (LayerNorm and softmax stay float).
* ``fp16``: weights stored as float16 (half the file), cast back to float32 where used, so
  it runs on any CPU build; a GPU provider folds the casts.

Each variant is checked the way the FP32 export is: its predictions on the held-out split
are compared with FP32's (:func:`agreement`). torch-free.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.card import decide
from models.errors import ModelFileError

__all__ = ["PRECISIONS", "Variant", "agreement", "convert_fp16", "latency_ms", "make_variants",
           "quantize_int8"]

PRECISIONS = ("fp32", "fp16", "int8")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One exported precision, as the card records it."""

    precision: str
    file: str
    sha256: str
    holdout_accuracy: float
    agreement_with_fp32: float
    latency_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


class _Batches:
    """The calibration reader ONNX Runtime asks for: ``{input: batch}`` until exhausted."""

    def __init__(self, name: str, images: np.ndarray, batch: int = 32) -> None:
        self._it = iter([{name: np.ascontiguousarray(images[i:i + batch], np.float32)}
                         for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._it, None)


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray) -> Path:
    """Write the INT8 (QDQ) variant of ``fp32_path``, calibrated on ``calibration`` (a
    preprocessed ``(N, C, H, W)`` batch of training images)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    name = onnx.load(str(fp32_path)).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001  pre-processing only helps; quantize without it
            log.warning("quantization pre-processing skipped (%s)", type(exc).__name__)
            prepared = fp32_path
        try:
            quantize_static(str(prepared), str(out_path), _Batches(name, calibration),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:  # noqa: BLE001  onnxruntime raises many types
            raise ModelFileError(f"{fp32_path.name}: INT8 quantization failed ({exc})") from None
    return out_path


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Write the FP16-weights variant: every float32 initializer of more than 16 values
    stored as float16 and cast back to float32 by a node in front of its users."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    casts, kept = [], []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or arr.size <= 16:
            kept.append(init)
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                      name=init.name + "__to_fp32"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return Path(out_path)


def agreement(reference: np.ndarray, other: np.ndarray, decision: dict | None) -> float:
    """Fraction of images on which two models' probabilities give the same label."""
    return float(np.mean(decide(reference, decision) == decide(other, decision)))


def latency_ms(model, images: np.ndarray, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean single-image latency (batch 1) over ``images``."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(images)):
            model.predict_proba(images[i:i + 1])
        runs.append((time.perf_counter() - t0) * 1000 / len(images))
    return float(np.median(runs))


def make_variants(fp32_path: str | Path, calibration: np.ndarray, x_eval: np.ndarray,
                  y_eval: np.ndarray, decision: dict | None, latency_images: int = 64) -> dict[str, Variant]:
    """FP32, FP16 and INT8 beside one another (``model.fp16.onnx``, ``model.int8.onnx``
    next to ``fp32_path``): each one's accuracy on ``x_eval`` (the held-out split), its
    agreement with FP32 there, and its single-thread batch-1 latency."""
    from models.card import file_sha256
    from models.runtime import OnnxModel

    fp32_path = Path(fp32_path)
    paths = {"fp32": fp32_path,
             "fp16": convert_fp16(fp32_path, fp32_path.with_name("model.fp16.onnx")),
             "int8": quantize_int8(fp32_path, fp32_path.with_name("model.int8.onnx"), calibration)}
    probe = np.ascontiguousarray(x_eval[:latency_images], np.float32)
    out, reference = {}, None
    for precision, path in paths.items():
        model = OnnxModel.load(path, providers=("cpu",), threads=1)
        probs = model.predict_proba(x_eval)
        reference = probs if reference is None else reference
        out[precision] = Variant(precision, path.name, file_sha256(path),
                                 float(np.mean(decide(probs, decision) == y_eval)),
                                 agreement(reference, probs, decision), latency_ms(model, probe))
    return out
