"""Training and inference on a CUDA GPU against the same machine's CPU, in one run.

    python bench/gpu.py --data D.npz --out DIR [--cpu-epochs 3] [--iters 300]

For a host with a GPU (CI has none). It trains the default recipe with ``--device cuda``
through the same ``train_run`` that ``medchain train`` calls, then the same recipe on the
CPU for ``--cpu-epochs`` epochs (a per-epoch time is all a baseline needs), and compares
seconds per epoch and training images per second. Then inference on the CUDA run's model:
PyTorch eager on the GPU and ONNX Runtime with the CUDA execution provider where this
onnxruntime build has it (else the CPU one, said so), batch 1 latency and batch 256
throughput. Prints a table last and writes ``DIR/gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.pipeline import train_run  # noqa: E402
from models.training import Recipe  # noqa: E402


def train(data: Path, out: Path, device: str, epochs: int | None) -> dict:
    recipe = Recipe() if epochs is None else Recipe(epochs=epochs)
    t0 = time.perf_counter()
    summary = train_run(data, out, recipe, device=device, progress=False)
    wall = time.perf_counter() - t0
    card = json.loads((out / "model_card.json").read_text())
    n_train = card["data"]["counts"]["train"]
    epochs_run = summary["epochs_run"]
    fit_s = summary["timings"]["fit_seconds"]
    val = summary["hybrid"]["val"]
    return {"device": device, "epochs_run": epochs_run, "best_epoch": summary["best_epoch"],
            "mean_epoch_s": summary["timings"]["mean_epoch_seconds"], "fit_s": fit_s, "wall_s": round(wall, 1),
            "train_img_per_s": round(n_train * epochs_run / fit_s, 1),
            "val_accuracy": val["accuracy"], "val_auc": val["auc"]}


def p50_ms(fn, xs) -> float:
    times = []
    for x in xs:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3)


def inference(run: Path, iters: int) -> dict:
    import onnxruntime as ort

    from bench.inference import load_models  # the run's model and checkpoint, as that bench loads them

    config, eager, onnx_model = load_models(run, run, ["cuda", "cpu"], None)
    eager = eager.cuda()
    available = ort.get_available_providers()
    shape = (config.in_channels, *config.image_size)
    rng = np.random.default_rng(0)
    singles = rng.normal(size=(iters, 1, *shape)).astype(np.float32)
    big = rng.normal(size=(20, 256, *shape)).astype(np.float32)

    def run_eager(x):
        with torch.inference_mode():
            return eager(torch.from_numpy(x).cuda()).cpu().numpy()  # .cpu() waits for the GPU

    engines = {"eager cuda": run_eager, f"onnxruntime {onnx_model.providers[0]}": onnx_model.predict_proba}
    diff = float(np.max(np.abs(run_eager(big[0]) - onnx_model.predict_proba(big[0]))))
    out = {"ort_available_providers": available, "max_abs_dprob": diff}
    for name, fn in engines.items():
        for x in singles[:30]:
            fn(x)
        fn(big[0])
        b256 = [time.perf_counter()]
        for x in big:
            fn(x)
        b256.append(time.perf_counter())
        out[name] = {"b1_p50_ms": round(p50_ms(fn, singles), 3),
                     "b256_img_per_s": round(256 * len(big) / (b256[1] - b256[0]), 0)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="a folder to create (runs go inside)")
    ap.add_argument("--cpu-epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU host", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True)
    props = torch.cuda.get_device_properties(0)
    env = {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(json.dumps(env), flush=True)
    res = {"env": env, "cuda": train(args.data, args.out / "cuda", "cuda", None)}
    print(json.dumps(res["cuda"]), flush=True)
    res["cpu"] = train(args.data, args.out / "cpu", "cpu", args.cpu_epochs)
    print(json.dumps(res["cpu"]), flush=True)
    res["inference"] = inference(args.out / "cuda", args.iters)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    c, p = res["cuda"], res["cpu"]
    print(f"\n{'device':<6} {'epochs':>6} {'s/epoch':>8} {'train img/s':>12} {'val acc':>8} {'val auc':>8}")
    for r in (c, p):
        auc = "n/a" if r["val_auc"] is None else f"{r['val_auc']:.4f}"
        print(f"{r['device']:<6} {r['epochs_run']:>6} {r['mean_epoch_s']:>8.2f} {r['train_img_per_s']:>12.0f} "
              f"{r['val_accuracy']:>8.4f} {auc:>8}")
    speedup = p["mean_epoch_s"] / c["mean_epoch_s"]
    print(f"cuda vs cpu ({env['cpu_threads']} threads), seconds per epoch: {speedup:.2f}x")
    inf = res["inference"]
    print(f"onnxruntime providers available: {', '.join(inf['ort_available_providers'])}; "
          f"max |dprob| eager cuda vs onnxruntime {inf['max_abs_dprob']:.1e}")
    for name, v in inf.items():
        if isinstance(v, dict):
            print(f"{name:<32} batch 1 p50 {v['b1_p50_ms']:.3f} ms, batch 256 {v['b256_img_per_s']:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
