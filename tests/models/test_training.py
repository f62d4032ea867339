"""The training loop: reproducible, early-stopping, resumable, and DDP under torchrun."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.card import ModelCard
from models.errors import ModelError
from models.hybrid import HybridConfig, build_model
from models.synthetic import synthetic_images, write_synthetic_npz
from models.training import Dist, Recipe, fit
from models.transforms import from_config


def _data(n, seed, classes=2):
    x, y = synthetic_images(n, (16, 16), seed=seed, classes=classes)
    return ((x.astype(np.float32) / 255 - 0.4) / 0.2)[:, None], y[:, 0].astype(np.int64)


def _fit(recipe, tiny_model, tmp=None, resume=False, labels=None, on_epoch_end=None, dist=Dist(),
         val_labels=None):
    xt, yt = _data(96, 0)
    xv, yv = _data(32, 1)
    if labels is not None:
        yt, yv = labels(yt), labels(yv)
    if val_labels is not None:
        yv = val_labels(yv)
    net = build_model(HybridConfig(1, 2, (16, 16), **{k: tuple(v) if isinstance(v, list) else v
                                                        for k, v in tiny_model.items()}), seed=recipe.seed)
    return fit(net, xt, yt, xv, yv, recipe, from_config(recipe.augment), dist, checkpoint_dir=tmp,
               resume=resume, progress=False, on_epoch_end=on_epoch_end)


def test_same_seed_same_weights_other_seed_other_weights(tiny_model):
    r = Recipe(epochs=2, batch_size=16, model=tiny_model)
    a, b = _fit(r, tiny_model), _fit(r, tiny_model)
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert [h.val_loss for h in a.history] == [h.val_loss for h in b.history]
    c = _fit(Recipe(epochs=2, batch_size=16, model=tiny_model, seed=1), tiny_model)
    assert not all(torch.equal(a.best_state[k], c.best_state[k]) for k in a.best_state)


def test_early_stopping_on_validation(tiny_model):
    # validation labels are the training labels flipped: the more the model learns, the worse
    # validation gets, so the smoothed criterion stops improving whatever the machine's arithmetic
    flipped = lambda y: 1 - y  # noqa: E731
    res = _fit(Recipe(epochs=12, batch_size=16, patience=2, lr=5e-3, model=tiny_model), tiny_model,
               val_labels=flipped)
    assert res.stopped_early and len(res.history) < 12
    best = min(h.val_criterion for h in res.history)  # an improvement under 1e-4 does not count
    assert res.history[res.best_epoch - 1].val_criterion <= best + 1e-4
    # patience counts only after half the budget (settle 0.5): no stop before epoch 6 + 2
    assert len(res.history) >= 8
    early = _fit(Recipe(epochs=12, batch_size=16, patience=2, lr=5e-3, model=tiny_model, settle=0.0),
                 tiny_model, val_labels=flipped)
    assert early.stopped_early and len(early.history) < len(res.history)
    rng = np.random.default_rng(0)
    noise = lambda y: rng.integers(0, 2, len(y))  # noqa: E731  labels carry no signal
    raw = _fit(Recipe(epochs=12, batch_size=16, patience=2, lr=5e-3, model=tiny_model, smoothing=0.0,
                      ema=False), tiny_model, labels=noise)
    lowest = min(h.val_loss for h in raw.history)
    assert raw.history[raw.best_epoch - 1].val_loss <= lowest + 1e-4


def test_checkpoints_and_resume(tmp_path, tiny_model):
    r = Recipe(epochs=2, batch_size=16, model=tiny_model)
    first = _fit(r, tiny_model, tmp_path)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    again = _fit(r, tiny_model, tmp_path, resume=True)  # nothing left to do: same result
    assert again.history == first.history and again.best_epoch == first.best_epoch
    assert all(torch.equal(first.best_state[k], again.best_state[k]) for k in first.best_state)
    with pytest.raises(ModelError, match="another recipe"):
        _fit(Recipe(epochs=3, batch_size=16, model=tiny_model), tiny_model, tmp_path, resume=True)


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, tiny_model):
    r = Recipe(epochs=4, batch_size=16, model=tiny_model)
    whole = _fit(r, tiny_model, tmp_path / "a")

    def interrupt(rec):
        if rec.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(r, tiny_model, tmp_path / "b", on_epoch_end=interrupt)
    resumed = _fit(r, tiny_model, tmp_path / "b", resume=True)
    assert all(torch.equal(whole.best_state[k], resumed.best_state[k]) for k in whole.best_state)
    strip = lambda hist: [(h.epoch, h.train_loss, h.val_loss, h.val_auc) for h in hist]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history) and len(whole.history) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_on_cuda_an_interrupted_run_resumes_and_its_checkpoints_load_on_cpu(tmp_path, tiny_model):
    """Checkpoints hold device tensors: resuming must put the RNG states back on the CPU
    (torch.set_rng_state takes CPU bytes only), and best.pt must hold the best weights."""
    r, cuda = Recipe(epochs=4, batch_size=16, model=tiny_model), Dist(device="cuda:0")
    whole = _fit(r, tiny_model, tmp_path / "a", dist=cuda)

    def interrupt(rec):
        if rec.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(r, tiny_model, tmp_path / "b", on_epoch_end=interrupt, dist=cuda)
    resumed = _fit(r, tiny_model, tmp_path / "b", resume=True, dist=cuda)
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]
    # CUDA kernels may reduce in another order from run to run: close, not bit-equal
    assert np.allclose([h.val_loss for h in resumed.history], [h.val_loss for h in whole.history],
                       rtol=1e-3, atol=1e-4)
    best = torch.load(tmp_path / "b" / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(best[k], resumed.best_state[k].cpu()) for k in resumed.best_state)


def test_recipe_is_validated():
    with pytest.raises(ModelError):
        Recipe(epochs=0)
    with pytest.raises(ModelError):
        Recipe(threshold="best")
    with pytest.raises(ModelError):
        Recipe(settle=1.0)


def test_the_schedule_scales_with_the_number_of_images():
    r = Recipe(ema=True)
    small, large = r.schedule(350), r.schedule(3700)
    assert small.epochs * small.steps_per_epoch >= r.min_steps and small.epochs > large.epochs
    assert large.epochs == 20 and small.patience > large.patience >= 5
    assert 0.9 <= small.ema_decay < large.ema_decay <= 0.998
    fixed = Recipe(epochs=7, patience=3).schedule(350)
    assert (fixed.epochs, fixed.patience) == (7, 3)
    assert Recipe(ema=False).schedule(350).ema_decay == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_ddp_with_two_cpu_processes(tmp_path, tiny_model):
    """The user's command, unchanged, under torchrun: gloo, 2 processes, one run folder."""
    import json

    data = write_synthetic_npz(tmp_path / "d.npz", {"train": 120, "val": 40}, size=(16, 16))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "medchain_app.cli", "train", "--data", str(data), "--out", str(out), "--epochs", "2",
           "--batch-size", "16", "--no-progress", "--device", "cpu", "--model", json.dumps(tiny_model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = ModelCard.load(out / "model_card.json")
    assert card.training["world_size"] == 2 and card.training["device"] == "cpu"
    assert card.training["ranks_agree"] is True  # both ranks ended with identical weights
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports and writes
    assert (out / "model.onnx").is_file() and (out / "metrics.json").is_file()
    shutil.rmtree(out)


def test_weight_averaging_is_what_is_kept_and_it_resumes(tmp_path, tiny_model):
    r = Recipe(epochs=3, batch_size=16, model=tiny_model, ema=True)
    plain = _fit(Recipe(epochs=3, batch_size=16, model=tiny_model), tiny_model)
    avg = _fit(r, tiny_model, tmp_path)
    assert not all(torch.equal(plain.best_state[k], avg.best_state[k]) for k in avg.best_state)
    again = _fit(r, tiny_model, tmp_path, resume=True)
    assert all(torch.equal(avg.best_state[k], again.best_state[k]) for k in avg.best_state)
