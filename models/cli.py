"""``medchain train`` and ``medchain evaluate``. Nothing heavy at import: the handlers
import torch (train) or ONNX Runtime (evaluate) when they run."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train", help="train the CNN-transformer hybrid and its baselines; export ONNX",
        description="Train on the train split, select on validation, write RUN/model.onnx, "
                    "RUN/model_card.json, metrics, results table and figures. Runs unchanged "
                    "under torchrun for DistributedDataParallel.")
    tr.add_argument("--data", required=True, help="MedMNIST-layout .npz, or a folder of DICOM files")
    tr.add_argument("--out", required=True, help="run folder to create")
    tr.add_argument("--labels", help="labels CSV for a DICOM folder (default FOLDER/labels.csv)")
    tr.add_argument("--epochs", type=int, help="maximum epochs (default: scaled to the data's size)")
    tr.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    tr.add_argument("--patience", type=int, help="early-stopping patience in epochs (default: a "
                    "quarter of the epoch budget, at least 5)")
    tr.add_argument("--seed", type=int, help="seed of training (default 0)")
    tr.add_argument("--split-seed", type=int, default=0, help="seed of the carved held-out and "
                    "validation splits (default 0; recorded in the card)")
    tr.add_argument("--max-image-size", type=int, help="longest side fed to the model (default 64; "
                    "smaller data keeps its own size)")
    tr.add_argument("--model", metavar="JSON", help='architecture overrides, e.g. \'{"depth": 1}\'')
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto = CUDA when present, else CPU")
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=_train)

    ev = sub.add_parser(
        "evaluate", help="evaluate an exported model on a data split; prints metrics JSON",
        description="Run RUN/model.onnx through its card's preprocessing and decision rule on "
                    "one split and print accuracy, precision, recall, f1, auc and the "
                    "confusion matrix as JSON on stdout.")
    ev.add_argument("--model", required=True, help="model.onnx (its model_card.json beside it)")
    ev.add_argument("--data", required=True, help="MedMNIST-layout .npz, or a folder of DICOM files")
    ev.add_argument("--split", default="test", choices=["train", "val", "test", "holdout"],
                    help="holdout: the split carved from the model's own training data "
                         "(rebuilt from its card); train and val of that data are refused")
    ev.add_argument("--card", help="model card (default: model_card.json beside the model)")
    ev.add_argument("--labels", help="labels CSV for a DICOM folder")
    ev.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from models.errors import ModelError
    from models.pipeline import train_run
    from models.training import Recipe

    overrides = {k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "patience": args.patience, "seed": args.seed, "max_image_size": args.max_image_size,
    }.items() if v is not None}
    if args.model:
        try:
            model = json.loads(args.model)
        except ValueError:
            raise ModelError("--model must be a JSON object") from None
        if not isinstance(model, dict):
            raise ModelError("--model must be a JSON object")
        overrides["model"] = model
    from models.splits import SplitPlan

    summary = train_run(args.data, args.out, Recipe(**overrides), labels_csv=args.labels,
                        device=args.device, progress=not args.no_progress, resume=args.resume,
                        split_plan=SplitPlan(seed=args.split_seed))
    if summary is not None:
        for split, what in (("val", "validation"), ("holdout", "held-out (carved, never chosen on)"),
                            ("shifted", "held-out under acquisition shifts (mean)")):
            h = summary["hybrid"][split]
            print(f"{what}: accuracy {h['accuracy']:.4f}, auc {h['auc'] if h['auc'] is None else round(h['auc'], 4)}; "
                  f"knn {summary['knn'][split]['accuracy']:.4f}, svm {summary['svm'][split]['accuracy']:.4f}")
        print(f"epoch {summary['best_epoch']} of {summary['epochs_run']}; {summary['timings']['total_seconds']:.0f} s")
        print(f"run folder: {args.out}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_as_torchrun_worker()
    return 0


def _leave_as_torchrun_worker() -> None:
    """End a torchrun worker whose work is written and whose process group is destroyed
    without the interpreter's exit: native thread pools (gloo's, libtorch's) destroyed at
    exit can abort the process ("terminate called without an active exception"; seen once in
    CI, on rank 1, after rank 0 had written the complete run folder), and torchrun then
    reports a finished run as failed. Output is flushed first; nothing else is left to do."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate

    result = evaluate(args.model, args.data, args.split, card_path=args.card, labels_csv=args.labels)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
