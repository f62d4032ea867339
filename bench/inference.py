"""Inference speed of the hybrid: ONNX Runtime against PyTorch eager, same inputs, same run.

    python bench/inference.py [--run RUN/] [--iters 300] [--threads N] [--providers cpu]

Without ``--run`` it builds the default hybrid for 1x28x28 inputs and 2 classes (seeded
weights: speed does not depend on their values) and exports it; with ``--run`` it uses that
run's ``model.onnx`` and the best checkpoint. Both engines get the same thread count and
the same inputs, interleaved round by round so machine load hits both alike. It prints
latency per image at batch 1 (p50/p99) and throughput at batch 32, and the ratio of ONNX
Runtime to eager. Target on CPU: ONNX Runtime >= 2x eager at batch 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.export import export_onnx  # noqa: E402
from models.hybrid import HybridConfig, Probabilities, build_model  # noqa: E402
from models.runtime import OnnxModel  # noqa: E402


def load_models(run: Path | None, tmp: Path, providers: list[str], threads: int):
    if run is None:
        config = HybridConfig(1, 2, (28, 28))
        net = build_model(config, seed=0).eval()
        path = export_onnx(net, (1, 28, 28), tmp / "model.onnx")
        temperature = 1.0
    else:
        from models.card import ModelCard

        card = ModelCard.load(run / "model_card.json")
        arch = {k: v for k, v in card.architecture.items() if k not in ("name", "onnx_opset")}
        config = HybridConfig.from_dict(arch)
        net = build_model(config).eval()
        net.load_state_dict(torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"])
        path, temperature = run / "model.onnx", card.temperature
    eager = Probabilities(net, temperature).eval()
    onnx_model = OnnxModel.load(path, providers=providers, threads=threads)
    return config, eager, onnx_model


def timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a run folder from `medchain train`")
    ap.add_argument("--iters", type=int, default=300, help="batch-1 calls per engine")
    ap.add_argument("--batches", type=int, default=30, help="batch-32 calls per engine")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--providers", default="cpu", help="comma-separated, e.g. cuda,cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config, eager, ort_model = load_models(args.run, Path(tmp), args.providers.split(","), args.threads)
        shape = (config.in_channels, *config.image_size)
        rng = np.random.default_rng(0)
        singles = rng.normal(size=(args.iters, 1, *shape)).astype(np.float32)
        batches = rng.normal(size=(args.batches, 32, *shape)).astype(np.float32)

        def run_eager(x):
            with torch.inference_mode():
                return eager(torch.from_numpy(x)).numpy()

        def run_ort(x):
            return ort_model.predict_proba(x)

        engines = {"pytorch eager": run_eager, "onnxruntime": run_ort}
        diff = float(np.max(np.abs(run_eager(batches[0]) - run_ort(batches[0]))))
        for fn in engines.values():  # warm up
            for x in singles[:20]:
                fn(x)
            fn(batches[0])
        lat = {n: [] for n in engines}
        thr = {n: [] for n in engines}
        for i in range(args.iters):
            for n, fn in engines.items():
                lat[n].append(timed(fn, singles[i]))
        for i in range(args.batches):
            for n, fn in engines.items():
                thr[n].append(timed(fn, batches[i]))
    print(f"model: hybrid {shape} -> {config.num_classes} classes; threads {args.threads}; "
          f"onnxruntime providers {', '.join(ort_model.providers)}; torch {torch.__version__}")
    print(f"max |dprob| between engines on one batch: {diff:.1e}")
    print(f"{'engine':<14} {'b1 p50 ms':>10} {'b1 p99 ms':>10} {'b32 img/s':>10}")
    res = {}
    for n in engines:
        p50, p99 = np.percentile(lat[n], [50, 99]) * 1e3
        ips = 32 / np.median(thr[n])
        res[n] = (p50, p99, ips)
        print(f"{n:<14} {p50:10.3f} {p99:10.3f} {ips:10.0f}")
    e, o = res["pytorch eager"], res["onnxruntime"]
    speed_b1, speed_b32 = e[0] / o[0], o[2] / e[2]
    print(f"onnxruntime vs eager: {speed_b1:.2f}x at batch 1 (p50), {e[1] / o[1]:.2f}x (p99), "
          f"{speed_b32:.2f}x throughput at batch 32")
    print(f"target onnxruntime >= 2x eager at batch 1: {'met' if speed_b1 >= 2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
