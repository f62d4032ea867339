"""INT8 and FP16 variants beside FP32: written, recorded in the card, and agreeing with FP32."""

import json

from models.card import ModelCard, file_sha256
from models.runtime import OnnxModel


def test_variants_are_written_recorded_and_agree_with_fp32(trained_run):
    _, out = trained_run
    card = ModelCard.load(out / "model_card.json")
    variants = card.metrics["variants"]
    assert set(variants) == {"fp32", "fp16", "int8"}
    for precision, v in variants.items():
        path = out / v["file"]
        assert file_sha256(path) == v["sha256"]
        model = OnnxModel.load(path)
        assert model.num_classes == 2
        assert v["latency_ms"] > 0
    assert variants["fp32"]["agreement_with_fp32"] == 1.0
    # the quantized models give the FP32 label on >= 99 % of the carved held-out split
    assert variants["int8"]["agreement_with_fp32"] >= 0.99
    assert variants["fp16"]["agreement_with_fp32"] >= 0.99
    import onnx

    inits = onnx.load(str(out / "model.fp16.onnx")).graph.initializer
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits)  # weights stored in half
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "| int8 | model.int8.onnx |" in (out / "results.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["variants"] == variants
