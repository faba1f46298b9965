"""metrics.jsonl (one JSON record per step / evaluation) and loss.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

# ---- metrics and plot -------------------------------------------------------------------------------

def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_metrics(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "val_lm_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6)
    ax.plot([r["tokens"] for r in evals], [r["val_lm_loss"] for r in evals], "o-", label="val LM loss")
    for key, label in (("val_kl", "val KL to teacher"), ("val_kl_topk", "val KL to teacher (top-k buckets)")):
        if any(r.get(key) is not None for r in evals):
            ax.plot([r["tokens"] for r in evals], [r.get(key) for r in evals], "s-", label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


