"""The seeded training loop: one process, or many under ``torchrun`` with no change.

Reproducibility: the weights are initialised from ``recipe.seed``; each epoch's shuffle
comes from ``(seed, epoch)`` and each rank's augmentations from ``(seed, epoch, rank)``,
and the torch RNG (dropout) is saved in checkpoints, so a run (and a resumed run) repeats
bit for bit on the same machine and thread count. Under ``torchrun`` (``WORLD_SIZE`` set)
the model is wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA), every rank
takes an equal shard of each epoch, and rank 0 alone evaluates, checkpoints and decides
when to stop. The best epoch is chosen on a smoothed validation loss (an exponential
average over epochs, of the EMA-averaged weights when the recipe averages), so one lucky
epoch on a small validation split does not pick the model; patience counts only epochs
after ``settle`` of the budget: until the one-cycle learning rate has come down, validation
swings say nothing about convergence (on the full PneumoniaMNIST file a run counting from
the warm-up stopped at epoch 8 of 20, keeping epoch 1). The epoch budget and
patience scale with the number of training images (:meth:`Recipe.schedule`).
"""

from __future__ import annotations

import copy
import io
import logging
import math
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

__all__ = ["Recipe", "Schedule", "Dist", "setup_distributed", "teardown_distributed", "EpochRecord",
           "FitResult", "fit", "predict_logits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How to train; the defaults are what ``medchain train`` runs on any data. ``epochs``
    and ``patience`` left at None are derived from the train split's size
    (:meth:`schedule`); ``threshold`` is ``"calibrated"`` (0.5 on temperature-calibrated
    probabilities) or ``"validation"`` (the accuracy-maximising threshold on validation)."""

    epochs: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.15
    label_smoothing: float = 0.1
    patience: int | None = None
    seed: int = 0
    max_image_size: int = 64
    model: dict = field(default_factory=dict)
    # RandomIntensity (gamma/contrast jitter) measured and left out: +1 of 75 held-out images on
    # the 500-image PneumoniaMNIST subsample, no learning at all in the demo's 150 steps on CR
    augment: list = field(default_factory=lambda: [
        {"name": "RandomAffine", "degrees": 10.0, "scale": 0.1, "translate": 0.08, "p": 1.0}])
    ema: bool = False  # measured: no gain on the held-out split (docs/models.md)
    smoothing: float = 0.5
    threshold: str = "calibrated"
    min_steps: int = 600
    settle: float = 0.5  # share of the epoch budget before patience starts counting

    def __post_init__(self) -> None:
        if ((self.epochs is not None and self.epochs < 1) or self.batch_size < 2 or self.lr <= 0
                or (self.patience is not None and self.patience < 1) or self.min_steps < 1):
            raise ModelError("recipe needs epochs >= 1, batch_size >= 2, lr > 0, patience >= 1")
        if not 0 <= self.settle < 1:
            raise ModelError("recipe needs 0 <= settle < 1")
        if not 0 <= self.smoothing < 1 or self.threshold not in ("calibrated", "validation"):
            raise ModelError("recipe needs 0 <= smoothing < 1 and threshold 'calibrated' or 'validation'")

    def to_dict(self) -> dict:
        return asdict(self)

    def schedule(self, n_train: int, world: int = 1) -> Schedule:
        """The epoch budget, patience and EMA decay for ``n_train`` images: at least 20
        epochs and at least ``min_steps`` optimizer steps (so 500 images train as long as
        they need, not 20 x 8 steps), at most 200 epochs; patience a quarter of the budget
        (at least 5); the EMA's horizon about two epochs."""
        per_rank = max(2, -(-self.batch_size // world))
        steps = math.ceil(math.ceil(n_train / world) / per_rank)
        epochs = self.epochs or int(min(200, max(20, -(-self.min_steps // steps))))
        patience = self.patience or max(5, -(-epochs // 4))
        decay = min(0.998, max(0.9, 1 - 1 / (2 * steps))) if self.ema else 0.0
        return Schedule(epochs, patience, decay, steps, per_rank)


@dataclass(frozen=True)
class Schedule:
    """What a recipe decided for one data set (recorded in metrics and the card)."""

    epochs: int
    patience: int
    ema_decay: float
    steps_per_epoch: int
    per_rank_batch: int


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
    val_criterion: float = float("nan")


@dataclass(frozen=True)
class FitResult:
    best_state: dict
    best_epoch: int
    history: tuple[EpochRecord, ...]
    stopped_early: bool
    seconds: float
    schedule: Schedule | None = None
    # under DDP: whether every rank ended with the same weights (None with one process)
    ranks_agree: bool | None = None


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


class _Ema:
    """Exponential moving average of the weights (and BatchNorm statistics), with the usual
    warm-up ``min(decay, (1 + k) / (10 + k))`` so early averages do not drag in the
    initialisation. What is evaluated, kept and exported when the recipe asks for it."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.net, self.decay, self.updates = copy.deepcopy(net), decay, 0
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.net.state_dict().values(), net.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(p.detach(), alpha=1 - d)
            else:
                e.copy_(p)


def fit(net: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
        y_val: np.ndarray, recipe: Recipe, augment: Transform, dist: Dist = Dist(),
        checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
        on_epoch_end: Callable[[EpochRecord], None] | None = None) -> FitResult:
    """Train ``net`` on preprocessed arrays; return the best weights by the smoothed
    validation loss (of the EMA weights when the recipe averages).

    ``on_epoch_end`` (rank 0, after the checkpoint is written) lets an orchestrator report
    progress; an exception it raises stops training with the checkpoint ready to resume.
    """
    from tqdm import tqdm

    torch.manual_seed(recipe.seed + dist.rank)
    net.to(dist.device)
    plan = recipe.schedule(len(x_train), dist.world)
    per_rank, steps, epochs = plan.per_rank_batch, plan.steps_per_epoch, plan.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=epochs * steps,
                                                pct_start=recipe.warmup)
    ema = _Ema(net, plan.ema_decay) if recipe.ema else None
    judged = ema.net if ema else net
    history: list[EpochRecord] = []
    best_state, best_epoch, best_loss, bad, start = copy.deepcopy(net.state_dict()), -1, float("inf"), 0, 0
    smooth = None
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    if resume and last is not None and last.is_file():
        ck = torch.load(last, map_location=dist.device, weights_only=True)
        if ck["recipe"] != recipe.to_dict() or ck["steps"] != steps:
            raise ModelError(f"{last}: checkpoint was made with another recipe; start a new run")
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.net.load_state_dict(ck["ema"])
            ema.updates = ck["ema_updates"]
        # RNG states are CPU byte tensors whatever map_location moved them to
        torch.set_rng_state(ck["torch_rng"][dist.rank if dist.rank < len(ck["torch_rng"]) else 0].cpu())
        if dist.device != "cpu" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu())
        best_state, best_epoch, best_loss, bad = ck["best_state"], ck["best_epoch"], ck["best_loss"], ck["bad"]
        smooth = ck["smooth"]
        history = [EpochRecord(**h) for h in ck["history"]]
        start = ck["epoch"] + 1
        if dist.is_main:
            log.info("resuming from %s at epoch %d", last, start + 1)
    model = net
    if dist.world > 1:  # after resuming, so every rank starts from the same weights
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dist.local_rank] if dist.device != "cpu" else None)
    if dist.is_main and start == 0:
        log.info("schedule for %d train images: %d epochs of %d steps, patience %d, EMA %s",
                 len(x_train), epochs, steps, plan.patience,
                 f"{plan.ema_decay:.4f}" if ema else "off")
    t_fit = time.perf_counter()
    stopped = False
    for epoch in range(start, epochs):
        if bad >= plan.patience:
            stopped = True
            break
        t0 = time.perf_counter()
        model.train()
        idx = _shard(len(x_train), recipe.seed, epoch, dist)
        rng = np.random.default_rng([recipe.seed, epoch, dist.rank])
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=True,
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
            if ema is not None:
                ema.update(net)
            total, seen = total + loss.item() * len(b), seen + len(b)
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
        bar.close()
        lr = opt.param_groups[0]["lr"]
        stop = torch.zeros(1, dtype=torch.int64, device=dist.device)  # NCCL broadcasts device tensors only
        if dist.is_main:
            logits = predict_logits(judged, x_val, dist.device)
            val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val)))
            smooth = val_loss if smooth is None else recipe.smoothing * smooth + (1 - recipe.smoothing) * val_loss
            m = classification_metrics(y_val, softmax(logits))
            rec = EpochRecord(epoch + 1, lr, total / max(seen, 1), val_loss, m["accuracy"], m["auc"],
                              time.perf_counter() - t0, smooth)
            history.append(rec)
            if smooth < best_loss - 1e-4:
                best_loss, best_epoch, bad = smooth, epoch + 1, 0
                best_state = copy.deepcopy(judged.state_dict())
            elif epoch + 1 > max(recipe.warmup, recipe.settle) * epochs:  # high-lr swings do not count
                bad += 1
            auc = "n/a" if rec.val_auc is None else f"{rec.val_auc:.4f}"
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f (smoothed %.4f), val acc %.4f, "
                     "val auc %s, %.1f s%s", epoch + 1, epochs, rec.train_loss, val_loss, smooth,
                     rec.val_accuracy, auc, rec.seconds, " (best)" if best_epoch == epoch + 1 else "")
            if checkpoint_dir is not None:  # every rank reads it on resume; rank 0 writes it
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                state = {"epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "torch_rng": [torch.get_rng_state()],
                         "cuda_rng": torch.cuda.get_rng_state() if dist.device != "cpu" else None,
                         "best_state": best_state, "best_epoch": best_epoch, "best_loss": best_loss,
                         "bad": bad, "smooth": smooth, "history": [asdict(h) for h in history],
                         "recipe": recipe.to_dict(), "steps": steps,
                         **({"ema": ema.net.state_dict(), "ema_updates": ema.updates} if ema else {})}
                _save(last, state)
                if best_epoch == epoch + 1:
                    _save(checkpoint_dir / "best.pt", {"model": best_state, "epoch": best_epoch})
            if on_epoch_end is not None:
                on_epoch_end(rec)
            stop[0] = int(bad >= plan.patience)
        if dist.world > 1:
            import torch.distributed as td

            td.broadcast(stop, src=0)
        if int(stop[0]):
            stopped = epoch + 1 < epochs
            if dist.is_main and stopped:
                log.info("early stop: smoothed validation loss has not improved for %d epochs",
                         plan.patience)
            break
    agree = _ranks_agree(net, dist) if dist.world > 1 else None
    return FitResult(best_state, best_epoch, tuple(history), stopped, time.perf_counter() - t_fit, plan,
                     agree)


def _ranks_agree(net: torch.nn.Module, dist) -> bool:
    """Whether every rank holds the same weights: each hashes its parameters and the digests
    are gathered (DDP keeps replicas equal only if every rank took every step; a rank that
    skipped one would train on silently). Buffers are left out: DDP re-sends rank 0's at
    each forward, so after the last step each rank's batch-norm statistics are its own."""
    import hashlib

    import torch.distributed as td

    h = hashlib.sha256()
    for name, t in sorted(net.named_parameters()):
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    mine = torch.tensor([int.from_bytes(h.digest()[:7], "big")], dtype=torch.int64, device=dist.device)
    every = [torch.zeros_like(mine) for _ in range(dist.world)]
    td.all_gather(every, mine)
    agree = len({int(t.item()) for t in every}) == 1
    if not agree:
        log.error("the %d ranks ended with different weights", dist.world)
    return agree
