"""Fixtures for the model tests: small synthetic data sets and one tiny trained run that
several tests read (training it once keeps the suite quick)."""

from __future__ import annotations

import pytest

from models.synthetic import write_synthetic_npz

TINY_MODEL = {"stem_channels": [8, 16], "embed_dim": 16, "depth": 1, "heads": 2, "head_hidden": 16}


@pytest.fixture
def tiny_model() -> dict:
    return dict(TINY_MODEL)


@pytest.fixture
def make_npz(tmp_path):
    """``make_npz(name, **kw)`` writes a synthetic MedMNIST-layout file in tmp_path."""

    def make(name: str = "data.npz", **kw):
        return write_synthetic_npz(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished ``medchain train`` run on synthetic grey binary data with a test split."""
    import json

    from medchain_app.cli import main

    root = tmp_path_factory.mktemp("run")
    data = write_synthetic_npz(root / "data.npz", {"train": 240, "val": 80, "test": 80}, seed=3)
    out = root / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--epochs", "4", "--no-progress",
               "--model", json.dumps(TINY_MODEL), "--batch-size", "32"])
    assert rc == 0
    return data, out
