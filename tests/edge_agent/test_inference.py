"""Edge inference with ONNX Runtime: providers with fallback, the card's preprocessing,
predictions with model version, and clear refusals of corrupt models and bad images."""

import json
import logging
import shutil

import numpy as np
import pytest

from edge_agent.inference import (EdgeModel, InferenceError, ModelFileError, Prediction,
                                  check_integrity)
from models.card import ModelCard
from models.datasets import load_npz
from models.runtime import PROVIDERS, choose_providers
from models.synthetic import write_synthetic_npz

TINY = {"stem_channels": [8, 16], "embed_dim": 16, "depth": 1, "heads": 2, "head_hidden": 16}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from models.pipeline import train_run
    from models.training import Recipe

    root = tmp_path_factory.mktemp("edge")
    data = write_synthetic_npz(root / "d.npz", {"train": 160, "val": 60, "test": 40}, seed=11)
    train_run(data, root / "run", Recipe(epochs=3, batch_size=32, model=TINY), progress=False)
    return data, root / "run"


def test_predicts_raw_images_like_evaluation_does(run, caplog):
    data, out = run
    caplog.set_level(logging.INFO)
    model = EdgeModel.load(out / "model.onnx")
    card = ModelCard.load(out / "model_card.json")
    assert model.model_version == card.model_version and model.providers == ("CPUExecutionProvider",)
    test = load_npz(data).split("test")
    preds = model.predict_batch(list(test.images))
    assert all(isinstance(p, Prediction) and p.model_version == card.model_version for p in preds)
    assert all(abs(sum(p.probabilities) - 1) < 1e-5 and p.class_name == card.class_names[p.label]
               for p in preds)
    from models.evaluate import evaluate

    result = evaluate(out / "model.onnx", data, "test", per_image=True)
    assert result["excluded_seen_in_training"] == 0
    assert [p.label for p in preds] == result["predicted"]  # image by image, not only in total
    assert np.bincount([p.label for p in preds], minlength=2).tolist() == result["predicted_counts"]
    one = model.predict(test.images[0])
    assert one.label == preds[0].label and np.allclose(one.probabilities, preds[0].probabilities, atol=1e-6)
    assert json.loads(json.dumps(one.to_dict()))["label"] == one.label
    assert model.predict_batch([]) == []


def test_providers_fall_back_in_order_with_a_logged_reason(run, caplog):
    _, out = run
    caplog.set_level(logging.WARNING)
    model = EdgeModel.load(out / "model.onnx", providers=["tensorrt", "cuda", "cpu"])
    assert model.providers[-1] == "CPUExecutionProvider"
    text = caplog.text
    assert "TensorrtExecutionProvider skipped: not available" in text
    assert "CUDAExecutionProvider skipped: not available" in text


def test_choose_providers_is_ordered_and_always_ends_on_cpu():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    c = choose_providers(["tensorrt", "cuda", "cpu"], avail)
    assert c.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert c.skipped == (("TensorrtExecutionProvider", "not available in this onnxruntime build"),)
    c = choose_providers(["npu", "CUDAExecutionProvider"], avail)
    assert c.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert c.skipped == (("npu", "unknown execution provider"),)
    assert choose_providers([], avail).providers == (PROVIDERS["cpu"],)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_corrupt_model_files_are_refused_clearly(run, tmp_path, damage):
    _, out = run
    shutil.copy(out / "model_card.json", tmp_path / "model_card.json")
    path = tmp_path / "model.onnx"
    raw = (out / "model.onnx").read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    with pytest.raises(ModelFileError) as err:
        EdgeModel.load(path)
    assert "model.onnx" in str(err.value)
    assert ("not found" if damage == "missing" else "not a loadable ONNX model") in str(err.value)


def test_a_model_that_does_not_fit_its_card_is_refused(run, tmp_path):
    _, out = run
    card = ModelCard.load(out / "model_card.json")
    wrong_shape = ModelCard.from_json(card.to_json().replace('"input_shape": [\n    1,', '"input_shape": [\n    3,'))
    with pytest.raises(ModelFileError, match="does not match"):
        EdgeModel.load(out / "model.onnx", wrong_shape)
    d = json.loads(card.to_json())
    d["class_names"] = ["a", "b", "c"]
    with pytest.raises(ModelFileError, match="2 outputs but the card names 3"):
        EdgeModel.load(out / "model.onnx", ModelCard.from_json(json.dumps(d)))


def test_integrity_check_is_separate_from_loading(run, tmp_path):
    _, out = run
    card = ModelCard.load(out / "model_card.json")
    check_integrity(out / "model.onnx", card)
    raw = bytearray((out / "model.onnx").read_bytes())
    raw[100] ^= 0xFF
    (tmp_path / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="SHA-256 does not match"):
        check_integrity(tmp_path / "model.onnx", card)


@pytest.mark.parametrize("image, match", [
    ("not an image", "numeric numpy array"),
    (np.zeros((2, 3, 4, 5)), "does not fit the model's preprocessing"),
    (np.array([["a", "b"]]), "numeric numpy array"),
])
def test_bad_images_are_refused_clearly(run, image, match):
    _, out = run
    model = EdgeModel.load(out / "model.onnx")
    with pytest.raises(InferenceError, match=match):
        model.predict(image)


def test_bad_preprocessed_batches_are_refused(run):
    _, out = run
    model = EdgeModel.load(out / "model.onnx")
    with pytest.raises(InferenceError, match="does not fit"):
        model.predict_preprocessed(np.zeros((1, 3, 28, 28)))
    bad = np.zeros((1, 1, 28, 28))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceError, match="NaN"):
        model.predict_preprocessed(bad)
    assert len(model.predict_preprocessed(np.zeros((5, 1, 28, 28)))) == 5
