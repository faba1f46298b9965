"""The trained module (student + hidden-loss projection, forward returns the loss), layer taps, the
teacher's forward pass, and validation (LM loss and KL to the teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from minitron.arch.adapters import decoder_layers, dims_of, layer_output, lm_head, logit_map
from minitron.distill.config import DistillConfig
from minitron.distill.losses import (
    LossConfig,
    chunked_distill_loss,
    hidden_state_loss,
)
from minitron.distill.parallel import Dist

# ---- the trained module ---------------------------------------------------------------------------

class LayerTap:
    """Forward hooks keeping the outputs [B, T, C] of chosen decoder layers."""

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in sorted(set(layer_ids))]

    def _hook(self, i):
        def hook(_module, _inp, out):
            self.outputs[i] = layer_output(out)
        return hook


def plan_layer_map(student: str, n_student: int, n_teacher: int) -> list[int] | None:
    """The teacher layer each student layer was cut from, read from the prune plan (plan.json) that
    `minitron prune` leaves in the student's folder: e.g. layers 13-18 of 30 dropped -> [0, ..., 12, 19, ..., 29].
    None when there is no plan, or it was cut from a model of another depth than the teacher (an iterative step's
    plan indexes the previous student's layers), or it does not match the student's depth."""
    path = Path(student) / "plan.json"
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    kept = plan.get("kept_layers") or []
    if (plan.get("source") or {}).get("layers") != n_teacher or len(kept) != n_student:
        return None
    return [int(i) for i in kept]


class Student(nn.Module):
    """The student plus the projection of the hidden-state loss; forward returns the loss.

    Wrapping both in one module lets DDP/FSDP2 see every trained parameter, and keeps the lm_head weight
    (used outside lm_head.forward by the chunked loss) inside the root module's forward.
    """

    def __init__(self, model: nn.Module, teacher_hidden: int | None, layer_map: list[int] | None,
                 hidden_loss: str):
        super().__init__()
        self.model = model
        self.hidden_loss = hidden_loss
        self.layer_map = layer_map
        self.proj = None
        width = dims_of(model.config).hidden
        if hidden_loss != "none" and teacher_hidden != width:
            self.proj = nn.Linear(width, teacher_hidden, bias=False, dtype=lm_head(model).weight.dtype)
        self.tap = LayerTap(model, list(range(len(layer_map)))) if hidden_loss != "none" else None

    def forward(self, input_ids, attention_mask, loss_cfg: LossConfig, normalizer, teacher_hidden=None,
                teacher_topk=None, teacher_layers=None, hidden_weight: float = 1.0):
        """input_ids, attention_mask [B, T]; teacher_hidden (h_t [B*(T-1), Ct], w_t [V, Ct]) or
        teacher_topk (idx, logp [B*(T-1), k]); teacher_layers {teacher layer: [B, T, Ct]}.
        Returns (total loss, logit loss, hidden loss), each a scalar divided by normalizer."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # no KV cache
        h = out.last_hidden_state[:, :-1]                                            # [B, T-1, C]
        h = h.reshape(-1, h.shape[-1])                                               # [B*(T-1), C]
        labels = input_ids[:, 1:].reshape(-1)                                        # [B*(T-1)]
        mask = (attention_mask[:, :-1] * attention_mask[:, 1:]).reshape(-1)          # [B*(T-1)]
        logit = chunked_distill_loss(h, lm_head(self.model).weight, mask, loss_cfg, normalizer, labels,
                                     teacher_hidden, teacher_topk, logit_map(self.model))
        hid = torch.zeros((), device=h.device)
        if self.tap is not None and teacher_layers is not None:
            for s_idx, t_idx in enumerate(self.layer_map):
                s = self.tap.outputs[s_idx][:, :-1]                                  # [B, T-1, C]
                s = s.reshape(-1, s.shape[-1])                                       # [B*(T-1), C]
                if self.proj is not None:
                    s = self.proj(s)                                                 # [B*(T-1), Ct]
                t = teacher_layers[t_idx][:, :-1]
                t = t.reshape(-1, t.shape[-1])                                       # [B*(T-1), Ct]
                hid = hid + hidden_state_loss(s, t, mask, self.hidden_loss, normalizer) / len(self.layer_map)
        if self.tap is not None:
            self.tap.outputs.clear()
        return logit + hidden_weight * hid, logit.detach(), hid.detach()


@torch.no_grad()
def teacher_pass(teacher, tap: LayerTap | None, input_ids, attention_mask):
    """Teacher final hidden states [B*(T-1), Ct], lm_head weight [V, Ct] and logit map; tapped layers if any."""
    out = teacher.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # no KV cache
    h = out.last_hidden_state[:, :-1]                                                # [B, T-1, Ct]
    layers = dict(tap.outputs) if tap is not None else None
    if tap is not None:
        tap.outputs.clear()
    return (h.reshape(-1, h.shape[-1]), lm_head(teacher).weight, logit_map(teacher)), layers  # [B*(T-1), Ct]




# ---- evaluation -------------------------------------------------------------------------------------

def val_batches(val: torch.Tensor, cfg: DistillConfig, d: Dist) -> tuple[list[list[int]], int]:
    """This rank's validation batches (block ids) and how many are real: padded to the largest rank's count
    with dummy batches (FSDP needs every rank in every forward: a short rank runs uncounted passes)."""
    n_blocks = min(val.shape[0], cfg.eval_batches * cfg.batch_size * d.world)
    mine = list(range(d.rank, n_blocks, d.world))
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    n_batches = int(d.max(d.tensor([len(batches)], dtype=torch.int64)))
    return batches + [mine[:1] or [0]] * (n_batches - len(batches)), len(batches)


@torch.no_grad()
def val_topk(teacher, val: torch.Tensor, cfg: DistillConfig, d: Dist, device) -> list[tuple[torch.Tensor, ...]]:
    """The teacher's top-k (at T = 1) on each of this rank's validation batches -> [(idx, logp [B, T-1, k])],
    so that evaluation can go on without the teacher (release_teacher)."""
    from minitron.distill.topk_cache import teacher_topk

    return [teacher_topk(teacher, val[b].to(device), cfg.topk, 1.0, cfg.chunk_size) for b in val_batches(val, cfg, d)[0]]


@torch.no_grad()
def evaluate(model, teacher, val: torch.Tensor, cfg: DistillConfig, d: Dist, device, autocast,
             topk: list[tuple[torch.Tensor, ...]] | None = None) -> dict:
    """Validation LM loss of the student and forward KL (T = 1) to the teacher, per predicted token: the full KL
    with the teacher, or over the top-k + rest buckets of `topk` (val_topk's output) once it is released."""
    model.eval()
    sums = d.tensor([0.0, 0.0, 0.0])  # ce sum, kl sum, tokens (on the training device: collectives)
    ce_cfg = LossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=cfg.chunk_size)
    kl_cfg = LossConfig(loss="fkl", temperature=1.0, chunk_size=cfg.chunk_size)
    batches, n_real = val_batches(val, cfg, d)
    for b, blocks in enumerate(batches):
        ids = val[blocks].to(device)                                                 # [B, T]
        att = torch.ones_like(ids)
        with autocast():
            ce = model(ids, att, ce_cfg, 1.0)[1]
            kl = 0.0
            if teacher is not None:
                kl = model(ids, att, kl_cfg, 1.0, teacher_hidden=teacher_pass(teacher, None, ids, att)[0])[1]
            elif topk is not None:
                idx, lp = topk[b]                                                    # [B, T-1, k]
                kl = model(ids, att, kl_cfg, 1.0, teacher_topk=(idx.reshape(-1, idx.shape[-1]).to(device),
                                                                 lp.reshape(-1, lp.shape[-1]).to(device)))[1]
        if b < n_real:
            sums += torch.stack([ce.double(), torch.as_tensor(kl, device=sums.device).double(),
                                 d.tensor(float(ids.shape[0] * (ids.shape[1] - 1)))])
    d.sum(sums)
    model.train()
    kl = sums[1].item() / sums[2].item()
    return {"val_lm_loss": sums[0].item() / sums[2].item(), "val_kl": kl if teacher is not None else None,
            **({"val_kl_topk": kl} if teacher is None and topk is not None else {})}


def evaluate_all(model, teacher, val: torch.Tensor, extra: dict[str, torch.Tensor], cfg: DistillConfig, d: Dist,
                 device, autocast, topk: list[tuple[torch.Tensor, ...]] | None = None) -> dict:
    """evaluate() on the validation split, plus the LM loss on each extra held-out corpus
    (logged as `val_lm_loss:<source>`)."""
    ev = evaluate(model, teacher, val, cfg, d, device, autocast, topk)
    for source, blocks in extra.items():
        ev[f"val_lm_loss:{source}"] = evaluate(model, None, blocks, cfg, d, device, autocast)["val_lm_loss"]
    return ev


