"""``medchain train`` and ``medchain evaluate`` as users run them, end to end."""

import hashlib
import json

import numpy as np
import pytest

from medchain.canonical import canonical_bytes
from medchain_app.cli import main
from models.card import ModelCard
from models.shifts import SHIFTS
from models.synthetic import write_synthetic_npz

PNG = b"\x89PNG\r\n\x1a\n"


def test_train_leaves_a_complete_run_folder(trained_run):
    data, out = trained_run
    for name in ("model.onnx", "model_card.json", "metrics.json", "results.md", "curves.png", "split.json",
                 "confusion_matrix.png", "config.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    for png in ("curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == PNG and (out / png).stat().st_size > 5000
    card = ModelCard.load(out / "model_card.json")
    assert card.input_shape == (1, 28, 28) and card.class_names == ("class_0", "class_1")
    assert card.decision["rule"] == "threshold" and 0 <= card.decision["threshold"] <= 1
    # train+val pooled, 15 % held out first, then 15 % validation; the file's own test kept
    assert card.data["manifest_sha256"] and card.data["counts"] == {
        "train": 224, "val": 48, "holdout": 48, "test": 80}
    assert card.data["split"]["plan"] == {"holdout": 0.15, "val": 0.15, "seed": 0}
    assert {"val", "holdout", "shifted", "test"} <= set(card.metrics["hybrid"])
    assert set(card.metrics["hybrid"]["shifted"]["per_shift"]) == {s.label for s in SHIFTS}
    assert [t["name"] for t in card.preprocessing["transforms"]] == [
        "EnsureChannels", "ScaleIntensity", "Resize", "Normalize", "ToChannelsFirst"]
    assert card.model_version == "hybrid-" + card.onnx_sha256[:12]
    card.check_model_file(out / "model.onnx")
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert hashlib.sha256(canonical_bytes(manifest)).hexdigest() == card.data["manifest_sha256"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"hybrid", "knn", "svm", "parity", "history", "timings"}
    assert metrics["parity"]["n"] == 48 and metrics["parity"]["max_abs_diff"] <= 1e-4
    assert metrics["parity"]["labels_identical"]
    assert metrics["hybrid"]["val"]["accuracy"] >= 0.9  # the synthetic task is easy
    table = (out / "results.md").read_text()
    assert all(f"| {m} | {split} |" in table for m in ("hybrid", "knn", "svm")
               for split in ("val", "held-out (carved)", "held-out, shifted (mean)", "test (file's own)"))
    assert "| gamma 1.5 |" in table


def test_evaluate_prints_the_metrics_of_the_exported_model(trained_run, capsys):
    data, out = trained_run
    assert main(["evaluate", "--model", str(out / "model.onnx"), "--data", str(data), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "precision", "recall", "f1", "auc", "confusion_matrix"):
        assert key in result
    assert np.sum(result["confusion_matrix"]) == 80
    # ONNX through the card's chain gives what training measured with PyTorch on test
    expected = json.loads((out / "metrics.json").read_text())["hybrid"]["test"]
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["auc"] == pytest.approx(expected["auc"], abs=1e-6)


def test_evaluate_scores_the_carved_split_and_refuses_what_training_saw(trained_run, tmp_path, capsys):
    data, out = trained_run
    model = str(out / "model.onnx")
    assert main(["evaluate", "--model", model, "--data", str(data), "--split", "holdout"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = json.loads((out / "metrics.json").read_text())["hybrid"]["holdout"]
    assert result["n"] == 48 and result["confusion_matrix"] == expected["confusion_matrix"]
    for split in ("train", "val"):
        assert main(["evaluate", "--model", model, "--data", str(data), "--split", split]) == 2
        assert "trained and selected on" in capsys.readouterr().err
    # other data holding some training images: those are left out of the score
    seen = json.loads((out / "split.json").read_text())["indices"]["train"][:10]  # into train+val
    with np.load(data) as f:
        pooled_x = np.concatenate([f["train_images"], f["val_images"]])
        pooled_y = np.concatenate([f["train_labels"], f["val_labels"]])
        mixed = np.concatenate([pooled_x[seen], f["test_images"]])
        labels = np.concatenate([pooled_y[seen], f["test_labels"]])
    np.savez(tmp_path / "mixed.npz", test_images=mixed, test_labels=labels)
    assert main(["evaluate", "--model", model, "--data", str(tmp_path / "mixed.npz")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["excluded_seen_in_training"] == 10 and result["n"] == 80
    assert main(["evaluate", "--model", model, "--data", str(tmp_path / "mixed.npz"), "--split", "holdout"]) == 2
    assert "not that data" in capsys.readouterr().err


def test_evaluate_runs_on_data_it_never_saw(trained_run, tmp_path, capsys):
    _, out = trained_run
    other = write_synthetic_npz(tmp_path / "other.npz", {"test": 50}, size=(40, 36), channels=3, seed=9)
    assert main(["evaluate", "--model", str(out / "model.onnx"), "--data", str(other)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 50 and result["split"] == "test"  # resized and reduced to grey by the chain


@pytest.mark.parametrize("tamper, match", [
    ("model", "does not match its model card"),
    ("card", "model card not found"),
    ("split", "no 'val' split"),
    ("labels", "model knows 2 classes"),
])
def test_evaluate_refuses_clearly(trained_run, tmp_path, capsys, tamper, match):
    import shutil

    data, out = trained_run
    model = tmp_path / "model.onnx"
    shutil.copy(out / "model.onnx", model)
    shutil.copy(out / "model_card.json", tmp_path / "model_card.json")
    if tamper == "model":
        raw = bytearray(model.read_bytes())
        raw[-10] ^= 1
        model.write_bytes(bytes(raw))
    elif tamper == "card":
        (tmp_path / "model_card.json").unlink()
    elif tamper == "split":
        data = write_synthetic_npz(tmp_path / "t.npz", {"test": 10})
    elif tamper == "labels":
        data = write_synthetic_npz(tmp_path / "t.npz", {"test": 10}, classes=3)
    split = "val" if tamper == "split" else "test"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--split", split]) == 2
    assert match in capsys.readouterr().err


def test_train_refuses_to_overwrite(trained_run, tmp_path, capsys):
    data, out = trained_run
    assert main(["train", "--data", str(data), "--out", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["train", "--data", str(data), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--model", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "y"), "--model", '{"depht": 1}']) == 2
    assert "bad architecture override" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "z")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # nothing left behind
    one_class = write_synthetic_npz(tmp_path / "one.npz", {"train": 10, "val": 4}, classes=2)
    with np.load(one_class) as f:
        arrays = dict(f)
    arrays["train_labels"][:] = 0
    arrays["val_labels"][:] = 0  # train and val are pooled before the split is carved
    np.savez(one_class, **arrays)
    assert main(["train", "--data", str(one_class), "--out", str(tmp_path / "w")]) == 2
    assert "single class" in capsys.readouterr().err


def test_rgb_multiclass_non_square_run(tmp_path, tiny_model):
    from models.pipeline import train_run
    from models.training import Recipe

    data = write_synthetic_npz(tmp_path / "rgb.npz", {"train": 150, "val": 45}, size=(20, 26),
                               channels=3, classes=3, seed=4)
    summary = train_run(data, tmp_path / "run", Recipe(epochs=2, batch_size=32, model=tiny_model),
                        progress=False)
    card = ModelCard.load(tmp_path / "run" / "model_card.json")
    assert card.input_shape == (3, 20, 26) and card.decision == {"rule": "argmax"}
    assert summary["hybrid"]["val"]["average"] == "macro"
    assert len(summary["hybrid"]["val"]["confusion_matrix"]) == 3 and "test" not in summary["hybrid"]


def test_large_images_are_shrunk_to_the_recipe_size(tmp_path, tiny_model):
    from models.pipeline import target_size, train_run
    from models.training import Recipe

    assert target_size((28, 28), 64) == (28, 28) and target_size((200, 100), 64) == (64, 32)
    data = write_synthetic_npz(tmp_path / "big.npz", {"train": 60, "val": 20}, size=(96, 80), seed=5)
    train_run(data, tmp_path / "run", Recipe(epochs=1, model=tiny_model, max_image_size=48), progress=False)
    card = ModelCard.load(tmp_path / "run" / "model_card.json")
    assert card.input_shape == (1, 48, 40)
    assert card.preprocessing["transforms"][2]["interpolation"] == "area"


def test_train_on_a_dicom_folder(tmp_path, tiny_model):
    """A folder of DICOM files with a labels CSV, split by patient."""
    from models.pipeline import train_run
    from models.synthetic import write_synthetic_dicom_folder
    from models.training import Recipe

    folder = write_synthetic_dicom_folder(tmp_path / "dicom", n=60, patients=20, seed=2)
    summary = train_run(folder, tmp_path / "run", Recipe(epochs=2, batch_size=16, model=tiny_model),
                        progress=False)
    card = ModelCard.load(tmp_path / "run" / "model_card.json")
    assert card.class_names == ("benign", "malignant") and card.data["kind"] == "dicom"
    assert card.preprocessing["transforms"][1]["name"] == "PercentileScale"
    assert "test" in summary["hybrid"]
