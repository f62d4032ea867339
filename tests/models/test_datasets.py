"""Data sources: MedMNIST npz of every layout we accept, DICOM folders, patient-level
splits, manifests, and clear refusals of what we do not train on."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.datasets import load_dicom_folder, load_npz, load_source, patient_split
from models.errors import DatasetError
from models.synthetic import synthetic_images, write_dicom


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("channels, shape4", [(1, False), (1, True), (3, False)])
def test_npz_layouts(tmp_path, channels, shape4):
    x, y = synthetic_images(12, (20, 30), channels, classes=3)
    if shape4:
        x = x[..., None]
    src = load_npz(_save(tmp_path / "d.npz", train_images=x, train_labels=y, val_images=x[:4],
                         val_labels=y[:4]))
    assert src.channels == channels and src.image_size == (20, 30) and src.num_classes == 3
    assert src.class_names == ("class_0", "class_1", "class_2")
    assert src.intensity_range == (0.0, 255.0)
    assert set(src.splits) == {"train", "val"} and src.split("train").labels.dtype == np.int64
    with pytest.raises(DatasetError, match="no 'test' split"):
        src.split("test")


def test_manifest_hash_names_the_exact_data(tmp_path):
    x, y = synthetic_images(10)
    a = load_npz(_save(tmp_path / "a.npz", train_images=x, train_labels=y))
    b = load_npz(_save(tmp_path / "b.npz", train_images=x, train_labels=y))
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    c = load_npz(_save(tmp_path / "c.npz", train_images=x, train_labels=y2))
    assert a.manifest_sha256 == b.manifest_sha256 != c.manifest_sha256
    assert a.manifest["splits"]["train"]["count"] == 10


def test_float_and_wide_integer_sources_pick_their_scaling(tmp_path):
    x, y = synthetic_images(6, dtype=np.float32)
    assert load_npz(_save(tmp_path / "f.npz", train_images=x, train_labels=y)).intensity_range == (0.0, 1.0)
    x16, _ = synthetic_images(6, dtype=np.uint16)
    assert load_npz(_save(tmp_path / "u.npz", train_images=x16, train_labels=y)).intensity_range is None


def test_class_names_from_the_file(tmp_path):
    x, y = synthetic_images(6)
    src = load_npz(_save(tmp_path / "n.npz", train_images=x, train_labels=y,
                         class_names=np.array(["normal", "pneumonia"])))
    assert src.class_names == ("normal", "pneumonia")


def _bad(tmp_path, **arrays):
    return _save(tmp_path / "bad.npz", **arrays)


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.npz", "no such file"),
    (lambda p: (p / "junk.npz").write_bytes(b"not a zip") and p / "junk.npz", "not a readable .npz"),
    (lambda p: _bad(p, foo=np.zeros(3)), "no train/val/test"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4))), "not the other"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4)), train_labels=np.zeros(2)), "3 train images but 2"),
    (lambda p: _bad(p, train_images=np.zeros((3, 8, 8, 8)), train_labels=np.zeros(3)), "3D volumes"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4)), train_labels=np.zeros((3, 14))), "multi-label"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4)), train_labels=-np.ones(3)), "non-negative"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4)), train_labels=np.full(3, 0.5)), "non-negative integers"),
    (lambda p: _bad(p, train_images=np.array([["a"]] * 3), train_labels=np.zeros(3)), "numeric"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4)), train_labels=np.zeros(3),
                    val_images=np.zeros((2, 5, 5)), val_labels=np.zeros(2)), "disagree"),
    (lambda p: _bad(p, train_images=np.zeros((3, 4, 4)), train_labels=np.array([0, 1, 2]),
                    class_names=np.array(["a", "b"])), "up to 2 but 2 class names"),
])
def test_bad_npz_files_are_refused_clearly(tmp_path, make, match):
    with pytest.raises(DatasetError, match=match):
        load_npz(make(tmp_path))


@given(st.lists(st.sampled_from([f"p{i}" for i in range(12)]), min_size=1, max_size=60),
       st.integers(0, 2**32 - 1))
def test_patient_split_never_puts_one_patient_in_two_splits(patients, seed):
    splits = patient_split(patients, seed=seed)
    assert len(splits) == len(patients) and set(splits) <= {"train", "val", "test"}
    assert all(len({s for s, q in zip(splits, patients) if q == p}) == 1 for p in patients)
    assert splits == patient_split(patients, seed=seed)
    if len(set(patients)) >= 3:
        assert set(splits) == {"train", "val", "test"}


# -- DICOM folders ------------------------------------------------------------------------


def _write_dicom(path, pixels, patient, photometric="MONOCHROME2"):
    write_dicom(path, pixels, patient, photometric, bits_stored=12)


@pytest.fixture
def dicom_folder(tmp_path):
    """18 images of 6 patients (3 each), two classes named by strings, varied sizes."""
    x, y = synthetic_images(18, (24, 24), dtype=np.uint16)
    lines = ["file,label,patient"]
    for i in range(18):
        pixels = (x[i] >> 4).astype(np.uint16)  # 12-bit
        if i % 5 == 0:
            pixels = np.kron(pixels, np.ones((2, 2), np.uint16))  # a bigger image now and then
        _write_dicom(tmp_path / f"img{i}.dcm", pixels, f"tag-{i}")
        lines.append(f"img{i}.dcm,{'pneumonia' if y[i, 0] else 'normal'},patient{i % 6}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_dicom_folder_with_patient_level_split(dicom_folder):
    src = load_source(dicom_folder)
    assert src.kind == "dicom" and src.class_names == ("normal", "pneumonia")
    assert src.channels == 1 and src.image_size == (24, 24) and src.intensity_range is None
    assert sum(len(s) for s in src.splits.values()) == 18
    seen = {}
    for name, split in src.splits.items():
        for p in split.patients:
            assert seen.setdefault(p, name) == name
    assert len(src.manifest["files"]) == 18 and len(src.manifest_sha256) == 64


def test_dicom_patient_falls_back_to_the_header_and_monochrome1_is_inverted(tmp_path):
    img = np.arange(16, dtype=np.uint16).reshape(4, 4)
    _write_dicom(tmp_path / "a.dcm", img, "P1", "MONOCHROME1")
    _write_dicom(tmp_path / "b.dcm", img, "P2")
    (tmp_path / "l.csv").write_text("file,label,split\na.dcm,0,train\nb.dcm,1,val\n")
    src = load_dicom_folder(tmp_path, tmp_path / "l.csv")
    assert src.split("train").patients == ("P1",)
    # inverted over the stored bit range (as the edge reads it), so images of one series agree
    assert np.array_equal(src.split("train").images[0], (2**12 - 1) - img.astype(np.float32))  # 12-bit
    assert src.class_names == ("class_0", "class_1")


@pytest.mark.parametrize("csv_text, match", [
    ("name,label\nx,1\n", "'file' and 'label'"),
    ("file,label\nmissing.dcm,1\n", "labels.csv row 2: the listed file is missing"),
    ("file,label\na.dcm,0\nbroken.dcm,1\n", "labels.csv row 3: unreadable DICOM"),
    ("file,label,split\na.dcm,0,train\na.dcm,1,holdout\n", "unknown split"),
    ("file,label,patient,split\na.dcm,0,P,train\na.dcm,1,P,val\n", "more than one split"),
])
def test_bad_dicom_folders_are_refused_clearly(tmp_path, csv_text, match):
    _write_dicom(tmp_path / "a.dcm", np.zeros((4, 4), np.uint16), "P")
    (tmp_path / "broken.dcm").write_bytes(b"DICM? no")
    (tmp_path / "labels.csv").write_text(csv_text)
    with pytest.raises(DatasetError, match=match) as err:
        load_dicom_folder(tmp_path)
    assert "broken.dcm" not in str(err.value) and "missing.dcm" not in str(err.value)
    with pytest.raises(DatasetError, match="labels CSV not found"):
        load_dicom_folder(tmp_path, tmp_path / "nope.csv")
