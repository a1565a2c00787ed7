"""Training curves as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(metrics: Path, out: Path) -> Path | None:
    """Plot training / validation loss, learning rate and throughput against the step."""
    rows = read_metrics(metrics)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.legend()
    ax.grid(alpha=0.3)
    if train:
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
        axes[1].set_ylabel("learning rate")
        axes[2].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
        axes[2].set_ylabel("tokens / s (all ranks)")
    for a in axes[1:]:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    partial = out.with_name(out.stem + ".partial.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    partial.replace(out)
    return out
