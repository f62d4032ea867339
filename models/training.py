"""The seeded training loop: one process, or many under ``torchrun`` with no change.

Reproducibility: the weights are initialised from ``recipe.seed``; each epoch's shuffle
comes from ``(seed, epoch)`` and each rank's augmentations from ``(seed, epoch, rank)``,
and the torch RNG (dropout) is saved in checkpoints, so a run (and a resumed run) repeats
bit for bit on the same machine and thread count. Under ``torchrun`` (``WORLD_SIZE`` set)
the model is wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA), every rank
takes an equal shard of each epoch, and rank 0 alone evaluates, checkpoints and decides
when to stop. The best epoch is chosen on validation loss; patience counts only
epochs after the learning-rate warm-up, whose swings say nothing about convergence.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from medchain.durable import durable_write
from models.errors import ModelError
from models.metrics import classification_metrics, softmax
from models.transforms import Transform, apply_batch

__all__ = ["Recipe", "Dist", "setup_distributed", "teardown_distributed", "EpochRecord",
           "FitResult", "fit", "predict_logits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How to train; the defaults are what ``medchain train`` runs on any data."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.15
    label_smoothing: float = 0.05
    patience: int = 6
    seed: int = 0
    max_image_size: int = 64
    model: dict = field(default_factory=dict)
    augment: list = field(default_factory=lambda: [
        {"name": "RandomAffine", "degrees": 10.0, "scale": 0.1, "translate": 0.08, "p": 1.0}])

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.patience < 1:
            raise ModelError("recipe needs epochs >= 1, batch_size >= 2, lr > 0, patience >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Dist:
    """Where this process trains: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read ``torchrun``'s environment (if any), pick the device, start the process group."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = f"cuda:{local}" if want_cuda else "cpu"
    if want_cuda:
        torch.cuda.set_device(local)
    if world > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group(backend="nccl" if want_cuda else "gloo")
        if not want_cuda:  # share the cores between the local processes
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    return Dist(rank, world, local, dev)


def teardown_distributed(dist: Dist) -> None:
    """Leave the process group together: a rank that destroys its group (and exits) while
    rank 0 still writes the run folder can abort in gloo's teardown ("terminate called
    without an active exception"), so every rank waits at a barrier first."""
    if dist.world > 1:
        import torch.distributed as td

        if td.is_initialized():
            try:
                td.barrier()
            finally:
                td.destroy_process_group()


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_auc: float | None
    seconds: float


@dataclass(frozen=True)
class FitResult:
    best_state: dict
    best_epoch: int
    history: tuple[EpochRecord, ...]
    stopped_early: bool
    seconds: float


@torch.no_grad()
def predict_logits(net: torch.nn.Module, x: np.ndarray, device: str = "cpu",
                   batch_size: int = 256) -> np.ndarray:
    net.eval()
    outs = [net(torch.from_numpy(x[i:i + batch_size]).to(device)).float().cpu()
            for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy()


def _shard(n: int, seed: int, epoch: int, dist: Dist) -> np.ndarray:
    """This rank's indices for ``epoch``: one shared permutation, padded to a multiple of the
    world size so every rank runs the same number of steps (DDP needs that)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    pad = (-n) % dist.world
    perm = np.concatenate([perm, perm[:pad]]) if pad else perm
    return perm[dist.rank::dist.world]


def _save(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    durable_write(path, buf.getvalue())


def fit(net: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
        y_val: np.ndarray, recipe: Recipe, augment: Transform, dist: Dist = Dist(),
        checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
        on_epoch_end: Callable[[EpochRecord], None] | None = None) -> FitResult:
    """Train ``net`` on preprocessed arrays; return the best (lowest validation loss) weights.

    ``on_epoch_end`` (rank 0, after the checkpoint is written) lets an orchestrator report
    progress; an exception it raises stops training with the checkpoint ready to resume.
    """
    from tqdm import tqdm

    torch.manual_seed(recipe.seed + dist.rank)
    net.to(dist.device)
    per_rank = max(2, -(-recipe.batch_size // dist.world))
    n_local = -(-len(x_train) // dist.world)
    steps = -(-n_local // per_rank)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps,
                                                pct_start=recipe.warmup)
    history: list[EpochRecord] = []
    best_state, best_epoch, best_loss, bad, start = copy.deepcopy(net.state_dict()), -1, float("inf"), 0, 0
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    if resume and last is not None and last.is_file():
        ck = torch.load(last, map_location=dist.device, weights_only=True)
        if ck["recipe"] != recipe.to_dict() or ck["steps"] != steps:
            raise ModelError(f"{last}: checkpoint was made with another recipe; start a new run")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        # RNG states are CPU byte tensors whatever map_location moved them to
        torch.set_rng_state(ck["torch_rng"][dist.rank if dist.rank < len(ck["torch_rng"]) else 0].cpu())
        if dist.device != "cpu" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu())
        best_state, best_epoch, best_loss, bad = ck["best_state"], ck["best_epoch"], ck["best_loss"], ck["bad"]
        history = [EpochRecord(**h) for h in ck["history"]]
        start = ck["epoch"] + 1
        if dist.is_main:
            log.info("resuming from %s at epoch %d", last, start + 1)
    model = net
    if dist.world > 1:  # after resuming, so every rank starts from the same weights
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dist.local_rank] if dist.device != "cpu" else None)
    t_fit = time.perf_counter()
    stopped = False
    for epoch in range(start, recipe.epochs):
        if bad >= recipe.patience:
            stopped = True
            break
        t0 = time.perf_counter()
        model.train()
        idx = _shard(len(x_train), recipe.seed, epoch, dist)
        rng = np.random.default_rng([recipe.seed, epoch, dist.rank])
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="batch", leave=True,
                   disable=not (progress and dist.is_main), file=sys.stderr, dynamic_ncols=True)
        total, seen = 0.0, 0
        for s in range(steps):
            b = idx[s * per_rank:(s + 1) * per_rank]
            if len(b) < 2:  # BatchNorm cannot train on one example
                continue
            xb = apply_batch(augment, x_train[b], rng) if augment is not None else x_train[b]
            xb, yb = torch.from_numpy(xb).to(dist.device), torch.from_numpy(y_train[b]).to(dist.device)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(b), seen + len(b)
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
        bar.close()
        lr = opt.param_groups[0]["lr"]
        stop = torch.zeros(1, dtype=torch.int64, device=dist.device)  # NCCL broadcasts device tensors only
        if dist.is_main:
            logits = predict_logits(net, x_val, dist.device)
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)))
            m = classification_metrics(y_val, softmax(logits))
            rec = EpochRecord(epoch + 1, lr, total / max(seen, 1), val_loss, m["accuracy"], m["auc"],
                              time.perf_counter() - t0)
            history.append(rec)
            if val_loss < best_loss - 1e-4:
                best_loss, best_epoch, bad = val_loss, epoch + 1, 0
                best_state = copy.deepcopy(net.state_dict())
            elif epoch + 1 > recipe.warmup * recipe.epochs:  # warm-up swings do not count
                bad += 1
            auc = "n/a" if rec.val_auc is None else f"{rec.val_auc:.4f}"
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, val acc %.4f, val auc %s, %.1f s%s",
                     epoch + 1, recipe.epochs, rec.train_loss, val_loss, rec.val_accuracy, auc,
                     rec.seconds, " (best)" if best_epoch == epoch + 1 else "")
            if checkpoint_dir is not None:  # every rank reads it on resume; rank 0 writes it
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                state = {"epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "torch_rng": [torch.get_rng_state()],
                         "cuda_rng": torch.cuda.get_rng_state() if dist.device != "cpu" else None,
                         "best_state": best_state, "best_epoch": best_epoch, "best_loss": best_loss,
                         "bad": bad, "history": [asdict(h) for h in history],
                         "recipe": recipe.to_dict(), "steps": steps}
                _save(last, state)
                if best_epoch == epoch + 1:
                    _save(checkpoint_dir / "best.pt", {"model": best_state, "epoch": best_epoch})
            if on_epoch_end is not None:
                on_epoch_end(rec)
            stop[0] = int(bad >= recipe.patience)
        if dist.world > 1:
            import torch.distributed as td

            td.broadcast(stop, src=0)
        if int(stop[0]):
            stopped = epoch + 1 < recipe.epochs
            if dist.is_main and stopped:
                log.info("early stop: validation loss has not improved for %d epochs", recipe.patience)
            break
    return FitResult(best_state, best_epoch, tuple(history), stopped, time.perf_counter() - t_fit)
