"""Pruning is exact where exactness is possible.

- Trimming hidden channels that carry nothing changes a model's logits only through the RMS of the
  norms over the hidden axis (computed over H' channels instead of H): undo that and the logits are
  the teacher's, for every family. (Gemma3's sqrt(hidden) embedding scale in particular must be kept.)
- Pruning to the source's own dims changes nothing, in memory and after a save/reload.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, make_model, make_text
from minitron import arch
from minitron.arch.tiny import MOE_FAMILIES
from minitron.prune import apply_plan
from minitron.prune.plan import Target, make_plan

KEEP = 48  # of 64 hidden channels (a multiple of the 4 heads, as Gemma3 and Llama configs require)
CASES = [*FAMILIES, "gemma3_text-untied", "gemma2", "olmo2", "granite", *MOE_FAMILIES]


def _model(case: str) -> nn.Module:
    family, _, variant = case.partition("-")
    return make_model(family, **({"tie_word_embeddings": False} if variant == "untied" else {}))


def _scores(d: arch.Dims, channels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    out = {"heads": torch.rand(d.layers, d.heads), "kv_groups": torch.rand(d.layers, d.kv_heads),
           "neurons": torch.rand(d.layers, max(d.experts, 1) * d.ffn),  # MoE: [L, E*F]
           "channels": torch.rand(d.hidden) if channels is None else channels}
    if d.experts:
        out["experts"] = torch.rand(d.layers, d.experts)
    if d.shared_ffn:
        out["shared_neurons"] = torch.rand(d.layers, d.shared_ffn)
    return out


def _residual_writers(model: nn.Module, layer: nn.Module) -> list[torch.Tensor]:
    """The weights [C, in] (or fused experts' [E, C, F]) whose rows write the hidden channels of a layer's
    output, and their biases [C]: o_proj, down_proj, or every expert's and the shared expert's down_proj."""
    out = [arch.attn_output(model, layer)]
    if not arch.is_moe(model):
        out.append(arch.mlp_output(model, layer))
    else:
        p = arch.moe_parts(model, layer)
        out += [p.shared.down_proj] if p.shared is not None else []
    return out


def _all_hidden_norms(model: nn.Module) -> list[nn.Module]:
    layers = arch.decoder_layers(model)
    return [n for layer in layers for n in arch.hidden_norms(model, layer)] + [arch.final_norm(model)]


@torch.no_grad()
def _silence_channels(model: nn.Module, drop: torch.Tensor, keep: torch.Tensor) -> None:
    """Make the hidden channels `drop` carry nothing: zero them wherever they enter the residual stream
    (embedding columns, o_proj / down_proj output rows and biases). The residual stream is then zero on
    them at every position, and so is every RMSNorm's output there (Gemma3's post-attention and
    post-feed-forward norms read o_proj / down_proj outputs, zero there too).

    A LayerNorm (Nemotron's LayerNorm1P) also subtracts the mean over the channels it sees, H in the
    teacher and H' after pruning, and adds its bias on the dropped channels too. It is made exact by
    writing only zero-mean vectors over the kept channels into the residual stream (then both means are
    0 and the variance is the RMS) and by zeroing the norms' bias on the dropped channels."""
    layer_norm = isinstance(arch.final_norm(model), nn.LayerNorm)
    emb = arch.embedding(model).weight  # [V, H]
    emb[:, drop] = 0
    if layer_norm:
        emb[:, keep] -= emb[:, keep].mean(1, keepdim=True)
    for layer in arch.decoder_layers(model):
        if arch.is_moe(model):
            arch.moe_parts(model, layer).experts.down_proj[:, drop] = 0  # [E, H, F]
        for lin in _residual_writers(model, layer):  # weight [H, in]
            lin.weight[drop] = 0
            if layer_norm:
                lin.weight[keep] -= lin.weight[keep].mean(0, keepdim=True)
            if lin.bias is not None:
                lin.bias[drop] = 0
                if layer_norm:
                    lin.bias[keep] -= lin.bias[keep].mean()
    if layer_norm:
        for norm in _all_hidden_norms(model):
            if norm.bias is not None:
                norm.bias[drop] = 0


@torch.no_grad()
def _undo_rms_change(model: nn.Module, source_hidden: int) -> None:
    """On a vector x that is zero outside the H' kept channels, a norm over H' computes
    x / sqrt(|x|^2 / H' + eps) = sqrt(H'/H) * x / sqrt(|x|^2 / H + eps * H/H'): the teacher's output times
    sqrt(H'/H), with eps grown by H/H'. Multiply every hidden-axis norm's effective gain by sqrt(H/H')
    (Gemma3's and Nemotron's gain is 1 + w) and its eps by H/H'."""
    ratio = source_hidden / arch.dims_of(model.config).hidden  # H / H'
    for norm in _all_hidden_norms(model):
        arch.scale_norm_gain(model, norm, ratio**0.5)
        name = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
        setattr(norm, name, getattr(norm, name) * ratio)


@pytest.mark.parametrize("case", [c for c in CASES if c != "olmoe"])  # OLMoE: hidden = heads x head_dim
def test_silent_channels_prune_exactly(case, tokenizer, tmp_path):
    """A model whose dropped channels carry nothing gives the teacher's logits, up to the RMS change that
    every family has (undone here). For Gemma3 this needs the sqrt(hidden) embedding scale folded into the
    embedding weight (and, tied, the inverse into the final norm)."""
    torch.manual_seed(1)
    teacher = _model(case)
    d = arch.dims_of(teacher.config)
    perm = torch.randperm(d.hidden)
    keep, drop = perm[:KEEP].sort().values, perm[KEEP:].sort().values  # scattered, not a block
    _silence_channels(teacher, drop, keep)
    channels = torch.zeros(d.hidden)
    channels[keep] = 1 + torch.rand(KEEP)  # the silent channels rank last
    plan = make_plan(teacher.config, _scores(d, channels), Target(hidden=KEEP))
    assert plan.hidden == keep.tolist()

    ids = tokenizer(make_text(4), return_tensors="pt").input_ids
    with torch.no_grad():
        ref = teacher(ids).logits
        student = apply_plan(copy.deepcopy(teacher), plan)
        pruned = student(ids).logits
        student.save_pretrained(tmp_path / "student")  # the plain HF model reloads to the same logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
        assert torch.allclose(reloaded(ids).logits, pruned, atol=1e-5)
        _undo_rms_change(student, d.hidden)
        got = student(ids).logits
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_pruning_to_own_dims_is_identity(case, tokenizer, tmp_path):
    """Keep everything (scores arbitrary): identical logits in memory and after save + reload."""
    model = _model(case)
    ids = tokenizer(make_text(4), return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        d = arch.dims_of(model.config)
        target = Target(hidden=d.hidden, ffn=d.ffn, heads=d.heads, kv_heads=d.kv_heads, layers=d.layers)
        apply_plan(model, make_plan(model.config, _scores(d), target))
        assert torch.equal(model(ids).logits, ref)
        model.save_pretrained(tmp_path / "same")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "same")
        assert torch.equal(reloaded(ids).logits, ref)
