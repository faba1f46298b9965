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
- `measured`: not a rescaling but a measurement (the way NVIDIA's Puzzle scores its per-layer choices): for each
  layer and a few widths, the held-out LM loss when that layer alone keeps only its best units (the others whole);
  a unit's value is the loss its block of widths saves per unit. Costs layers x len(MEASURED_LEVELS) passes (one
  more with drop_parts: width 0) over MEASURE_BLOCKS held-out blocks, each from the probed layer on
  (`measure_curves`).

`measured` is the default: on the default teacher at 70M it beat the uniform widths by 0.89 nats of WikiText-2 loss
right after pruning and 0.73 after the same distillation, where `mean` lost 0.22 / 0.04 to them and `raw` and
`contribution` were far worse (benchmarks/RESULTS.md). `layer_norm: loss` prunes with each of the three score
normalizations and keeps the one with the lowest held-out loss right after pruning, reporting all of them.

Widths move in blocks (`round_to` neurons, whole quantization blocks; one KV group), each layer keeps at least
`layer_floor` of the uniform width, or, with `drop_parts`, may lose its MLP or its attention entirely (layer 0 keeps
its attention: llama.cpp's deci reads the head size from it).
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from minitron.arch import adapters as arch
from minitron.arch import layerwise

NORMS = ("mean", "contribution", "raw")
AXES = ("ffn", "kv_heads")
OUT_NORM_KEYS = {"neurons": "neuron_out_norm", "kv_groups": "kv_out_norm"}
MEASURED_KEYS = {"neurons": "neuron_measured", "kv_groups": "kv_measured"}
MEASURED_LEVELS = (0.25, 0.5, 1.0, 2.0)  # widths probed (and the floor), x the uniform width (at most the source's)
MEASURE_BLOCKS = 2                                  # held-out blocks each probe's loss is measured on


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
    if norm == "measured":
        if MEASURED_KEYS[key] not in scores:
            raise ValueError("layer_norm measured needs the per-layer loss curves the prune stage measures "
                             f"({MEASURED_KEYS[key]}); scores alone do not have them: use mean or raw")
        return scores[MEASURED_KEYS[key]].float()
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


@torch.no_grad()
def measure_curves(model, scores: dict[str, torch.Tensor], blocks: torch.Tensor, dims: arch.Dims, axes: list[str],
                   batch_size: int = 8, floors: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The `measured` unit values: {"neuron_measured": [L, F], "kv_measured": [L, K]} for the axes asked.

    For each layer and each probed width w (0, MEASURED_LEVELS x the uniform width, and the source's width, where the
    loss is the unpruned one), the LM loss on blocks [N, T] when that layer alone keeps its w best units by
    activation score. A unit is removed exactly by zeroing its output weights (its down_proj column; the o_proj
    columns of its KV group's query heads), restored after each probe. The unit ranked r-th in its layer is worth
    (loss(w_a) - loss(w_b)) / (w_b - w_a), for the probed widths w_a <= r < w_b around it: the loss its segment of
    widths saves per unit. Widths below `floors[axis]` (the narrowest a layer may get: `floor_units`) are not
    probed: a layer always keeps those units, so they get its largest measured value."""
    from minitron.arch.models import lm_loss

    base = lm_loss(model, blocks, batch_size)
    inputs = layer_inputs(model, blocks, batch_size)  # what enters each layer: a probe of layer i runs layers i.. only
    out = {}
    for axis, key in (("ffn", "neurons"), ("kv_heads", "kv_groups")):
        if axis not in axes:
            continue
        units, uniform = scores[key].shape[1], (dims.ffn if axis == "ffn" else dims.kv_heads)
        low = (floors or {}).get(axis, 0)
        widths = sorted({low, units} | {w for f in MEASURED_LEVELS if (w := min(units, max(1, round(f * uniform))))
                                          > low})
        values = torch.zeros(scores[key].shape)                                                   # [L, U]
        for i, layer in enumerate(tqdm(arch.decoder_layers(model), desc=f"prune: measure {axis} widths per layer",
                                       unit="layer")):
            losses = {units: base}
            for w in widths[:-1]:
                with _zeroed(model, layer, scores[key][i], w, axis):
                    losses[w] = suffix_loss(model, i, inputs[i], blocks, batch_size)
            for lo, hi in zip(widths, widths[1:], strict=False):
                values[i, lo:hi] = (losses[lo] - losses[hi]) / (hi - lo)
            if 0 < low < units:
                values[i, :low] = values[i, low:].max()  # always kept
        out[MEASURED_KEYS[key]] = values
    return out


@torch.no_grad()
def layer_inputs(model, blocks: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer for token blocks [N, T]: a list of L tensors [N, T, C] (on the
    model's device, in its dtype)."""
    device = next(model.parameters()).device
    layers = arch.decoder_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in layers]

    def grab(i):
        def hook(module, args, kwargs):
            seen[i].append((args[0] if args else kwargs["hidden_states"]).detach())
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for b in range(0, blocks.shape[0], batch_size):
            arch.backbone(model)(input_ids=blocks[b:b + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in seen]                                                        # L x [N, T, C]


@torch.no_grad()
def suffix_loss(model, start: int, hidden_in: torch.Tensor, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token LM loss of blocks [N, T] run from decoder layer `start` on, given hidden_in [N, T, C], what
    enters that layer (layer_inputs): the layers before it are left out (arch.without_layers) and the rest read
    hidden_in as their input embeddings. Equal to the whole model's loss when the earlier layers are unchanged."""
    from minitron.arch.models import lm_loss

    with arch.without_layers(model, list(range(start))):
        return lm_loss(model, blocks, batch_size, inputs_embeds=hidden_in)


@contextlib.contextmanager
def _zeroed(model, layer, score: torch.Tensor, keep: int, axis: str):
    """Zero the output weights of all but the `keep` best units (by `score`) of one layer's MLP ("ffn") or
    attention ("kv_heads": whole KV groups, their query heads' o_proj columns), restoring them on exit."""
    lin = arch.mlp_output(model, layer) if axis == "ffn" else arch.attn_output(model, layer)
    drop = torch.argsort(score.float().cpu(), descending=True)[keep:]
    if axis == "kv_heads":  # group g's query heads: o_proj columns [g*q*D, (g+1)*q*D), q*D = in_features / groups
        width = lin.weight.shape[1] // score.numel()
        drop = (drop[:, None] * width + torch.arange(width)[None, :]).flatten()                  # [G, w] -> [G*w]
    drop = drop.to(lin.weight.device)
    saved = lin.weight[:, drop].clone()
    lin.weight[:, drop] = 0
    try:
        yield
    finally:
        lin.weight[:, drop] = saved


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


def floor_units(dims: arch.Dims, floor: float, drop_parts: bool, block: int) -> dict[str, int]:
    """The narrowest width a layer may get, per axis: `floor` x the uniform width (MLP neurons in whole blocks, at
    least one KV group), or 0 with drop_parts."""
    if drop_parts:
        return {"ffn": 0, "kv_heads": 0}
    return {"ffn": min(dims.ffn, block * math.ceil(floor * dims.ffn / block)),
            "kv_heads": max(1, math.ceil(floor * dims.kv_heads))}


def layer_widths(scores: dict[str, torch.Tensor], dims: arch.Dims, kept: list[int], axes: list[str], norm: str,
                 floor: float, drop_parts: bool, block: int) -> dict[str, list[int]]:
    """Per kept layer (source indices `kept`): {"ffn": widths, "kv_heads": groups}. An axis not in `axes` keeps the
    uniform width in every layer."""
    norm = "mean" if norm == "loss" else norm  # the prune stage compares them by loss; a plan alone takes mean
    n = len(kept)
    out = {"ffn": [dims.ffn] * n, "kv_heads": [dims.kv_heads] * n}
    rows = torch.tensor(kept)
    low = floor_units(dims, floor, drop_parts, block)
    if "ffn" in axes:
        score = normalized(scores, "neurons", norm)[rows]                                      # [L', F]
        out["ffn"] = allocate(score, n * dims.ffn, block, [low["ffn"]] * n)
    if "kv_heads" in axes:
        score = normalized(scores, "kv_groups", norm)[rows]                                    # [L', K]
        f = low["kv_heads"]
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
    if norm not in (*NORMS, "loss", "measured"):
        return f"layer_norm {norm!r} unknown; choose loss (the best of {', '.join(NORMS)}), {', '.join(NORMS)} or measured"
    if not 0.0 <= floor <= 1.0:
        return f"layer_floor {floor} must be a fraction of the uniform width in [0, 1]"
    return None
