"""What a run folder shows people: the results table and the PNG figures (training curves,
confusion matrices). Plotting uses matplotlib's file-only Agg backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["results_table", "shift_table", "variant_table", "plot_curves", "plot_confusion"]

_COLUMNS = ("accuracy", "precision", "recall", "f1", "auc")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def results_table(rows: list[tuple[str, str, dict, str]]) -> str:
    """Markdown table; each row is ``(model, split, metrics, note)``."""
    head = "| model | split | n | " + " | ".join(_COLUMNS) + " | notes |"
    lines = [head, "|" + "---|" * (len(_COLUMNS) + 4)]
    for model, split, m, note in rows:
        cells = " | ".join(_fmt(m.get(c)) for c in _COLUMNS)
        lines.append(f"| {model} | {split} | {m['n']} | {cells} | {note} |")
    return "\n".join(lines) + "\n"


def shift_table(metrics: dict[str, dict]) -> str:
    """Markdown table: held-out accuracy of each model plain and under each shift (with
    the drop in points); ``metrics[model]`` holds ``holdout`` and ``shifted`` results."""
    names = [n for n in metrics if "shifted" in metrics[n]]
    if not names:
        return ""
    shifts = list(metrics[names[0]]["shifted"]["per_shift"])
    lines = ["| shift | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| none | " + " | ".join(_fmt(metrics[n]["holdout"]["accuracy"]) for n in names) + " |"]
    for s in shifts:
        cells = [metrics[n]["shifted"]["per_shift"][s] for n in names]
        lines.append(f"| {s} | " + " | ".join(f"{_fmt(c['accuracy'])} ({-100 * c['drop']:+.1f})"
                                              for c in cells) + " |")
    lines.append("| mean | " + " | ".join(
        f"{_fmt(metrics[n]['shifted']['accuracy'])} ({-100 * metrics[n]['shifted']['mean_drop']:+.1f})"
        for n in names) + " |")
    return "\n".join(lines) + "\n"


def variant_table(variants: dict[str, dict]) -> str:
    """Markdown table of the exported precisions: held-out accuracy, agreement with FP32,
    single-thread batch-1 latency and its ratio to FP32's."""
    if not variants:
        return ""
    base = variants["fp32"]["latency_ms"]
    lines = ["| precision | file | held-out accuracy | agrees with fp32 | latency (ms, 1 thread) | vs fp32 |",
             "|---|---|---|---|---|---|"]
    for k, v in variants.items():
        lines.append(f"| {k} | {v['file']} | {_fmt(v['holdout_accuracy'])} | {_fmt(v['agreement_with_fp32'])} "
                     f"| {v['latency_ms']:.3f} | {v['latency_ms'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], best_epoch: int, path: str | Path) -> Path:
    """Loss (train and validation) and validation accuracy/AUC per epoch."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss (smoothed labels)")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="validation loss")
    b.plot(ep, [h["val_accuracy"] for h in history], "o-", label="validation accuracy")
    if all(h["val_auc"] is not None for h in history):
        b.plot(ep, [h["val_auc"] for h in history], "o-", label="validation ROC AUC")
    for ax, title in ((a, "loss"), (b, "validation metrics")):
        if best_epoch > 0:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"selected epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_confusion(matrices: dict[str, list[list[int]]], class_names: tuple[str, ...],
                   path: str | Path, split: str = "val") -> Path:
    """One confusion matrix per model, side by side (rows: true class, columns: predicted)."""
    plt = _pyplot()
    n = len(matrices)
    size = max(3.5, 0.45 * len(class_names) + 2)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items()):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, class_names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name} ({split})")
        if len(class_names) <= 12:
            for i in range(cm.shape[0]):
                for j in range(cm.shape[1]):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
