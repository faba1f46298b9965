"""Per-layer widths: spread a uniform target's MLP neurons and KV groups over the layers by importance.

The uniform plan fixes how many MLP neurons (layers x ffn) and KV groups (layers x kv_heads) the pruned model keeps;
a per-layer target keeps exactly those totals, so it has exactly the uniform model's parameter count, and hands
them to the layers whose units score highest. Units are ranked across layers, which needs scores that compare
between layers (activation sizes grow with depth). The normalizations (`NORMS`):

- `mean`: each unit's score divided by its layer's mean score. A layer's total is then its unit count: layers
  trade units only by how unequal their scores are (a layer with a few strong neurons gives up its weak ones).
- `contribution`: the activation score times the norm of the unit's output weights (down_proj column, o_proj
  columns of the group): the unit's typical write into the residual stream, which every layer shares.
- `raw`: the activation scores as they are.

The prune stage prunes with each and keeps the one with the lowest held-out loss right after pruning
(`layer_norm: loss`, the default), and reports all of them.

Widths move in blocks (`round_to` neurons, whole quantization blocks; one KV group), each layer keeps at least
`layer_floor` of the uniform width, or, with `drop_parts`, may lose its MLP or its attention entirely (layer 0 keeps
its attention: llama.cpp's deci reads the head size from it).
"""

from __future__ import annotations

import math

import torch

from minitron.arch import adapters as arch
from minitron.arch import layerwise

NORMS = ("mean", "contribution", "raw")
AXES = ("ffn", "kv_heads")
OUT_NORM_KEYS = {"neurons": "neuron_out_norm", "kv_groups": "kv_out_norm"}


@torch.no_grad()
def output_norms(model) -> dict[str, torch.Tensor]:
    """The norm of each unit's output weights, for the `contribution` normalization: {"neuron_out_norm": [L, F]
    (down_proj columns), "kv_out_norm": [L, K] (o_proj columns of each KV group's query heads)}."""
    d = arch.dims_of(model.config)
    neurons, groups = [], []
    for layer in arch.decoder_layers(model):
        down = arch.mlp_output(model, layer).weight.float()                                   # [C, F]
        neurons.append(down.norm(dim=0))                                                      # [F]
        o = arch.attn_output(model, layer).weight.float()                                     # [C, H*D]
        groups.append(o.reshape(o.shape[0], d.kv_heads, -1).norm(dim=(0, 2)))                 # [C, K, g*D] -> [K]
    return {"neuron_out_norm": torch.stack(neurons).cpu(), "kv_out_norm": torch.stack(groups).cpu()}


def normalized(scores: dict[str, torch.Tensor], key: str, norm: str) -> torch.Tensor:
    """scores[key] ([L, U]: "neurons" or "kv_groups") made comparable between layers by `norm` -> [L, U] fp32."""
    s = scores[key].float()
    if norm == "raw":
        return s
    if norm == "mean":
        return s / s.mean(dim=1, keepdim=True).clamp_min(1e-12)
    if norm == "contribution":
        out = scores.get(OUT_NORM_KEYS[key])
        if out is None:
            raise ValueError(f"layer_norm contribution needs the output-weight norms ({OUT_NORM_KEYS[key]}), which the "
                             "prune stage reads from the model; scores alone do not have them: use mean or raw")
        return s * out.float()
    raise ValueError(f"layer_norm {norm!r} unknown; choose {', '.join(NORMS)} or loss")


def allocate(score: torch.Tensor, total: int, block: int, floors: list[int]) -> list[int]:
    """Widths per layer that sum to `total`, in whole blocks, each at least its floor (units, a multiple of block):
    the blocks of highest summed score across layers, each layer's units taken best first.

    score [L, U] comparable across layers; total a multiple of block, <= L * (U // block) * block."""
    n_layers, units = score.shape
    per_layer = units // block
    ranked = score.sort(dim=1, descending=True).values[:, :per_layer * block]                # [L, U']
    block_sum = ranked.reshape(n_layers, per_layer, block).sum(dim=2)                        # [L, U'/b, b] -> [L, n]
    counts = [min(per_layer, math.ceil(f / block)) for f in floors]
    left = total // block - sum(counts)
    if left < 0:
        raise ValueError(f"the floors ({sum(floors)} units) exceed the total {total}; lower layer_floor")
    free = [(float(block_sum[i, b]), -i, i) for i in range(n_layers) for b in range(counts[i], per_layer)]
    for _, _, i in sorted(free, reverse=True)[:left]:  # a layer's blocks fall in score: its picks are a prefix
        counts[i] += 1
    return [c * block for c in counts]


def layer_widths(config, scores: dict[str, torch.Tensor], dims: arch.Dims, n_layers_kept: list[int],
                 axes: list[str], norm: str, floor: float, drop_parts: bool, block: int) -> dict[str, list[int]]:
    """Per kept layer (source indices `n_layers_kept`): {"ffn": widths, "kv_heads": groups}. An axis not in `axes`
    keeps the uniform width in every layer."""
    norm = "mean" if norm == "loss" else norm  # without a model to measure with: the prune stage compares them
    n = len(n_layers_kept)
    out = {"ffn": [dims.ffn] * n, "kv_heads": [dims.kv_heads] * n}
    rows = torch.tensor(n_layers_kept)
    if "ffn" in axes:
        score = normalized(scores, "neurons", norm)[rows]                                      # [L', F]
        f = 0 if drop_parts else min(dims.ffn, block * math.ceil(floor * dims.ffn / block))
        out["ffn"] = allocate(score, n * dims.ffn, block, [f] * n)
    if "kv_heads" in axes:
        score = normalized(scores, "kv_groups", norm)[rows]                                    # [L', K]
        f = 0 if drop_parts else max(1, math.ceil(floor * dims.kv_heads))
        floors = [max(f, 1) if j == 0 else f for j in range(n)]  # the first layer keeps its attention
        out["kv_heads"] = allocate(score, n * dims.kv_heads, 1, floors)
    return out


def check_target(config, axes: list[str] | None, norm: str, floor: float) -> str | None:
    """Why a per-layer target cannot be met (None when it can)."""
    try:
        layerwise.check_family(config)
    except arch.UnsupportedArchitecture as e:
        return str(e)
    bad = [a for a in axes or [] if a not in AXES]
    if bad or not axes:
        return f"layer_widths {axes} : choose one or both of {', '.join(AXES)}"
    if norm not in (*NORMS, "loss"):
        return f"layer_norm {norm!r} unknown; choose loss (measure each), {', '.join(NORMS)}"
    if not 0.0 <= floor <= 1.0:
        return f"layer_floor {floor} must be a fraction of the uniform width in [0, 1]"
    return None
