"""Width-importance baselines of the peers, on the same axes and shapes as the Minitron scores.

magnitude: L2 norm of the weights that belong to a unit (Torch-Pruning / LLM-Pruner's data-free baseline).
taylor:    first-order |w * dL/dw| on the calibration LM loss, summed over a unit's weights (LLM-Pruner).
random:    seeded uniform noise (importance.random_scores).
Each returns {"heads" [L, H], "kv_groups" [L, K], "neurons" [L, F], "channels" [C]}; on MoE models neurons
[L, E*F] (expert-major) and also "experts" [L, E] and, with a shared expert, "shared_neurons" [L, Fs]. On models
with Mamba layers also "mamba_channels" [L, H*P] (an inner channel owns its x row of in_proj and its out_proj
column), "mamba_heads" [L, H] and "mamba_head_dim" [L, P] (L2 of the channel scores over head-dim channels /
over heads, as mamba.mamba_scores). Hybrid layers hold one mixer: the rows of the parts a layer lacks are zero.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from minitron.arch import adapters as arch
from minitron.arch.mamba import mamba_scores, x_segment
from minitron.arch.moe import weight_unit_sums


def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def _input_rows(lins: list, elem: dict, seg_size: dict[str, int], channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Projections reading the hidden states [(Linear [out, in], segments)]: their columns add to channels [C];
    their rows (and biases) summed per segment -> {"q" [H*D], "kv" [K*D], "ffn" [F]} (absent segments zero)."""
    sums = {s: _zeros(n) for s, n in seg_size.items()}
    for lin, segs in lins:
        e = elem[lin.weight].double()  # [out, in]
        channels += e.sum(0)
        rows = e.sum(1)
        if lin.bias is not None:
            rows = rows + elem[lin.bias].double()
        for s, part in zip(segs, rows.split([seg_size[s] for s in segs]), strict=True):
            sums[s].add_(part)
    return sums


def _attn_sums(model, layer, elem: dict, d: arch.Dims, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention: query heads [H] (q rows, o columns, q_norm) and KV groups [K] (k/v rows, k_norm,
    plus their query heads); o_proj rows add to channels [C]."""
    hd, group = d.head_dim, d.heads // d.kv_heads
    sums = _input_rows(arch.attn_inputs(model, layer), elem, {"q": d.heads * hd, "kv": d.kv_heads * hd}, channels)
    for norm, seg in arch.proj_norms(model, layer):  # OLMo2 / OLMoE q_norm [H*D], k_norm [K*D]
        sums[seg].add_(elem[norm.weight].double())
    o = elem[arch.attn_output(model, layer).weight].double()  # [C, H*D]
    channels += o.sum(1)
    heads = (sums["q"] + o.sum(0)).view(d.heads, hd).sum(1)  # [H*D] -> [H, D] -> [H]
    kv = sums["kv"].view(d.kv_heads, hd).sum(1) + heads.view(d.kv_heads, group).sum(1)  # [K]
    return heads, kv


def _mlp_sums(model, layer, elem: dict, d: arch.Dims, channels: torch.Tensor) -> torch.Tensor:
    """A layer's dense MLP: neurons [F] (input rows, down_proj column); down_proj rows add to channels [C]."""
    ffn = _input_rows(arch.mlp_inputs(model, layer), elem, {"ffn": d.ffn}, channels)["ffn"]
    down = elem[arch.mlp_output(model, layer).weight].double()  # [C, F]
    channels += down.sum(1)
    return ffn + down.sum(0)


def _mamba_sums(model, layer, elem: dict, d: arch.Dims, channels: torch.Tensor) -> torch.Tensor:
    """A layer's Mamba2 mixer: inner channels [H*P] (x rows of in_proj, with bias; out_proj columns); in_proj
    columns and out_proj rows add to channels [C]."""
    p = arch.mamba_parts(model, layer)
    inner = d.mamba_heads * d.mamba_head_dim
    e_in = elem[p.in_proj.weight].double()  # [2I + 2GN + H, C]
    channels += e_in.sum(0)
    rows = e_in.sum(1)  # [2I + 2GN + H]
    if p.in_proj.bias is not None:
        rows = rows + elem[p.in_proj.bias].double()
    e_out = elem[p.out_proj.weight].double()  # [C, I]
    channels += e_out.sum(1)
    return x_segment(rows, inner) + e_out.sum(0)  # [I]


def _hybrid_moe_channels(model, layer, elem: dict, channels: torch.Tensor) -> None:
    """A hybrid MoE layer (hidden and depth only): every tensor spanning the hidden axis adds to channels [C]."""
    for module, name, axis in arch.hybrid_moe_hidden_axes(model, layer):
        e = elem[getattr(module, name)].double()
        channels += e.movedim(axis, 0).reshape(e.shape[axis], -1).sum(1)  # [..., C, ...] -> [C, rest] -> [C]


def _unit_sums(model, elem: dict[torch.nn.Parameter, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an element-wise score (same shape as each weight) over every unit's weights.

    A head owns its q rows and o columns; a KV group its k/v rows plus its query heads; a neuron its
    rows in the MLP input projections and its down_proj column; a Mamba inner channel its x row of in_proj and
    its out_proj column; a hidden channel its column of every input projection, its row of every output
    projection, its embedding / lm_head column, norm weights.
    """
    d = arch.dims_of(model.config)
    moe = arch.is_moe(model)
    channels = _zeros(d.hidden)
    heads, kv, neurons, experts, shared, mamba = [], [], [], [], [], []
    for layer, has in zip(arch.decoder_layers(model), arch.layer_parts(model), strict=True):
        h, k = _attn_sums(model, layer, elem, d, channels) if "attn" in has else (_zeros(d.heads), _zeros(d.kv_heads))
        heads.append(h)
        kv.append(k)
        if moe:  # experts [E], neurons [E*F], shared_neurons [Fs]
            sums = weight_unit_sums(arch.moe_parts(model, layer), elem)
            channels += sums["channels"]
            neurons.append(sums["neurons"])
            experts.append(sums["experts"])
            if "shared_neurons" in sums:
                shared.append(sums["shared_neurons"])
        else:
            neurons.append(_mlp_sums(model, layer, elem, d, channels) if "mlp" in has else _zeros(d.ffn))
        if d.mamba_heads:
            has_mamba = "mamba" in has
            mamba.append(_mamba_sums(model, layer, elem, d, channels) if has_mamba
                         else _zeros(d.mamba_heads * d.mamba_head_dim))
        if "moe" in has:
            _hybrid_moe_channels(model, layer, elem, channels)
        for norm in arch.hidden_norms(model, layer):
            channels += elem[norm.weight].double()
    emb = arch.embedding(model).weight
    channels += elem[emb].double().sum(0)
    head = arch.lm_head(model).weight
    if head is not emb:
        channels += elem[head].double().sum(0)
    channels += elem[arch.final_norm(model).weight].double()
    out = {"heads": torch.stack(heads).float(), "kv_groups": torch.stack(kv).float(),
           "neurons": torch.stack(neurons).float(), "channels": channels.float()}  # MoE neurons: [L, E*F]
    if experts:
        out["experts"] = torch.stack(experts).float()  # [L, E]
    if shared:
        out["shared_neurons"] = torch.stack(shared).float()  # [L, Fs]
    if mamba:
        out["mamba_channels"] = torch.stack(mamba).float()  # [L, H*P]
    return out


def _with_mamba_axes(scores: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Add mamba_heads [L, H] and mamba_head_dim [L, P] from mamba_channels [L, H*P] (models with Mamba layers)."""
    if "mamba_channels" not in scores:
        return scores
    return {**scores, **mamba_scores(scores["mamba_channels"], arch.dims_of(model.config).mamba_heads)}


@torch.no_grad()
def magnitude_scores(model) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's weights (data-free)."""
    elem = {p: p.detach().float().square().cpu() for p in model.parameters()}
    return _with_mamba_axes({k: v.sqrt() for k, v in _unit_sums(model, elem).items()}, model)


def taylor_scores(model, calib: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """First-order Taylor importance: |w * dL/dw| with the gradient of the mean LM loss over calib [N, T]."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters()]
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    n_batches = (calib.shape[0] + batch_size - 1) // batch_size
    try:
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="taylor", unit="batch"):
            ids = calib[start:start + batch_size].to(device)  # [B, T]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss.float() / n_batches
            loss.backward()
        elem = {p: (p.detach().float() * p.grad.float()).abs().cpu() for p in params}
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return _with_mamba_axes(_unit_sums(model, elem), model)
