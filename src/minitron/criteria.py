"""Width-importance baselines of the peers, on the same axes and shapes as the Minitron scores.

magnitude: L2 norm of the weights that belong to a unit (Torch-Pruning / LLM-Pruner's data-free baseline).
taylor:    first-order |w * dL/dw| on the calibration LM loss, summed over a unit's weights (LLM-Pruner).
random:    seeded uniform noise (importance.random_scores).
Each returns {"heads" [L, H], "kv_groups" [L, K], "neurons" [L, F], "channels" [C]}; on MoE models neurons
[L, E*F] (expert-major) and also "experts" [L, E] and, with a shared expert, "shared_neurons" [L, Fs].
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from minitron import arch
from minitron.moe import weight_unit_sums


def _unit_sums(model, elem: dict[torch.nn.Parameter, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an element-wise score (same shape as each weight) over every unit's weights.

    A head owns its q rows and o columns; a KV group its k/v rows plus its query heads; a neuron its
    rows in the MLP input projections and its down_proj column; a hidden channel its column of every
    input projection, its row of every output projection, its embedding / lm_head column, norm weights.
    """
    d = arch.dims_of(model.config)
    moe = arch.is_moe(model)
    hd, group = d.head_dim, d.heads // d.kv_heads
    seg_size = {"q": d.heads * hd, "kv": d.kv_heads * hd, "ffn": d.ffn}
    channels = torch.zeros(d.hidden, dtype=torch.float64)
    heads, kv, neurons, experts, shared = [], [], [], [], []
    for layer in arch.decoder_layers(model):
        q_sum, kv_sum, ffn_sum = (torch.zeros(seg_size[s], dtype=torch.float64) for s in ("q", "kv", "ffn"))
        for norm, seg in arch.proj_norms(model, layer):  # OLMo2 / OLMoE q_norm [H*D], k_norm [K*D]
            {"q": q_sum, "kv": kv_sum}[seg].add_(elem[norm.weight].double())
        for lin, segs in arch.attn_inputs(model, layer) + ([] if moe else arch.mlp_inputs(model, layer)):
            e = elem[lin.weight].double()  # [out, in]
            channels += e.sum(0)
            rows = e.sum(1)
            if lin.bias is not None:
                rows = rows + elem[lin.bias].double()
            for s, part in zip(segs, rows.split([seg_size[s] for s in segs]), strict=True):
                {"q": q_sum, "kv": kv_sum, "ffn": ffn_sum}[s].add_(part)
        o = arch.attn_output(model, layer)
        channels += elem[o.weight].double().sum(1)
        q_sum += elem[o.weight].double().sum(0)
        if moe:  # experts [E], neurons [E*F], shared_neurons [Fs]
            sums = weight_unit_sums(arch.moe_parts(model, layer), elem)
            channels += sums["channels"]
            ffn_sum = sums["neurons"]
            experts.append(sums["experts"])
            if "shared_neurons" in sums:
                shared.append(sums["shared_neurons"])
        else:
            down = arch.mlp_output(model, layer)
            channels += elem[down.weight].double().sum(1)
            ffn_sum += elem[down.weight].double().sum(0)
        for norm in arch.hidden_norms(model, layer):
            channels += elem[norm.weight].double()
        h = q_sum.view(d.heads, hd).sum(1)  # [H*D] -> [H, D] -> [H]
        heads.append(h)
        kv.append(kv_sum.view(d.kv_heads, hd).sum(1) + h.view(d.kv_heads, group).sum(1))  # [K]
        neurons.append(ffn_sum)
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
    return out


@torch.no_grad()
def magnitude_scores(model) -> dict[str, torch.Tensor]:
    """L2 norm of each unit's weights (data-free)."""
    elem = {p: p.detach().float().square().cpu() for p in model.parameters()}
    return {k: v.sqrt() for k, v in _unit_sums(model, elem).items()}


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
    return _unit_sums(model, elem)
