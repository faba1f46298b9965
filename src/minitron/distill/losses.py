"""Distillation losses on logits, computed in chunks over tokens so full-vocab logits never coexist.

The student's final hidden states h [N, C] (after the final norm) and its lm_head weight W [V, C]
go into `chunked_distill_loss`, which projects `chunk_size` tokens at a time to fp32 logits
[n, V], compares them with the teacher's (projected the same way from the teacher's hidden states,
or read from a top-k cache), and keeps only that chunk's gradient. The autograd function computes the
gradients of h and W chunk by chunk in its forward pass (a local backward through one chunk's
matmul + loss) and hands them back in backward, so peak memory holds a few [chunk, V] fp32 tensors,
never [B, T, V] for teacher and student.

Divergences (p = teacher, q = student, both softened by temperature T, per token, summed over buckets):
- fkl: KL(p || q) = sum p (log p - log q)              (Minitron default)
- rkl: KL(q || p)
- jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
Every divergence is multiplied by T^2 (gradient scale independent of T). An optional cross-entropy
term on the hard next tokens (at T = 1) is added with weight `ce_weight`.

Normalization: the per-token losses are summed over valid tokens and divided by `normalizer`, which the
trainer sets to the number of valid tokens in the whole optimizer step (all micro-batches, all ranks);
a token-level mean over the global batch, whatever the split.

Top-k cache: the teacher is given as its k most likely tokens with their log-probs (at temperature T).
The tail mass the cache does not hold, r = 1 - sum_k p_i, becomes one extra "rest" bucket; the student
gets its own rest bucket 1 - sum_k q_i over the same indices. The divergence is taken over these k + 1
buckets, so for k = V it equals the full-vocabulary divergence exactly, and for k < V it is the
divergence between the two distributions coarsened to (top-k tokens, everything else): it never
ignores the mass that is missing and needs no renormalization of the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd")
NO_MAP = (1.0, None)  # arch.logit_map of a model whose logits are lm_head's output
HIDDEN_LOSSES = ("none", "cosine", "mse")


@dataclass
class LossConfig:
    """What the logit loss computes."""

    loss: str = "fkl"           # fkl | rkl | jsd
    temperature: float = 1.0    # softening of both distributions; the divergence is scaled by T^2
    jsd_beta: float = 0.5       # mixture weight of the teacher in jsd
    kd_weight: float = 1.0      # weight of the divergence (0 = plain LM loss, e.g. teacher correction)
    ce_weight: float = 0.0      # weight of the next-token cross-entropy (paper: 0)
    chunk_size: int = 512       # tokens per chunk: extra memory ~ 4 * chunk_size * V * 4 bytes (fkl fast path)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; use one of {LOSSES}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, loss: str, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence between log-prob vectors over the last axis: [n, K], [n, K] -> [n] (fp32).

    Zero-probability buckets contribute 0 (xlogy conventions), so -inf log-probs are safe.
    """
    s_logp, t_logp = s_logp.float(), t_logp.float()
    if loss == "fkl":
        p = t_logp.exp()
        return torch.where(p > 0, p * (t_logp - s_logp), 0.0).sum(-1)
    if loss == "rkl":
        q = s_logp.exp()
        return torch.where(q > 0, q * (s_logp - t_logp), 0.0).sum(-1)
    if loss == "jsd":
        log_beta, log_1mb = torch.log(torch.tensor(beta)), torch.log(torch.tensor(1.0 - beta))
        m_logp = torch.logsumexp(torch.stack([t_logp + log_beta, s_logp + log_1mb]), dim=0)  # [n, K]
        p, q = t_logp.exp(), s_logp.exp()
        kl_pm = torch.where(p > 0, p * (t_logp - m_logp), 0.0).sum(-1)
        kl_qm = torch.where(q > 0, q * (s_logp - m_logp), 0.0).sum(-1)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")


def with_rest_bucket(logp_topk: torch.Tensor) -> torch.Tensor:
    """Append the log of the missing mass: [n, k] log-probs -> [n, k + 1] (a full distribution).

    rest = 1 - sum exp(logp_topk), computed as log(-expm1(logsumexp)) and floored at the smallest
    normal fp32 (1e-38): an empty rest (k = V) then adds ~1e-38 * 87 to the divergence and no NaN gradient.
    """
    lse = torch.logsumexp(logp_topk.float(), dim=-1, keepdim=True)                  # [n, 1]
    tiny = torch.finfo(torch.float32).tiny
    rest = torch.log(torch.clamp(-torch.expm1(torch.clamp(lse, max=0.0)), min=tiny))  # [n, 1]
    return torch.cat([logp_topk.float(), rest], dim=-1)                             # [n, k + 1]


def token_loss(s_logits: torch.Tensor, cfg: LossConfig, labels: torch.Tensor | None = None,
               t_logits: torch.Tensor | None = None, t_topk: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """Per-token loss of one chunk: student logits [n, V] (fp32) -> [n].

    Teacher: full logits t_logits [n, V], or t_topk = (indices [n, k], log-probs at T [n, k]), or none
    (then only the cross-entropy term, kd_weight must be 0).
    """
    T = cfg.temperature
    out = torch.zeros(s_logits.shape[0], dtype=torch.float32, device=s_logits.device)
    if cfg.kd_weight:
        s_logp = torch.log_softmax(s_logits / T if T != 1 else s_logits, dim=-1)     # [n, V]
        if t_logits is not None:
            t_logits = t_logits.float()
            t_logp = torch.log_softmax(t_logits / T if T != 1 else t_logits, dim=-1)  # [n, V]
            div = divergence(s_logp, t_logp, cfg.loss, cfg.jsd_beta)
        elif t_topk is not None:
            idx, t_lp = t_topk
            s_buckets = with_rest_bucket(s_logp.gather(-1, idx.long()))              # [n, k + 1]
            div = divergence(s_buckets, with_rest_bucket(t_lp), cfg.loss, cfg.jsd_beta)
        else:
            raise ValueError("kd_weight > 0 needs a teacher (logits or a top-k cache)")
        out = out + cfg.kd_weight * (T * T) * div
    if cfg.ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        out = out + cfg.ce_weight * F.cross_entropy(s_logits, labels, reduction="none")
    return out


def fkl_ce_and_grad(s_logits: torch.Tensor, t_logits: torch.Tensor | None, cfg: LossConfig,
                    labels: torch.Tensor | None, t_topk: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL (T^2-scaled) + CE per token and its gradient w.r.t. the student logits, in closed form.

    s_logits, t_logits: [n, V] fp32 (consumed: overwritten in place); or t_topk = (idx, logp) [n, k].
    Returns (loss [n], grad [n, V]). With q = softmax(z / T):
      full teacher:  d/dz T^2 KL(p || q) = T (q - p)
      top-k + rest:  d/dz = T (q_j - p_j) for j in the top-k, T q_j (1 - p_rest / q_rest) elsewhere
      CE:            d/dz = softmax(z) - onehot(label)
    Equals token_loss + autograd (tested); uses about 3 [n, V] buffers instead of ~10.
    """
    T = cfg.temperature
    n = s_logits.shape[0]
    loss = torch.zeros(n, dtype=torch.float32, device=s_logits.device)
    grad = None
    if cfg.ce_weight:
        ls = torch.log_softmax(s_logits, dim=-1)                                     # [n, V]
        loss += cfg.ce_weight * -ls.gather(-1, labels[:, None]).squeeze(-1)
        grad = ls.exp_()                                                             # softmax(z)
        grad.scatter_add_(-1, labels[:, None], torch.full((n, 1), -1.0, device=grad.device))
        grad.mul_(cfg.ce_weight)
    if cfg.kd_weight and t_topk is not None:
        idx, t_lp = t_topk[0].long(), t_topk[1]
        t_b = with_rest_bucket(t_lp)                                                 # [n, k + 1]
        p_b = t_b.exp()
        s_logp = torch.log_softmax(s_logits.div_(T) if T != 1 else s_logits, dim=-1)  # [n, V]
        del s_logits
        s_top = s_logp.gather(-1, idx)                                               # [n, k]
        s_logp.scatter_(-1, idx, float("-inf"))                                      # the tail only
        tiny = torch.finfo(torch.float32).tiny
        s_rest = torch.logsumexp(s_logp, dim=-1, keepdim=True).clamp(min=math.log(tiny))  # [n, 1]
        s_b = torch.cat([s_top, s_rest], dim=-1)                                     # [n, k + 1]
        loss += (cfg.kd_weight * T * T) * (p_b * (t_b - s_b)).sum(-1)
        ratio = (t_b[:, -1:] - s_rest).exp()                                         # p_rest / q_rest
        kd_grad = s_logp.exp_().mul_(1.0 - ratio)                                    # tail; 0 on the top-k
        kd_grad.scatter_(-1, idx, s_top.exp() - p_b[:, :-1])
        kd_grad.mul_(cfg.kd_weight * T)
        grad = kd_grad if grad is None else grad.add_(kd_grad)
    elif cfg.kd_weight:
        if t_logits is None:
            raise ValueError("kd_weight > 0 needs a teacher (logits or a top-k cache)")
        t_logp = torch.log_softmax(t_logits.div_(T) if T != 1 else t_logits, dim=-1)  # [n, V]
        del t_logits
        s_logp = torch.log_softmax(s_logits.div_(T) if T != 1 else s_logits, dim=-1)  # [n, V]
        del s_logits
        t_logp.clamp_(min=-1e4)                  # exp(-1e4) = 0: empty teacher buckets add 0, not NaN
        p = t_logp.exp()                                                             # [n, V]
        loss += (cfg.kd_weight * T * T) * t_logp.sub_(s_logp).mul_(p).sum(-1)        # sum p (log p - log q)
        kd_grad = s_logp.exp_().sub_(p).mul_(cfg.kd_weight * T)                      # T (q - p)
        grad = kd_grad if grad is None else grad.add_(kd_grad)
    return loss, grad


def map_logits(raw: torch.Tensor, logit_map: tuple[float, float | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw lm_head outputs [n, V] -> the model's logits [n, V] (arch.logit_map: divided by scale, then
    soft-capped: cap * tanh(x / cap)), and tanh(x / cap) [n, V] (None without a cap) for the gradient:
    d logits / d raw = (1 - tanh^2) / scale."""
    scale, cap = logit_map
    x = raw / scale if scale != 1.0 else raw
    if cap is None:
        return x, None
    th = torch.tanh(x / cap)
    return th * cap, th


class _ChunkedLoss(torch.autograd.Function):
    """sum over tokens of token_loss(h @ W.T) * mask / normalizer, gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, h, w, mask, labels, teacher, cfg, normalizer, s_map):
        # h [N, C], w [V, C], mask [N] (float), labels [N] or None, s_map the student's (scale, cap)
        # teacher: ("hidden", h_t [N, Ct], w_t [V, Ct], (scale, cap)) | ("topk", idx [N, k], logp [N, k]) | None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Under autocast the matmuls run in its dtype, but w is cast here once: autocast itself would cache
        # a new [V, C] copy of w for every chunk (each chunk's w is a fresh leaf) until its region ends.
        dev = h.device.type
        w_c = w.detach().to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else w.detach()
        with torch.autocast(dev, enabled=False):
            total, grad_h, grad_w = _chunk_loop(h, w_c, mask, labels, teacher, cfg, normalizer, need_h, need_w,
                                                s_map)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # the saved gradients are used once (no retain_graph): scale them in place
        gh = grad_h.mul_(grad_out) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None


def _chunk_loop(h, w, mask, labels, teacher, cfg: LossConfig, normalizer, need_h: bool, need_w: bool,
                s_map: tuple[float, float | None] = NO_MAP):
    """_ChunkedLoss's forward, chunk by chunk: (loss, grad_h [N, C] | None, grad_w fp32 [V, C] | None).

    h [N, C]; w [V, C] detached, already in the dtype the matmuls run in; the other inputs as forward's.
    """
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = None  # fp32 [V, C], the first chunk's gradient, then accumulated in place
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], cfg.chunk_size):
        sl = slice(start, start + cfg.chunk_size)
        m = mask[sl]  # a chunk with no valid token adds 0 (no host sync to skip it: the GPU keeps running)
        hc = h[sl].detach().to(w.dtype).requires_grad_(need_h)
        wc = w.detach().requires_grad_(need_w)
        t_logits = t_topk = None
        if teacher is not None and teacher[0] == "hidden":
            with torch.no_grad():
                t_raw = (teacher[1][sl].to(teacher[2].dtype) @ teacher[2].T).float()  # [n, V]
                t_logits = map_logits(t_raw, teacher[3])[0]
                del t_raw
        elif teacher is not None:
            t_topk = (teacher[1][sl], teacher[2][sl])
        lab = labels[sl] if labels is not None else None
        if cfg.loss == "fkl" or not cfg.kd_weight:
            # fast path (the default): closed-form logit gradient, a few [n, V] buffers reused in place
            with torch.no_grad():
                s_logits, th = map_logits((hc @ wc.T).float(), s_map)          # [n, V]
                per_token, g_logits = fkl_ce_and_grad(s_logits, t_logits, cfg, lab, t_topk)
                del s_logits, t_logits
                chunk = (per_token * m).sum() / normalizer
                g_logits.mul_((m / normalizer)[:, None])                        # d chunk / d logits
                if th is not None:                                              # through the soft-cap
                    g_logits.mul_(th.square_().neg_().add_(1.0))
                if s_map[0] != 1.0:                                             # through the scaling
                    g_logits.div_(s_map[0])
                # the gradient GEMMs run in the matmuls' dtype (bf16 under autocast, as autograd's backward of
                # an autocast matmul would; fp32 otherwise), accumulating in fp32 (grad_w)
                g_logits = g_logits.to(wc.dtype)
                grads = []
                if need_h:
                    grads.append((g_logits @ wc).to(h.dtype))                   # [n, C]
                if need_w:
                    grads.append(g_logits.T @ hc)                               # [V, C]
        else:
            with torch.enable_grad():
                s_logits = map_logits((hc @ wc.T).float(), s_map)[0]            # [n, V]
                chunk = (token_loss(s_logits, cfg, lab, t_logits, t_topk) * m).sum() / normalizer
                inputs = [t for t, need in ((hc, need_h), (wc, need_w)) if need]
                grads = list(torch.autograd.grad(chunk, inputs)) if inputs else []
        if need_h:
            grad_h[sl] = grads.pop(0)
        if need_w:
            g = grads.pop(0).float()
            grad_w = g if grad_w is None else grad_w.add_(g)
        total += chunk.detach()
    if need_w and grad_w is None:  # every token masked
        grad_w = torch.zeros_like(w, dtype=torch.float32)
    return total, grad_h, grad_w


def chunked_distill_loss(h: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, cfg: LossConfig,
                         normalizer: float | torch.Tensor, labels: torch.Tensor | None = None,
                         teacher_hidden: tuple[torch.Tensor, torch.Tensor] | None = None,
                         teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                         logit_map: tuple[float, float | None] = NO_MAP) -> torch.Tensor:
    """Memory-bounded logit loss -> scalar (fp32): sum of per-token losses over valid tokens / normalizer.

    h: student final hidden states [N, C]; w: student lm_head weight [V, C] (no bias in the supported
    families); mask: [N] 1 for tokens that count; labels: next tokens [N] (for ce_weight);
    teacher_hidden: (teacher final hidden states [N, Ct], teacher lm_head weight [V, Ct][, its logit map]) or
    teacher_topk: (indices [N, k], log-probs at temperature T [N, k]).
    logit_map: the student's (scale, cap) (arch.logit_map): Gemma2's soft-cap and Granite's logit scaling are
    part of the model, so the loss compares the logits the models' forwards give.
    Gradients flow to h and w and equal those of the naive loss on full logits.
    """
    if teacher_hidden is not None and teacher_topk is not None:
        raise ValueError("give the teacher as hidden states or as a top-k cache, not both")
    teacher = None
    if teacher_hidden is not None:
        teacher = ("hidden", teacher_hidden[0], teacher_hidden[1],
                   teacher_hidden[2] if len(teacher_hidden) > 2 else NO_MAP)
        if teacher_hidden[1].shape[0] != w.shape[0]:
            raise ValueError(f"teacher vocabulary {teacher_hidden[1].shape[0]} != student vocabulary {w.shape[0]}")
    elif teacher_topk is not None:
        teacher = ("topk", teacher_topk[0], teacher_topk[1])
    mask = mask.to(torch.float32)
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=h.device).clamp(min=1.0)
    return _ChunkedLoss.apply(h, w, mask, labels, teacher, cfg, normalizer, logit_map)


def naive_distill_loss(s_logits: torch.Tensor, mask: torch.Tensor, cfg: LossConfig, normalizer,
                       labels: torch.Tensor | None = None, t_logits: torch.Tensor | None = None,
                       t_topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The same loss on full logits [N, V] in one piece (reference for tests and the benchmark)."""
    per_token = token_loss(s_logits.float(), cfg, labels, t_logits, t_topk)          # [N]
    return (per_token * mask.float()).sum() / max(float(normalizer), 1.0)


def hidden_state_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor, mask: torch.Tensor, kind: str,
                      normalizer) -> torch.Tensor:
    """Intermediate-state loss between (projected) student and teacher states [N, C] -> scalar.

    cosine: 1 - cos(s, t) per token; mse: mean over channels of (s - t)^2 per token. Summed over valid
    tokens and divided by normalizer, like the logit loss.
    """
    s, t = s_hidden.float(), t_hidden.float()
    if kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)                # [N]
    elif kind == "mse":
        per_token = (s - t).pow(2).mean(-1)                                          # [N]
    else:
        raise ValueError(f"unknown hidden loss {kind!r}; use one of {HIDDEN_LOSSES}")
    return (per_token * mask.float()).sum() / max(float(normalizer), 1.0)


def default_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student layer i -> teacher layer whose output it should match, spread evenly over depth.

    The last student layer maps to the last teacher layer; e.g. 2 of 4 -> [1, 3]; equal depths -> identity.
    """
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits [n, V] -> (indices [n, k] int32, log-probs at temperature [n, k] fp32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)                   # [n, V]
    vals, idx = logp.topk(k, dim=-1)
    return idx.to(torch.int32), vals
