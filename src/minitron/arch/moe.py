"""Mixture-of-experts specifics: expert importance, router statistics, the MoE part of a plan, slicing
fused expert weights, active-parameter counting. Module layout and config keys come from arch (MoeArch).

transformers 5 stores a layer's experts fused: gate_up_proj [E, 2F, C] (the F gate rows, then the F up
rows), down_proj [E, C, F]; the router is weight [E, C] (softmax, top-k). Axes pruned here:
  experts      [L, E]    an expert's score is the L2 norm of its output y_e(x) [C] on each token routed to
                         it (before the routing weight), aggregated over the sample's routed tokens (seq_agg)
                         and over samples (batch_agg), as every other axis (ModelOpt's estimate)
  neurons      [L, E*F]  per expert, the input of its down projection (act(gate) * up) on its routed tokens;
                         stored flattened (expert-major) so the importance plot reads it as a dense layer's
  shared_neurons [L, Fs] the shared expert's down_proj input (Qwen2-MoE), scored like a dense MLP
Router statistics (saved with the scores, not used for ranking):
  router_tokens [L, E]   share of valid tokens routed to each expert (a row sums to top_k)
  router_prob   [L, E]   mean router probability of each expert over valid tokens
"""

from __future__ import annotations

import torch
from torch import nn

from minitron.arch import adapters as arch


class MoeCollector:
    """Forward hooks gathering the MoE statistics of every layer of `model`; `stat(size)` makes one running
    per-channel statistic (importance.BatchStat) and `seq_agg(x [B, T, C], mask [B, T(, C)]) -> [B, C]`
    aggregates one batch over the sequence by the aggregation named `how` (importance.SEQ_AGGS).
    `start(mask)` before each forward (valid tokens [B, T])."""

    def __init__(self, model: nn.Module, stat, seq_agg, how: str, device):
        d = arch.dims_of(model.config)
        self.d, self.seq_agg, self.how, self._mask = d, seq_agg, how, None
        layers = arch.decoder_layers(model)
        self.experts = [stat(d.experts) for _ in layers]
        self.neurons = [stat(d.experts * d.ffn) for _ in layers]
        self.shared = [stat(d.shared_ffn) for _ in layers] if d.shared_ffn else []
        self.tokens = torch.zeros(len(layers), d.experts, dtype=torch.float64, device=device)  # routed counts
        self.prob = torch.zeros(len(layers), d.experts, dtype=torch.float64, device=device)    # summed probs
        self.n_tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.handles = []
        for i, layer in enumerate(layers):
            p = arch.moe_parts(model, layer)
            self.handles.append(p.experts.register_forward_pre_hook(self._experts_hook(i, p)))
            if p.shared is not None:
                self.handles.append(p.shared.down_proj.register_forward_pre_hook(self._shared_hook(i)))

    def start(self, mask: torch.Tensor) -> None:
        self._mask = mask
        self.n_tokens += mask.sum()

    def mask(self) -> torch.Tensor:
        return self._mask

    def _shared_hook(self, i):
        def hook(module, args):
            mask = self.mask()
            x = args[0].reshape(*mask.shape, -1).float()  # [B*T, Fs] -> [B, T, Fs]
            self.shared[i].add(self.seq_agg(x, mask))
        return hook

    def _experts_hook(self, i, p: arch.MoeParts):
        @torch.no_grad()
        def hook(module, args):
            x, idx = args[0], args[1]  # hidden [N, C] (N = B*T), top-k expert ids [N, k]
            mask = self.mask()  # [B, T]
            B, T = mask.shape
            valid = mask.reshape(-1)  # [N]
            probs = torch.softmax(nn.functional.linear(x, p.router.weight).float(), dim=-1)  # [N, E]
            self.prob[i] += (probs * valid[:, None]).sum(0).double()
            routed = torch.zeros(x.shape[0], self.d.experts, dtype=torch.bool, device=x.device)  # [N, E]
            routed.scatter_(1, idx, True)
            routed &= valid[:, None]
            self.tokens[i] += routed.sum(0).double()
            out_norm = torch.zeros(x.shape[0], self.d.experts, device=x.device)  # [N, E] fp32
            neurons = torch.zeros(B, self.d.experts, self.d.ffn, device=x.device)  # [B, E, F]
            for e in routed.any(0).nonzero().flatten().tolist():
                rows = routed[:, e].nonzero().flatten()  # tokens routed to expert e
                act, out = expert_forward(p.experts, e, x[rows])  # [n, F], [n, C]
                out_norm[rows, e] = out.float().norm(dim=-1)
                neurons[:, e] = routed_aggregate(act.float(), rows // T, B, self.how)  # [B, F]
            self.experts[i].add(self.seq_agg(out_norm.view(B, T, -1), routed.view(B, T, -1)))  # [B, T, E] -> [B, E]
            self.neurons[i].add(neurons.flatten(1))  # [B, E, F] -> [B, E*F]
        return hook

    def stats(self) -> list:
        return [*self.experts, *self.neurons, *self.shared]

    def sums(self) -> list[torch.Tensor]:
        """The fp64 router sums, for all_reduce."""
        return [self.tokens, self.prob, self.n_tokens]

    def scores(self, how: str) -> dict[str, torch.Tensor]:
        """Scores by batch aggregation `how` (see the module docstring), on the CPU."""
        n = self.n_tokens.clamp_min(1.0)
        out = {"experts": torch.stack([s.result(how) for s in self.experts]).cpu(),  # [L, E]
               "neurons": torch.stack([s.result(how) for s in self.neurons]).cpu(),  # [L, E*F]
               "router_tokens": (self.tokens / n).float().cpu(), "router_prob": (self.prob / n).float().cpu()}
        if self.shared:
            out["shared_neurons"] = torch.stack([s.result(how) for s in self.shared]).cpu()  # [L, Fs]
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def routed_aggregate(x: torch.Tensor, sample: torch.Tensor, n_samples: int, how: str) -> torch.Tensor:
    """importance.seq_aggregate over only the tokens routed to one expert, from those tokens alone: x [n, C]
    (fp32) the expert's activations on them, sample [n] the sample each token belongs to -> [n_samples, C]
    (a sample with none of them gives 0). Never scatters them back into a [B, T, C] tensor."""
    zeros = torch.zeros(n_samples, x.shape[1], device=x.device)  # [B, C]
    count = torch.zeros(n_samples, device=x.device).index_add_(0, sample, torch.ones_like(sample, dtype=x.dtype))
    count = count.clamp_min(1.0)[:, None]  # [B, 1]
    if how == "mean":
        return zeros.index_add_(0, sample, x.abs()) / count
    if how == "l2":
        return zeros.index_add_(0, sample, x.square()).sqrt()
    if how == "max":  # |x| >= 0, so the zero start is the masked max's too
        return zeros.scatter_reduce_(0, sample[:, None].expand_as(x), x.abs(), "amax")
    mean = zeros.clone().index_add_(0, sample, x) / count  # var: [B, C]
    return zeros.index_add_(0, sample, (x - mean[sample]).square()) / count


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e of a fused experts module on tokens x [n, C] -> (act(gate) * up [n, F], its output [n, C]),
    as the experts' own forward computes them before the routing weight."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)  # [n, 2F] -> 2 x [n, F]
    act = experts.act_fn(gate) * up
    return act, nn.functional.linear(act, experts.down_proj[e])


# ---- plan ----------------------------------------------------------------------------------------

def _topk_sorted(score: torch.Tensor, k: int) -> list[int]:
    return torch.topk(score.float(), k).indices.sort().values.tolist()


def plan_layer(scores: dict[str, torch.Tensor], i: int, src: arch.Dims, dims: arch.Dims
               ) -> tuple[list[int], list[list[int]], list[int]]:
    """Layer i's kept experts (top dims.experts by score), each kept expert's kept neurons (its own top
    dims.ffn, in the same order as the experts) and the shared expert's kept neurons."""
    for key in ("experts", "neurons"):
        if key not in scores:
            raise ValueError(f"the scores hold no {key!r} of an MoE model; recompute importance on this model")
    experts = _topk_sorted(scores["experts"][i], dims.experts)
    per_expert = scores["neurons"][i].view(src.experts, src.ffn)  # [E*F] -> [E, F]
    neurons = [_topk_sorted(per_expert[e], dims.ffn) for e in experts]
    shared = _topk_sorted(scores["shared_neurons"][i], dims.shared_ffn) if dims.shared_ffn else []
    return experts, neurons, shared


# ---- prune ---------------------------------------------------------------------------------------

@torch.no_grad()
def slice_experts(model: nn.Module, layer: nn.Module, hidden: torch.Tensor, experts: list[int],
                  neurons: list[list[int]]) -> None:
    """Keep experts `experts` (router rows and fused weights, dim 0), each with its own kept neurons
    (neurons[j] for experts[j]), and hidden channels `hidden`, in place. Widths are fixed by
    arch.set_moe_widths."""
    p = arch.moe_parts(model, layer)
    ex = p.experts
    dev = ex.gate_up_proj.device
    e_idx, hidden = torch.tensor(experts, device=dev), hidden.to(dev)
    n_idx = torch.tensor(neurons, device=dev)  # [E', F']
    F = ex.down_proj.shape[2]
    gu = ex.gate_up_proj.data.index_select(0, e_idx)  # [E', 2F, C]
    rows = torch.cat([n_idx, n_idx + F], dim=1)  # gate rows then up rows: [E', 2F']
    gu = gu.gather(1, rows[:, :, None].expand(-1, -1, gu.shape[2]))  # [E', 2F', C]
    ex.gate_up_proj = nn.Parameter(gu.index_select(2, hidden).contiguous())  # [E', 2F', C']
    down = ex.down_proj.data.index_select(0, e_idx).index_select(1, hidden)  # [E', C', F]
    ex.down_proj = nn.Parameter(down.gather(2, n_idx[:, None, :].expand(-1, down.shape[1], -1)).contiguous())  # [E', C', F']
    w = p.router.weight.data  # [E, C]
    p.router.weight = nn.Parameter(w.index_select(0, e_idx).index_select(1, hidden).contiguous())  # [E', C']


# ---- weight-based criteria (minitron.prune.criteria) ------------------------------------------------------

def weight_unit_sums(p: arch.MoeParts, elem: dict) -> dict[str, torch.Tensor]:
    """An element-wise score (elem: parameter -> tensor of its shape) summed over the weights of each unit of
    one MoE block (fp64): channels [C] (router and expert columns / rows, shared expert and its gate), experts
    [E] (all of an expert's weights and its router row), neurons [E*F] (a neuron's gate and up rows and down
    column, expert-major) and shared_neurons [Fs]."""
    gu = elem[p.experts.gate_up_proj].double()  # [E, 2F, C]
    down = elem[p.experts.down_proj].double()  # [E, C, F]
    router = elem[p.router.weight].double()  # [E, C]
    gate, up = gu.sum(2).chunk(2, dim=1)  # [E, 2F] -> 2 x [E, F]
    neurons = gate + up + down.sum(1)  # [E, F]
    out = {"channels": gu.sum((0, 1)) + down.sum((0, 2)) + router.sum(0), "experts": neurons.sum(1) + router.sum(1),
           "neurons": neurons.flatten()}  # [E, F] -> [E*F]
    if p.shared is not None:
        g, u, dn = (elem[m.weight].double() for m in (p.shared.gate_proj, p.shared.up_proj, p.shared.down_proj))
        out["channels"] += g.sum(0) + u.sum(0) + dn.sum(1) + elem[p.shared_gate.weight].double().sum(0)
        out["shared_neurons"] = g.sum(1) + u.sum(1) + dn.sum(0)  # [Fs]
    return out


# ---- parameters ----------------------------------------------------------------------------------

def inactive_params(model: nn.Module) -> int:
    """Parameters a token does not use: in every MoE layer, the experts it is not routed to,
    (E - top_k) x one expert's weights (the shared expert and router are always active)."""
    if not arch.is_moe(model):
        return 0
    d = arch.dims_of(model.config)
    out = 0
    for layer in arch.decoder_layers(model):
        ex = arch.moe_parts(model, layer).experts
        per_expert = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // d.experts
        out += (d.experts - d.top_k) * per_expert
    return out
