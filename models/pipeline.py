"""One training run, end to end: data -> carved held-out split -> preprocessing -> hybrid
-> calibration -> ONNX (checked, parity-tested) -> baselines -> the held-out split, plain
and under acquisition shifts, scored once -> run folder with metrics, table, figures, card.

Run folder (``out``)::

    model.onnx  model.fp16.onnx  model.int8.onnx  model_card.json  metrics.json  results.md
    curves.png  split.json
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

from models.baselines import BASELINES, decision_rule, fit_baseline
from models.card import ModelCard, file_sha256
from models.datasets import DataSource, load_source
from models.errors import ModelError
from models.export import OPSET, check_parity, export_onnx
from models.hybrid import HybridConfig, build_model
from models.metrics import classification_metrics, fit_temperature, softmax
from models.quantize import make_variants
from models.report import plot_confusion, plot_curves, results_table, shift_table, variant_table
from models.shifts import SHIFTS, apply_shift
from models.splits import HOLDOUT, SplitPlan, carve_source, image_digests
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
              resume: bool = False, prefix: Compose | None = None,
              split_plan: SplitPlan | None = None) -> dict | None:
    """Train, select, calibrate, export, compare and write the run folder.

    ``data`` is a path (an ``.npz`` or a DICOM folder) or an already-loaded
    :class:`DataSource`. ``prefix`` is the deterministic chain that already made the
    source's images from raw values (the edge's chain, for the cloud store): the model
    card's preprocessing is ``prefix`` followed by the chain fitted here, so it maps what
    the edge holds to the model's input. The source's train and val are pooled and
    re-cut by ``split_plan`` (default: 15 % held out, 15 % validation, seed 0); the
    held-out split is scored once, after every choice. Returns the metrics summary on rank
    0 (None on other ranks).
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
        if len(np.unique(np.concatenate([source.splits[s].labels for s in ("train", "val")
                                         if s in source.splits]))) < 2:
            raise ModelError("the train split holds a single class; nothing to learn")
        split_plan = split_plan or SplitPlan()
        source, cut, split_record = carve_source(source, split_plan)
        train, val = source.split("train"), source.split("val")
        if len(np.unique(train.labels)) < 2:
            raise ModelError("the carved train split holds a single class; nothing to learn")
        chain = build_preprocessing(source, recipe.max_image_size)
        card_chain = Compose([*prefix.transforms, *chain.transforms]) if prefix else chain
        x_train, x_val = apply_batch(chain, train.images), apply_batch(chain, val.images)
        input_shape = tuple(int(d) for d in x_train.shape[1:])
        arch = _architecture(input_shape, source.num_classes, recipe.model)
        net = build_model(arch, seed=recipe.seed)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)  # only once the data and settings are good
            log.info("data: %s, %d classes, %s images (held out by %s, seed %d), input %s; "
                     "%d parameters; device %s x %d", source.kind, source.num_classes,
                     " / ".join(f"{len(v)} {k}" for k, v in source.splits.items()), cut.by,
                     split_plan.seed, input_shape, sum(p.numel() for p in net.parameters()),
                     dist.device, dist.world)
            (out / "data_manifest.json").write_text(json.dumps(source.manifest, indent=1) + "\n")
            seen = sorted(set(image_digests(train.images)) | set(image_digests(val.images)))
            (out / "split.json").write_text(json.dumps({
                **split_record, "indices": {k: cut.indices(k).tolist() for k in ("train", "val", HOLDOUT)},
                "seen_images_sha256": seen}) + "\n")
            described = (str(data) if not isinstance(data, DataSource)
                         else f"{source.kind} source, manifest {source.manifest_sha256}")
            (out / "config.json").write_text(json.dumps({
                "data": described, "recipe": recipe.to_dict(), "device": dist.device,
                "world_size": dist.world, "preprocessing": card_chain.to_config(),
                "split": split_record,
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
        return _finish(net, arch, card_chain, chain, source, split_record, out, recipe, result,
                       x_train, x_val, dist, time.perf_counter() - t_start)
    finally:
        teardown_distributed(dist)


def _score_once(predict, source: DataSource, chain: Compose, decision: dict,
                shifted_inputs: list[tuple[str, np.ndarray]]) -> dict:
    """Metrics on the held-out split (and the source's own test split, if any), then on the
    held-out split under each acquisition shift, with the accuracy each shift costs."""
    hold = source.split(HOLDOUT)
    out = {HOLDOUT: classification_metrics(hold.labels, predict(apply_batch(chain, hold.images)), decision)}
    if "test" in source.splits:
        test = source.splits["test"]
        out["test"] = classification_metrics(test.labels, predict(apply_batch(chain, test.images)), decision)
    base = out[HOLDOUT]["accuracy"]
    per = {}
    for label, x in shifted_inputs:
        m = classification_metrics(hold.labels, predict(x), decision)
        per[label] = {"accuracy": m["accuracy"], "auc": m["auc"], "drop": base - m["accuracy"]}
    if per:
        accs = [v["accuracy"] for v in per.values()]
        aucs = [v["auc"] for v in per.values() if v["auc"] is not None]
        out["shifted"] = {"n": len(hold), "accuracy": float(np.mean(accs)),
                          "auc": float(np.mean(aucs)) if len(aucs) == len(per) else None,
                          "mean_drop": float(base - np.mean(accs)),
                          "worst": max(per, key=lambda k: per[k]["drop"]), "per_shift": per}
    return out


def _finish(net, arch, card_chain, chain, source, split_record, out, recipe, result, x_train,
            x_val, dist, wall_before) -> dict:
    t0 = time.perf_counter()
    train, val, hold = source.split("train"), source.split("val"), source.split(HOLDOUT)
    val_logits = predict_logits(net, x_val)
    temperature = fit_temperature(val_logits, val.labels)
    val_probs = softmax(val_logits, temperature)
    binary = source.num_classes == 2
    decision = decision_rule(recipe.threshold, val.labels, val_probs, source.num_classes)
    onnx_path = export_onnx(net, tuple(x_val.shape[1:]), out / "model.onnx", temperature)
    parity = check_parity(net, onnx_path, x_val, temperature, decision)
    log.info("ONNX export checked; parity on %d validation images: max |dprob| %.1e, labels identical",
             parity.n, parity.max_abs_diff)
    # every choice is made: the held-out split is scored once from here on
    shifted_inputs = [(s.label, apply_batch(chain, apply_shift(hold.images, s, source.intensity_range)))
                      for s in SHIFTS]
    hybrid = {"val": classification_metrics(val.labels, val_probs, decision),
              "val_argmax": classification_metrics(val.labels, val_probs),
              **_score_once(lambda x: softmax(predict_logits(net, x), temperature), source, chain,
                            decision, shifted_inputs)}
    log.info("hybrid: val accuracy %.4f, held-out accuracy %.4f, under shifts %.4f (worst: %s)",
             hybrid["val"]["accuracy"], hybrid[HOLDOUT]["accuracy"], hybrid["shifted"]["accuracy"],
             hybrid["shifted"]["worst"])
    calibration = x_train[np.random.default_rng(recipe.seed).permutation(len(x_train))[:256]]
    variants = {k: v.to_dict() for k, v in make_variants(
        onnx_path, calibration, apply_batch(chain, hold.images), hold.labels, decision).items()}
    log.info("variants on the held-out split: %s", ", ".join(
        f"{k} accuracy {v['holdout_accuracy']:.4f}, agrees {v['agreement_with_fp32']:.4f}, "
        f"{v['latency_ms']:.2f} ms" for k, v in variants.items()))
    metrics = {"hybrid": hybrid}
    notes = {"hybrid": f"epoch {result.best_epoch}, T={temperature:.2f}"
             + (f", threshold {decision['threshold']:.3f}" if binary else "")}
    for name in BASELINES:
        b = fit_baseline(name, x_train, train.labels, x_val, val.labels, source.num_classes,
                         seed=recipe.seed, threshold=recipe.threshold)
        m = {"val": classification_metrics(val.labels, b.val_probs, b.decision),
             **_score_once(b.predict_proba, source, chain, b.decision, shifted_inputs)}
        metrics[name] = {**m, "params": b.params, "decision": b.decision, "train_count": b.train_count,
                         "seconds": round(b.seconds, 2)}
        sub = "" if b.train_count == len(train) else f", {b.train_count}-image train subsample"
        notes[name] = ", ".join(f"{k}={v}" for k, v in b.params.items()) + sub
        log.info("baseline %s: val accuracy %.4f, held-out %.4f (%.1f s)", name, m["val"]["accuracy"],
                 m[HOLDOUT]["accuracy"], b.seconds)
    names = {"val": "val", HOLDOUT: "held-out (carved)", "shifted": "held-out, shifted (mean)",
             "test": "test (file's own)"}
    rows = [(name, names[split], metrics[name][split], notes[name])
            for split in names for name in metrics if split in metrics[name]]
    (out / "results.md").write_text(
        f"# Results: hybrid vs baselines\n\nData: {source.kind}, manifest {source.manifest_sha256[:16]}; "
        + (f"held-out split carved by {split_record['by']} (seed {split_record['plan']['seed']}) before "
           if split_record["plan"] else f"held-out split: {split_record['rule']}, fixed before ")
        + "validation was drawn; epoch, temperature and threshold chosen on validation only; the "
        "held-out split scored once, at the end.\n\n" + results_table(rows)
        + "\n## Held-out accuracy under acquisition shifts (test time only)\n\n"
        + shift_table({n: metrics[n] for n in metrics})
        + "\n## Exported precisions (held-out split)\n\n" + variant_table(variants))
    history = [asdict(h) for h in result.history]
    plot_curves(history, result.best_epoch, out / "curves.png")
    plot_confusion({n: metrics[n]["val"]["confusion_matrix"] for n in metrics},
                   source.class_names, out / "confusion_matrix.png")
    wall = wall_before + time.perf_counter() - t0
    schedule = asdict(result.schedule) if result.schedule else None
    summary = {**metrics, "variants": variants, "parity": parity.to_dict(), "temperature": temperature, "decision": decision,
               "split": split_record, "schedule": schedule,
               "best_epoch": result.best_epoch, "epochs_run": len(history),
               "stopped_early": result.stopped_early, "history": history,
               "timings": {"fit_seconds": round(result.seconds, 1), "total_seconds": round(wall, 1),
                           "mean_epoch_seconds": round(float(np.mean([h["seconds"] for h in history])), 2)
                           if history else None}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    digest = file_sha256(onnx_path)
    card = ModelCard(
        model_version=f"hybrid-{digest[:12]}", class_names=source.class_names,
        input_shape=tuple(x_val.shape[1:]), preprocessing=card_chain.to_config(), decision=decision,
        temperature=temperature, onnx_sha256=digest,
        data={"kind": source.kind, "manifest_sha256": source.manifest_sha256,
              "counts": {s: len(source.splits[s]) for s in source.splits}, "split": split_record,
              # the edge runs a model only on images of the modality it learned from
              **({"modality": source.manifest["modality"]} if "modality" in source.manifest else {})},
        metrics={"hybrid": hybrid, "variants": variants, **{n: {k: metrics[n][k] for k in ("val", HOLDOUT, "shifted", "test")
                                          if k in metrics[n]} for n in BASELINES}},
        architecture={"name": "cnn-transformer-hybrid", **arch.to_dict(), "onnx_opset": OPSET},
        training={"recipe": recipe.to_dict(), "schedule": schedule, "best_epoch": result.best_epoch,
                  "epochs_run": len(history), "device": dist.device, "world_size": dist.world,
                  **({"ranks_agree": result.ranks_agree} if result.ranks_agree is not None else {}),
                  "wall_seconds": round(wall, 1), "torch": torch.__version__,
                  "python": platform.python_version()},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    card.save(out / "model_card.json")
    log.info("run folder written: %s (model %s)", out, card.model_version)
    return summary
