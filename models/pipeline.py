"""One training run, end to end: data -> preprocessing -> hybrid -> calibration -> ONNX
(checked, parity-tested) -> baselines -> run folder with metrics, table, figures and card.

Run folder (``out``)::

    model.onnx  model_card.json  metrics.json  results.md  curves.png
    confusion_matrix.png  config.json  data_manifest.json  checkpoints/{last,best}.pt

Under ``torchrun`` every rank trains; rank 0 alone writes the folder.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.baselines import BASELINES, fit_baseline
from models.card import ModelCard, file_sha256
from models.datasets import DataSource, load_source
from models.errors import ModelError
from models.export import OPSET, check_parity, export_onnx
from models.hybrid import HybridConfig, build_model
from models.metrics import choose_threshold, classification_metrics, fit_temperature, softmax
from models.report import plot_confusion, plot_curves, results_table
from models.training import Recipe, fit, predict_logits, setup_distributed, teardown_distributed
from models.transforms import (Compose, EnsureChannels, Normalize, PercentileScale, Resize,
                               ScaleIntensity, ToChannelsFirst, apply_batch, channel_stats, from_config)

__all__ = ["target_size", "build_preprocessing", "check_out", "train_run"]

log = logging.getLogger(__name__)


def target_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """The data's own size, shrunk (aspect kept) so its longer side is at most ``longest``."""
    h, w = size
    if max(h, w) <= longest:
        return h, w
    scale = longest / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def build_preprocessing(source: DataSource, longest: int) -> Compose:
    """The chain for ``source``, its normalisation fitted on the train split only."""
    h, w = target_size(source.image_size, longest)
    shrink = h < source.image_size[0] or w < source.image_size[1]
    intensity = (ScaleIntensity(*source.intensity_range) if source.intensity_range
                 else PercentileScale())
    head = [EnsureChannels(source.channels), intensity,
            Resize(h, w, "area" if shrink else "bilinear")]
    sample = apply_batch(Compose([*head, ToChannelsFirst()]), source.split("train").images)
    mean, std = channel_stats(sample)
    return Compose([*head, Normalize(mean, std), ToChannelsFirst()])


def check_out(out: Path, resume: bool) -> None:
    """Refuse to write into a finished run or, unless resuming, into anything not empty."""
    if (out / "model_card.json").exists():
        raise ModelError(f"{out}: already holds a finished run; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise ModelError(f"{out}: not empty; choose another --out, or --resume an interrupted run")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")


def _architecture(input_shape: tuple[int, ...], num_classes: int, overrides: dict) -> HybridConfig:
    try:
        return HybridConfig(input_shape[0], num_classes, input_shape[1:], **{
            k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad architecture override: {exc}") from None


def train_run(data: str | Path | DataSource, out: str | Path, recipe: Recipe = Recipe(), *,
              labels_csv: str | Path | None = None, device: str = "auto", progress: bool = True,
              resume: bool = False, prefix: Compose | None = None) -> dict | None:
    """Train, select, calibrate, export, compare and write the run folder.

    ``data`` is a path (an ``.npz`` or a DICOM folder) or an already-loaded
    :class:`DataSource`. ``prefix`` is the deterministic chain that already made the
    source's images from raw values (the edge's chain, for the cloud store): the model
    card's preprocessing is ``prefix`` followed by the chain fitted here, so it maps what
    the edge holds to the model's input. Returns the metrics summary on rank 0 (None on
    other ranks).
    """
    t_start = time.perf_counter()
    dist = setup_distributed(device)
    out = Path(out)
    try:
        if dist.is_main:
            check_out(out, resume)
        if prefix is not None and (prefix.is_random or any(
                isinstance(t, ToChannelsFirst) for t in prefix.transforms)):
            raise ModelError("a preprocessing prefix must be deterministic and keep the (H, W) layout")
        source = data if isinstance(data, DataSource) else load_source(data, labels_csv, seed=recipe.seed)
        train, val = source.split("train"), source.split("val")
        test = source.splits.get("test")
        test = test if test is not None and len(test) else None
        if len(np.unique(train.labels)) < 2:
            raise ModelError("the train split holds a single class; nothing to learn")
        chain = build_preprocessing(source, recipe.max_image_size)
        card_chain = Compose([*prefix.transforms, *chain.transforms]) if prefix else chain
        x_train, x_val = apply_batch(chain, train.images), apply_batch(chain, val.images)
        x_test = apply_batch(chain, test.images) if test is not None else None
        input_shape = tuple(int(d) for d in x_train.shape[1:])
        arch = _architecture(input_shape, source.num_classes, recipe.model)
        net = build_model(arch, seed=recipe.seed)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)  # only once the data and settings are good
            log.info("data: %s, %d classes, %d train / %d val%s images, input %s; %d parameters; "
                     "device %s x %d", source.kind, source.num_classes, len(train), len(val),
                     f" / {len(test)} test" if test is not None else "", input_shape,
                     sum(p.numel() for p in net.parameters()), dist.device, dist.world)
            (out / "data_manifest.json").write_text(json.dumps(source.manifest, indent=1) + "\n")
            described = (str(data) if not isinstance(data, DataSource)
                         else f"{source.kind} source, manifest {source.manifest_sha256}")
            (out / "config.json").write_text(json.dumps({
                "data": described, "recipe": recipe.to_dict(), "device": dist.device,
                "world_size": dist.world, "preprocessing": card_chain.to_config(),
                **({"prefix": prefix.to_config(), "fitted": chain.to_config()} if prefix else {}),
            }, indent=2) + "\n")
        result = fit(net, x_train, train.labels, x_val, val.labels, recipe, from_config(recipe.augment),
                     dist, checkpoint_dir=out / "checkpoints",
                     resume=resume, progress=progress)
        if not dist.is_main:
            return None
        if result.best_epoch < 1:
            raise ModelError("training did not produce a usable model (validation loss never "
                             "finite); try a lower --lr")
        net.load_state_dict(result.best_state)
        net.cpu().eval()
        return _finish(net, arch, card_chain, source, out, recipe, result, x_train, x_val, x_test,
                       dist, time.perf_counter() - t_start)
    finally:
        teardown_distributed(dist)


def _finish(net, arch, chain, source, out, recipe, result, x_train, x_val, x_test, dist,
            wall_before) -> dict:
    t0 = time.perf_counter()
    train, val = source.split("train"), source.split("val")
    test = source.splits.get("test") if x_test is not None else None
    val_logits = predict_logits(net, x_val)
    temperature = fit_temperature(val_logits, val.labels)
    val_probs = softmax(val_logits, temperature)
    binary = source.num_classes == 2
    decision = ({"rule": "threshold", "threshold": choose_threshold(val.labels, val_probs)}
                if binary else {"rule": "argmax"})
    onnx_path = export_onnx(net, tuple(x_val.shape[1:]), out / "model.onnx", temperature)
    parity = check_parity(net, onnx_path, x_val, temperature, decision)
    log.info("ONNX export checked; parity on %d validation images: max |dprob| %.1e, labels identical",
             parity.n, parity.max_abs_diff)
    hybrid = {"val": classification_metrics(val.labels, val_probs, decision),
              "val_argmax": classification_metrics(val.labels, val_probs)}
    if x_test is not None:
        hybrid["test"] = classification_metrics(test.labels, softmax(predict_logits(net, x_test), temperature), decision)
    metrics = {"hybrid": hybrid}
    notes = {"hybrid": f"epoch {result.best_epoch}, T={temperature:.2f}"
             + (f", threshold {decision['threshold']:.3f}" if binary else "")}
    for name in BASELINES:
        b = fit_baseline(name, x_train, train.labels, x_val, val.labels, source.num_classes,
                         x_test, seed=recipe.seed)
        m = {"val": classification_metrics(val.labels, b.val_probs, b.decision)}
        if b.test_probs is not None:
            m["test"] = classification_metrics(test.labels, b.test_probs, b.decision)
        metrics[name] = {**m, "params": b.params, "decision": b.decision, "train_count": b.train_count,
                         "seconds": round(b.seconds, 2)}
        sub = "" if b.train_count == len(train) else f", {b.train_count}-image train subsample"
        notes[name] = ", ".join(f"{k}={v}" for k, v in b.params.items()) + sub
        log.info("baseline %s: val accuracy %.4f (%.1f s)", name, m["val"]["accuracy"], b.seconds)
    rows = [(name, split, metrics[name][split], notes[name])
            for split in ("val", "test") for name in metrics if split in metrics[name]]
    (out / "results.md").write_text(
        f"# Results: hybrid vs baselines\n\nData: {source.kind}, manifest {source.manifest_sha256[:16]}; "
        f"decisions chosen on validation only.\n\n" + results_table(rows))
    history = [asdict(h) for h in result.history]
    plot_curves(history, result.best_epoch, out / "curves.png")
    plot_confusion({n: metrics[n]["val"]["confusion_matrix"] for n in metrics},
                   source.class_names, out / "confusion_matrix.png")
    wall = wall_before + time.perf_counter() - t0
    summary = {**metrics, "parity": parity.to_dict(), "temperature": temperature, "decision": decision,
               "best_epoch": result.best_epoch, "epochs_run": len(history),
               "stopped_early": result.stopped_early, "history": history,
               "timings": {"fit_seconds": round(result.seconds, 1), "total_seconds": round(wall, 1),
                           "mean_epoch_seconds": round(float(np.mean([h["seconds"] for h in history])), 2)
                           if history else None}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    digest = file_sha256(onnx_path)
    card = ModelCard(
        model_version=f"hybrid-{digest[:12]}", class_names=source.class_names,
        input_shape=tuple(x_val.shape[1:]), preprocessing=chain.to_config(), decision=decision,
        temperature=temperature, onnx_sha256=digest,
        data={"kind": source.kind, "manifest_sha256": source.manifest_sha256,
              "counts": {s: len(source.splits[s]) for s in source.splits},
              # the edge runs a model only on images of the modality it learned from
              **({"modality": source.manifest["modality"]} if "modality" in source.manifest else {})},
        metrics={"hybrid": hybrid, **{n: {"val": metrics[n]["val"]} for n in BASELINES}},
        architecture={"name": "cnn-transformer-hybrid", **arch.to_dict(), "onnx_opset": OPSET},
        training={"recipe": recipe.to_dict(), "best_epoch": result.best_epoch,
                  "epochs_run": len(history), "device": dist.device, "world_size": dist.world,
                  "wall_seconds": round(wall, 1), "torch": torch.__version__,
                  "python": platform.python_version()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    card.save(out / "model_card.json")
    log.info("run folder written: %s (model %s)", out, card.model_version)
    return summary
