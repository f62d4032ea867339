"""FP32 against its FP16 and INT8 variants, on a finished run folder's carved held-out split.

Rebuilds the run's carved split from its card (as ``medchain evaluate --split holdout``
does), calibrates INT8 on 256 of the run's training images, and prints each precision's
held-out accuracy, agreement with FP32 and single-thread batch-1 CPU latency (FP32, the
baseline, measured in the same run). Variants are written to ``--out`` (default: a temporary
folder), never into the run folder.

    nice -n 19 python bench/quantized.py --run RUN/ --data pneumoniamnist_trainval.npz
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.card import ModelCard  # noqa: E402
from models.datasets import load_source  # noqa: E402
from models.quantize import make_variants  # noqa: E402
from models.report import variant_table  # noqa: E402
from models.splits import HOLDOUT, SplitPlan, carve_source  # noqa: E402
from models.transforms import apply_batch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    card = ModelCard.load(args.run / "model_card.json")
    source = load_source(args.data)
    if source.manifest_sha256 != card.data["manifest_sha256"]:
        raise SystemExit(f"{args.data} is not the data {args.run} was trained on")
    carved, _, record = carve_source(source, SplitPlan(**card.data["split"]["plan"]))
    assert record["holdout_sha256"] == card.data["split"]["holdout_sha256"]
    chain = card.preprocessing_chain()
    train, hold = carved.split("train"), carved.split(HOLDOUT)
    seed = card.training["recipe"]["seed"]
    calib = apply_batch(chain, train.images[np.random.default_rng(seed).permutation(len(train))[:256]])
    x_hold = apply_batch(chain, hold.images)
    out = args.out or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "model.onnx", out / "model.onnx")
    variants = {k: v.to_dict() for k, v in
                make_variants(out / "model.onnx", calib, x_hold, hold.labels, card.decision).items()}
    (out / "variants.json").write_text(json.dumps(variants, indent=1) + "\n")
    print(f"run {args.run} ({card.model_version}), {len(hold)} held-out images, "
          f"INT8 calibrated on {len(calib)} training images")
    print(variant_table(variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
