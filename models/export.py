"""ONNX export of the hybrid (softmax included, dynamic batch axis) and the parity check
that proves the exported file computes what the PyTorch model computes."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.card import decide
from models.errors import ModelFileError, ParityError
from models.hybrid import Probabilities

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "OPSET", "export_onnx", "ParityReport", "check_parity",
           "torch_probabilities"]

INPUT_NAME, OUTPUT_NAME, OPSET = "image", "probabilities", 18


def export_onnx(net: torch.nn.Module, input_shape: tuple[int, int, int], path: str | Path,
                temperature: float = 1.0) -> Path:
    """Write ``softmax(net(x) / temperature)`` as a single-file ONNX model whose batch axis
    is dynamic, and check it with the ONNX checker (full check, shape inference included)."""
    import onnx

    path = Path(path)
    wrapper = Probabilities(net, temperature).eval().cpu()
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes={"x": {0: batch}},
            )
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"{path.name}: exported model fails the ONNX checker ({exc})") from None
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise ModelFileError(f"{path.name}: exported batch axis is not dynamic")
    return path


@torch.no_grad()
def torch_probabilities(net: torch.nn.Module, inputs: np.ndarray, temperature: float = 1.0,
                        batch_size: int = 256) -> np.ndarray:
    """What the exported model should output, computed by PyTorch on CPU."""
    wrapper = Probabilities(net, temperature).eval().cpu()
    outs = [wrapper(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size], np.float32)))
            for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs).double().numpy()


@dataclass(frozen=True)
class ParityReport:
    n: int
    max_abs_diff: float
    labels_identical: bool
    tolerance: float

    def to_dict(self) -> dict:
        return {"n": self.n, "max_abs_diff": self.max_abs_diff,
                "labels_identical": self.labels_identical, "tolerance": self.tolerance}


def check_parity(net: torch.nn.Module, onnx_path: str | Path, inputs: np.ndarray,
                 temperature: float = 1.0, decision: dict | None = None,
                 tolerance: float = 1e-4) -> ParityReport:
    """Run ``inputs`` through PyTorch and through ONNX Runtime (CPU); raise
    :class:`ParityError` unless every probability agrees within ``tolerance`` and every
    predicted label (under ``decision``) is identical."""
    from models.runtime import OnnxModel

    expected = torch_probabilities(net, inputs, temperature)
    got = OnnxModel.load(onnx_path, providers=("cpu",)).predict_proba(inputs)
    diff = float(np.max(np.abs(expected - got))) if len(inputs) else 0.0
    same = bool(np.array_equal(decide(expected, decision), decide(got, decision)))
    report = ParityReport(len(inputs), diff, same, tolerance)
    if diff > tolerance or not same:
        raise ParityError(f"{Path(onnx_path).name}: ONNX differs from PyTorch on {len(inputs)} "
                          f"images (max |dprob| {diff:.2e}, labels identical: {same})")
    return report
