"""Mamba2 specifics: head and head-dim importance, the Mamba part of a plan, slicing a Mamba2 mixer. Module
layout and config keys come from arch (MambaArch, MambaParts).

A mixer with H heads of dim P (I = H*P inner channels), G groups of B/C and state size N:
  in_proj  [2I + 2GN + H, C]  output segments [z (I) | x (I) | B (GN) | C (GN) | dt (H)]
  conv1d   [I + 2GN, 1, K]    depthwise over [x | B | C] (bias [I + 2GN])
  A_log, D, dt_bias [H]; gated RMSNorm weight [I] over G groups of I/G channels; out_proj [C, I]
Inner channel c belongs to head c // P and head-dim channel c % P; head h reads B/C group h // (H/G).

Scores (ModelOpt's Mamba estimate: the x segment of in_proj's output, before the convolution):
  mamba_channels [L, H*P]  per inner channel, aggregated over the sequence (seq_agg) and the batch
                           (batch_agg) as every other axis; zero rows for layers without a Mamba mixer
  mamba_head_dim [L, P]    L2 over heads of the channel scores
  mamba_heads    [L, H]    L2 over head-dim channels of the channel scores
The plan keeps the top head-dim channels (the same in every head) by mamba_head_dim, then ranks the heads by
the L2 of their kept channels, within each B/C group: every group keeps the same number of heads, so n_groups
stays valid and B, C and the conv channels over them are untouched.

The gated norm normalizes over each group's I/G channels: removing channels changes the divisor of the
group's mean square, so even a head that carries only zeros changes its group's scale when removed (by
sqrt(I'/I) per group). Distillation absorbs it; tests compensate it to check the slicing exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from minitron.arch import adapters as arch


def x_segment(out: torch.Tensor, inner: int) -> torch.Tensor:
    """in_proj output [B, T, 2I + 2GN + H] -> its x segment [B, T, I]."""
    return out[..., inner:2 * inner]


def mamba_scores(channels: torch.Tensor, heads: int) -> dict[str, torch.Tensor]:
    """Per-layer channel scores [L, H*P] -> mamba_channels, mamba_heads [L, H], mamba_head_dim [L, P]."""
    per = channels.view(channels.shape[0], heads, -1)  # [L, H*P] -> [L, H, P]
    return {"mamba_channels": channels, "mamba_heads": per.norm(dim=2), "mamba_head_dim": per.norm(dim=1)}


# ---- plan ----------------------------------------------------------------------------------------

def _topk_sorted(score: torch.Tensor, k: int) -> list[int]:
    return torch.topk(score.float(), k).indices.sort().values.tolist()


def plan_layer(scores: dict[str, torch.Tensor], i: int, src: arch.Dims, dims: arch.Dims, groups: int
               ) -> tuple[list[int], list[int]]:
    """Layer i's kept Mamba heads (dims.mamba_heads // groups in each group, sorted) and kept head-dim
    channels (dims.mamba_head_dim of them, the same in every head, sorted)."""
    if "mamba_channels" not in scores:
        raise ValueError("the scores hold no 'mamba_channels' of a model with Mamba layers; recompute importance "
                         "on this model")
    per = scores["mamba_channels"][i].view(src.mamba_heads, src.mamba_head_dim).float()  # [H*P] -> [H, P]
    channels = _topk_sorted(per.norm(dim=0), dims.mamba_head_dim)  # [P] scores -> kept P'
    head_score = per[:, channels].norm(dim=1)  # [H]: L2 over the kept channels
    src_per_group, per_group = src.mamba_heads // groups, dims.mamba_heads // groups
    heads = [g * src_per_group + h for g in range(groups)
             for h in _topk_sorted(head_score[g * src_per_group:(g + 1) * src_per_group], per_group)]
    return heads, channels


def check_dims(src: arch.Dims, d: arch.Dims, groups: int, expand_tied: bool = False) -> str | None:
    """Why Mamba target dims cannot be met (None: they can). expand_tied (Mamba2): hidden * expand must equal
    heads * head_dim with a whole-number expand."""
    for name in ("mamba_heads", "mamba_head_dim"):
        new, old = getattr(d, name), getattr(src, name)
        if new <= 0:
            return f"target {name}={new} must be positive"
        if new > old:
            return f"target {name}={new} is larger than the source's {old}; pruning only shrinks"
    if d.mamba_heads % groups:
        lo = max(groups, d.mamba_heads // groups * groups)
        return (f"mamba_heads={d.mamba_heads} cannot be split evenly over the {groups} B/C groups (n_groups): every "
                f"group keeps the same number of heads; choose a multiple of {groups}, e.g. {lo}")
    inner = d.mamba_heads * d.mamba_head_dim
    if expand_tied and inner % d.hidden:
        return (f"mamba_heads x mamba_head_dim = {inner} must be a whole multiple of hidden={d.hidden} (the config's "
                f"integer expand ties them: hidden x expand = heads x head_dim); choose hidden dividing {inner}, or "
                "heads / head_dim whose product hidden divides")
    return None


# ---- prune ---------------------------------------------------------------------------------------

def inner_index(heads: list[int], channels: list[int], head_dim: int) -> torch.Tensor:
    """Inner-channel indices of the kept heads x kept head-dim channels, head-major -> [H'*P']."""
    return (torch.tensor(heads)[:, None] * head_dim + torch.tensor(channels)[None, :]).flatten()  # [H', P'] -> [H'*P']


@torch.no_grad()
def slice_mixer(model: nn.Module, layer: nn.Module, hidden: torch.Tensor, heads: list[int], channels: list[int],
                src: arch.Dims) -> None:
    """Keep Mamba heads `heads`, head-dim channels `channels` and hidden channels `hidden` of a layer's Mamba2
    mixer, in place: in_proj rows of z, x (kept inner channels) and dt (kept heads), B and C whole, columns of
    hidden; conv1d channels of x (B, C whole); A_log, D, dt_bias; the gated norm; out_proj. Widths are fixed by
    arch.set_mamba_widths."""

    p = arch.mamba_parts(model, layer)
    H, P = src.mamba_heads, src.mamba_head_dim
    inner, bc = H * P, 2 * p.groups * p.state
    keep = inner_index(heads, channels, P)  # [I']
    head_idx = torch.tensor(heads)  # [H']
    bc_idx = torch.arange(bc)  # [2GN]
    rows = torch.cat([keep, inner + keep, 2 * inner + bc_idx, 2 * inner + bc + head_idx])  # z | x | B, C | dt
    arch.slice_linear(p.in_proj, out_idx=rows, in_idx=hidden)
    conv = torch.cat([keep, inner + bc_idx])  # x | B, C
    w = p.conv1d.weight.data  # [I + 2GN, 1, K]
    p.conv1d.weight = nn.Parameter(w.index_select(0, conv.to(w.device)).clone())
    if p.conv1d.bias is not None:
        p.conv1d.bias = nn.Parameter(p.conv1d.bias.data.index_select(0, conv.to(w.device)).clone())
    for name in p.per_head:
        t = getattr(p.mixer, name).data  # [H]
        setattr(p.mixer, name, nn.Parameter(t.index_select(0, head_idx.to(t.device)).clone()))
    p.norm.weight = nn.Parameter(p.norm.weight.data.index_select(0, keep.to(p.norm.weight.device)).clone())
    arch.slice_linear(p.out_proj, out_idx=hidden, in_idx=keep)


# ---- importance hooks ------------------------------------------------------------------------------

def register_x_hook(model: nn.Module, layer: nn.Module, inner: int, add) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on the layer's in_proj calling add(x [B, T, I]) with the x segment of its output."""
    return arch.mamba_parts(model, layer).in_proj.register_forward_hook(
        lambda m, args, out: add(x_segment(out, inner)))
