"""PNG charts: the training loss curve and the base-vs-adapter metric bars (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(loss_jsonl: str | Path, out_png: str | Path, title: str = "training loss") -> Path:
    """Loss per optimizer step (and validation loss where logged) from the trainer's JSONL log."""
    steps, losses, val_steps, val_losses = [], [], [], []
    for line in Path(loss_jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if "validation_loss" in rec:
            val_steps.append(rec["step"])
            val_losses.append(rec["validation_loss"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, label="train", linewidth=1.2)
    if val_steps:
        ax.plot(val_steps, val_losses, "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_metrics(
    results: Mapping[str, Mapping[str, float]], out_png: str | Path, title: str
) -> Path:
    """Grouped bars: one group per metric, one bar per model (e.g. base, adapter)."""
    plt = _pyplot()
    models = list(results)
    metrics = list(next(iter(results.values())))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for k, model in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(metrics))]
        values = [results[model][m] for m in metrics]
        bars = ax.bar(xs, values, width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("score (x100)")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out)
    plt.close(fig)
    return out
