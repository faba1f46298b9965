"""Plots (matplotlib, Agg backend) of what a stage measured."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importance(scores: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """One figure: head and neuron heatmaps per layer, sorted channel scores, layer-importance curves."""
    plt = _plt()
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    im = ax[0, 0].imshow(scores["heads"].T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax[0, 0].set(title="attention head importance", xlabel="layer", ylabel="head")
    fig.colorbar(im, ax=ax[0, 0])
    im = ax[0, 1].imshow(scores["neurons"].T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax[0, 1].set(title="MLP neuron importance", xlabel="layer", ylabel="neuron")
    fig.colorbar(im, ax=ax[0, 1])
    ax[1, 0].plot(scores["channels"].sort(descending=True).values.numpy())
    ax[1, 0].set(title="embedding channel importance (sorted)", xlabel="rank", ylabel="score", yscale="log")
    layers = range(scores["layer_bi"].numel())
    ax[1, 1].plot(layers, scores["layer_bi"].numpy(), "o-", label="Block Importance (1 - cos)")
    ax[1, 1].set(title="layer importance", xlabel="layer", ylabel="BI")
    if "layer_lm_loss" in scores:
        twin = ax[1, 1].twinx()
        twin.plot(layers, scores["layer_lm_loss"].numpy(), "s-", color="tab:red", label="LM-loss increase")
        twin.set_ylabel("LM-loss increase when removed", color="tab:red")
        twin.legend(loc="upper center")
    ax[1, 1].legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_search(rows: list[dict], path: Path) -> Path:
    """Candidates: parameters against validation loss after pruning and after short training."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    params = [r["params"]["total"] / 1e6 for r in rows]
    ax.scatter(params, [r["loss_pruned"] for r in rows], label="after pruning", marker="o")
    trained = [(p, r["loss_trained"]) for p, r in zip(params, rows, strict=True) if "loss_trained" in r]
    if trained:
        ax.scatter(*zip(*trained, strict=True), label="after short distillation", marker="s")
    for p, r in zip(params, rows, strict=True):
        d = r["dims"]
        ax.annotate(f"L{d['layers']} h{d['hidden']} f{d['ffn']} H{d['heads']}", (p, r["loss_pruned"]),
                    fontsize=7, alpha=0.7)
    ax.set(xlabel="parameters (M)", ylabel="validation loss", title="architecture search candidates")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
