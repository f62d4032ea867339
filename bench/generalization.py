"""Old recipe against new on the carved held-out split: validation vs held-out vs shifted.

For each seed the same ``train_run`` that ``medchain train`` calls runs once per recipe, on
the split carved with that seed (both recipes see the same split), and the KNN and SVM
baselines come from the same run folders. ``--subsample N`` first draws a stratified
N-image subsample of the file's train+val images (seed 0, written under ``--out``; never
committed) to test small-data behaviour. Finished runs are reused, so an interrupted
benchmark resumes. Prints a markdown table (mean and min..max over seeds) and writes
``summary.json`` under ``--out``.

    nice -n 19 python bench/generalization.py --data pneumoniamnist_trainval.npz \\
        --out /tmp/gen --seeds 0 1 2 [--subsample 500] [--recipes old new] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.baselines import stratified_subsample  # noqa: E402
from models.pipeline import train_run  # noqa: E402
from models.splits import SplitPlan  # noqa: E402
from models.training import Recipe  # noqa: E402

# the recipe before issue 19: 20 epochs, patience 6 on the raw validation loss counted from
# the end of the warm-up, no weight averaging, affine augmentation only, label smoothing
# 0.05, threshold chosen on validation
AFFINE = [{"name": "RandomAffine", "degrees": 10.0, "scale": 0.1, "translate": 0.08, "p": 1.0}]
RECIPES = {
    "old": dict(epochs=20, patience=6, label_smoothing=0.05, ema=False, smoothing=0.0,
                threshold="validation", augment=AFFINE, settle=0.15),
    "new": {},
    "new-no-ema": dict(ema=False),
    "new-ema": dict(ema=True),
    "new-val-threshold": dict(threshold="validation"),
    "new-intensity": dict(augment=[*AFFINE, {"name": "RandomIntensity", "contrast": 0.2, "brightness": 0.1,
                                             "gamma": 0.3, "p": 0.8}]),
    "new-desc": dict(model={"descriptors": True}),  # the HOG + wavelet branch (models/descriptors.py)
    "new-30": dict(epochs=30),  # a longer floor for large data: 30 epochs on the full file instead of 20
}
MODELS = ("hybrid", "knn", "svm")
SPLITS = ("val", "holdout", "shifted")


def subsample(data: Path, n: int, out: Path) -> Path:
    path = out / f"sub{n}.npz"
    if path.exists():
        return path
    with np.load(data) as f:
        x = np.concatenate([f["train_images"], f["val_images"]])
        y = np.concatenate([f["train_labels"], f["val_labels"]])
    idx = stratified_subsample(y.ravel(), n, seed=0)
    np.savez_compressed(path, train_images=x[idx], train_labels=y[idx])
    return path


def run_one(data: Path, out: Path, recipe: str, seed: int) -> dict:
    folder = out / f"{recipe}-s{seed}"
    done = folder / "metrics.json"
    if not done.exists():
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        t0, c0 = time.perf_counter(), os.times()
        train_run(data, folder, Recipe(seed=seed, **RECIPES[recipe]), device="cpu", progress=False,
                  split_plan=SplitPlan(seed=seed))
        c1 = os.times()
        (folder / "bench.json").write_text(json.dumps({
            "wall_s": time.perf_counter() - t0,
            "cpu_s": (c1.user - c0.user) + (c1.system - c0.system)}) + "\n")
    m = json.loads(done.read_text())
    b = json.loads((folder / "bench.json").read_text())
    row = {"recipe": recipe, "seed": seed, **b, "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
           "fit_s": m["timings"]["fit_seconds"]}
    for model in MODELS:
        for split in SPLITS:
            row[f"{model}.{split}.acc"] = m[model][split]["accuracy"]
            row[f"{model}.{split}.auc"] = m[model][split]["auc"]
    return row


def _cell(rows: list[dict], key: str) -> str:
    v = np.array([r[key] for r in rows], float)
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ({v.min():.3f}..{v.max():.3f})"


def table(rows: list[dict], label: str) -> str:
    lines = ["| data | recipe | model | val acc | held-out acc | held-out AUC | shifted acc | seeds | train time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rr = [r for r in rows if r["recipe"] == recipe]
        for model in MODELS:
            t = f"{np.mean([r['fit_s'] for r in rr]):.0f} s fit, {np.mean([r['wall_s'] for r in rr]):.0f} s run" \
                if model == "hybrid" else ""
            lines.append(f"| {label} | {recipe} | {model} | {_cell(rr, model + '.val.acc')} | "
                         f"{_cell(rr, model + '.holdout.acc')} | {_cell(rr, model + '.holdout.auc')} | "
                         f"{_cell(rr, model + '.shifted.acc')} | {len(rr)} | {t} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["old", "new"], choices=list(RECIPES))
    ap.add_argument("--subsample", type=int)
    ap.add_argument("--report-only", action="store_true", help="tabulate finished runs, train nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    data = subsample(args.data, args.subsample, args.out) if args.subsample else args.data
    rows = []
    for seed in args.seeds:
        for recipe in args.recipes:
            if args.report_only and not (args.out / f"{recipe}-s{seed}" / "bench.json").exists():
                continue
            rows.append(run_one(data, args.out, recipe, seed))
            r = rows[-1]
            print(f"{recipe} seed {seed}: val {r['hybrid.val.acc']:.4f} held-out {r['hybrid.holdout.acc']:.4f} "
                  f"shifted {r['hybrid.shifted.acc']:.4f}; knn {r['knn.holdout.acc']:.4f} "
                  f"svm {r['svm.holdout.acc']:.4f}; epoch {r['best_epoch']}/{r['epochs_run']}, "
                  f"{r['wall_s']:.0f} s", flush=True)
    if not args.report_only:
        (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    label = f"{args.subsample}-image subsample" if args.subsample else args.data.name
    print(table(rows, label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
