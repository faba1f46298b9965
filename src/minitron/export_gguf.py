"""Write a Hugging Face causal LM as one GGUF file that llama.cpp runs.

    export_gguf(model, tokenizer, "runs/x/export/student-Q8_0.gguf", "q8_0")

The `gguf` package (llama.cpp's own writer) writes the file. What llama.cpp expects of each family lives
in one table, `GGUF_FAMILIES`: its llama.cpp architecture, how its rotary embedding is laid out, the GGUF
name of every tensor, and the quirks (norm weights stored as 1 + w, a graph that assumes heads * head_dim
== hidden). llama.cpp's `convert_hf_to_gguf.py` is the reference for names and metadata keys.

Tensors are written in PyTorch's row-major shape [out_features, in_features] (GGUF lists dims the other way
round, ne = [in, out]); MoE experts, which transformers 5 keeps fused, are written stacked as llama.cpp keeps
them: ffn_gate_exps / ffn_up_exps [n_expert, width, hidden] (gate_up_proj's rows split) and ffn_down_exps
[n_expert, hidden, width]; the routers stay f32 in every file type, as llama.cpp's converter keeps them.
Where llama.cpp's graph hard-codes what transformers reads from the config (Gemma2's sliding-window pattern,
the MoE families' renormalization of the top-k routing weights), check_config refuses a model that differs.
Mamba2 and NemotronH (hybrid Mamba2 / attention / MLP / MoE layers) map each parameter (A_log, D and dt_bias are
parameters of no submodule) to llama.cpp's ssm_* tensors with A = -exp(A_log), and tell llama.cpp each hybrid
layer's kind through per-layer head_count_kv / feed_forward_length arrays (0 on Mamba layers).

Types: f32, f16, bf16 and the block types gguf.quants quantizes in numpy (q8_0, q4_0, q4_1, q5_0, q5_1); 1-D
tensors (norms, biases) stay f32, and a matrix whose rows are not a whole number of blocks falls back to f16,
as llama.cpp's converter does. K-quants (q4_k_m, q6_k, ...) have no
numpy quantizer: they go through llama.cpp's own quantizer in llama-cpp-python (the gguf-runtime extra).
The file is written under a temporary name and renamed at the end: an error never leaves a partial file.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from minitron import arch as A


class GGUFExportError(ValueError):
    """The model, its tokenizer or the requested type cannot be written as GGUF; the message says the fix."""


# ---- types --------------------------------------------------------------------------------------------

def _numpy_types() -> dict:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
            "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}


# llama.cpp file types reached through llama-cpp-python's llama_model_quantize (no numpy quantizer exists)
LLAMA_CPP_TYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
                   "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}
NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def check_type(qtype: str) -> str:
    """The lower-case type name, or GGUFExportError naming the types there are."""
    t = str(qtype).lower()
    if t in NUMPY_TYPES or t in LLAMA_CPP_TYPES:
        return t
    raise GGUFExportError(f"unknown GGUF type {qtype!r}: use one of {', '.join(NUMPY_TYPES)} (written in numpy), "
                          f"or a llama.cpp k-quant {', '.join(LLAMA_CPP_TYPES)} (needs llama-cpp-python: "
                          "pip install 'minitron[gguf-runtime]')")


# ---- one table of llama.cpp facts per family ---------------------------------------------------------------

# HF name inside a decoder layer -> GGUF name inside blk.N (llama.cpp's convert_hf_to_gguf.py mapping)
_LLAMA_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma's four norms per layer: after attention, before and after the MLP
_SANDWICH_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                   "post_feedforward_layernorm": "post_ffw_norm"}
# a sparse MoE block (transformers 5 stores the experts fused, see arch.MoeArch): the router, and experts stacked
# [n_expert, ...] as llama.cpp keeps them; a tuple value splits the rows of one tensor in equal parts (gate; up)
_MOE_LAYER = {"mlp.gate": "ffn_gate_inp", "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
              "mlp.experts.down_proj": "ffn_down_exps"}
# Qwen2-MoE's shared expert (a gated MLP of its own width) and its sigmoid gate
_SHARED_EXPERT = {"mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
                  "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_MOE_BASE = {k: v for k, v in _LLAMA_LAYER.items() if k not in _DENSE_MLP} | _MOE_LAYER
# tensors llama.cpp's converter always keeps in f32, whatever the file type: the routers, the Mamba convolution and
# gated norm (besides every 1-D tensor and every tensor without a .weight suffix, such as ssm_a / ssm_d)
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight", "ssm_norm.weight")

# ---- Mamba2 and hybrid families: a map per parameter (A_log, D, dt_bias are parameters without .weight) ----------

# a Mamba2 layer (pre-norm + mixer, transformers 5): HF parameter inside the layer -> GGUF tensor inside blk.N, as
# llama.cpp's mamba2 / nemotron_h graphs load it; the transforms (A = -exp(A_log), reshapes) are in _ssm_transform
_MAMBA_PARAMS = {"norm.weight": "attn_norm.weight", "mixer.in_proj.weight": "ssm_in.weight",
                 "mixer.conv1d.weight": "ssm_conv1d.weight", "mixer.conv1d.bias": "ssm_conv1d.bias",
                 "mixer.dt_bias": "ssm_dt.bias", "mixer.A_log": "ssm_a", "mixer.D": "ssm_d",
                 "mixer.norm.weight": "ssm_norm.weight", "mixer.out_proj.weight": "ssm_out.weight"}
# NemotronH: one mixer per layer, of the kind config.layers_block_type names (Mamba2, attention without RoPE,
# relu^2 MLP without a gate, or MoE: a sigmoid router with a score-correction bias, non-gated experts stacked
# [n_expert, ...] as transformers already keeps them, a shared expert, optional latent projections)
_NEMOTRON_H_PARAMS = {
    **_MAMBA_PARAMS, "mixer.q_proj.weight": "attn_q.weight", "mixer.k_proj.weight": "attn_k.weight",
    "mixer.v_proj.weight": "attn_v.weight", "mixer.o_proj.weight": "attn_output.weight",
    "mixer.up_proj.weight": "ffn_up.weight", "mixer.down_proj.weight": "ffn_down.weight",
    "mixer.gate.weight": "ffn_gate_inp.weight", "mixer.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mixer.experts.up_proj": "ffn_up_exps.weight", "mixer.experts.down_proj": "ffn_down_exps.weight",
    "mixer.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mixer.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mixer.fc1_latent_proj.weight": "ffn_latent_down.weight", "mixer.fc2_latent_proj.weight": "ffn_latent_up.weight"}


@dataclass(frozen=True)
class GGUFFamily:
    """What llama.cpp expects of one minitron family."""

    arch: str                      # llama.cpp architecture (general.architecture)
    rope: str                      # "norm": llama.cpp rotates interleaved pairs, so HF's rotate_half rows of
    #                                q/k are permuted; "neox": HF's layout as is
    layer: dict = field(default_factory=lambda: dict(_LLAMA_LAYER))
    norm_shift: float = 0.0        # added to every norm weight: llama.cpp computes x * w where HF has x * (1 + w)
    layer_norm: bool = False       # LayerNorm (eps key layer_norm_epsilon) instead of RMSNorm
    q_is_hidden: bool = False      # llama.cpp's graph sizes q and o as hidden x hidden: heads * head_dim == hidden
    as_llama_if_not: bool = False  # ... else write it as the llama architecture (same maths, q/k permuted)
    output_required: bool = False  # llama.cpp needs output.weight even when the HF model ties it
    # Mamba2 / hybrid families: {HF parameter inside a layer: GGUF tensor inside blk.N} (None: `layer` above),
    # where the layers live, and {HF parameter outside the layers: GGUF tensor}
    params: dict | None = None
    layers: str = "model.layers"
    top: dict | None = None


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("llama", "norm"),
    "mistral": GGUFFamily("llama", "norm"),  # llama.cpp has no separate mistral graph (sliding window ignored)
    "qwen2": GGUFFamily("qwen2", "neox", q_is_hidden=True, as_llama_if_not=True),  # q/k/v biases
    "qwen3": GGUFFamily("qwen3", "neox", layer={**_LLAMA_LAYER, "self_attn.q_norm": "attn_q_norm",
                                                "self_attn.k_norm": "attn_k_norm"}),
    "gemma3_text": GGUFFamily("gemma3", "neox", norm_shift=1.0, layer={
        **_LLAMA_LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm"}),
    "phi3": GGUFFamily("phi3", "neox", layer={
        "input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
        q_is_hidden=True, as_llama_if_not=True),
    "nemotron": GGUFFamily("nemotron", "neox", norm_shift=1.0, layer_norm=True, q_is_hidden=True,
                           output_required=True, layer={k: v for k, v in _LLAMA_LAYER.items() if k != "mlp.gate_proj"}),
    # soft-capped attention and logits, sqrt(hidden)-scaled embeddings (in llama.cpp's graph), norms 1 + w
    "gemma2": GGUFFamily("gemma2", "neox", norm_shift=1.0, layer={**_LLAMA_LAYER, **_SANDWICH_NORMS}),
    # no pre-norms: norms after attention and after the MLP; q/k norms over the whole projections
    "olmo2": GGUFFamily("olmo2", "neox", q_is_hidden=True, layer={
        **{k: v for k, v in _LLAMA_LAYER.items() if "layernorm" not in k}, **_QK_NORMS,
        "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}),
    "granite": GGUFFamily("granite", "norm"),  # Llama's layout; its four multipliers are metadata
    "mixtral": GGUFFamily("llama", "norm", layer=dict(_MOE_BASE)),  # llama.cpp runs Mixtral as llama + experts
    "qwen2_moe": GGUFFamily("qwen2moe", "neox", q_is_hidden=True, layer={**_MOE_BASE, **_SHARED_EXPERT}),  # biases
    "qwen3_moe": GGUFFamily("qwen3moe", "neox", layer={**_MOE_BASE, **_QK_NORMS}),
    "olmoe": GGUFFamily("olmoe", "neox", layer={**_MOE_BASE, **_QK_NORMS}),  # q/k norms over whole projections
    # no RoPE anywhere; nemotron_h with MoE layers is written as nemotron_h_moe (resolve_family)
    "mamba2": GGUFFamily("mamba2", "none", layer={}, params=_MAMBA_PARAMS, layers="backbone.layers", top={
        "backbone.embeddings.weight": "token_embd.weight", "backbone.norm_f.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}),
    "nemotron_h": GGUFFamily("nemotron_h", "none", layer={}, params=_NEMOTRON_H_PARAMS, top={
        "model.embeddings.weight": "token_embd.weight", "model.norm_f.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}),
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _rope_params(config, kind: str = "full_attention") -> dict:
    """config.rope_parameters of one attention kind (transformers 5; older configs: rope_theta/rope_scaling)."""
    rp = getattr(config, "rope_parameters", None) or {}
    if kind in rp:
        rp = rp[kind]
    elif "full_attention" in rp or "sliding_attention" in rp:
        rp = rp.get("full_attention", {})
    rp = dict(rp or {})
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    rp.setdefault("rope_type", "default")
    return rp


def _rotary_dims(config) -> int:
    factor = getattr(config, "partial_rotary_factor", None) or _rope_params(config).get("partial_rotary_factor", 1.0)
    return int(A.head_dim_of(config) * float(factor))


def resolve_family(config) -> tuple[str, GGUFFamily]:
    """(family, its GGUFFamily as written): a family whose llama.cpp graph needs heads * head_dim == hidden
    is written as `llama` when pruning broke that; raises GGUFExportError when nothing fits."""
    family = config.model_type
    if family not in GGUF_FAMILIES:
        raise GGUFExportError(
            f"GGUF export does not write model_type {family!r} (no llama.cpp architecture mapped for it here): it "
            f"writes {', '.join(sorted(GGUF_FAMILIES))}. Keep the Hugging Face export (load it with transformers), "
            "or add the family to GGUF_FAMILIES in minitron/export_gguf.py if llama.cpp has a graph for it.")
    fam = GGUF_FAMILIES[family]
    if family == "nemotron_h" and "moe" in A.layer_kinds(config):
        return family, replace(fam, arch="nemotron_h_moe")
    if not fam.q_is_hidden:
        return family, fam
    q_width = config.num_attention_heads * A.head_dim_of(config)
    if q_width != config.hidden_size:
        why = (f"llama.cpp's {fam.arch} graph assumes heads * head_dim == hidden, but this {family} model has "
               f"{config.num_attention_heads} x {A.head_dim_of(config)} = {q_width} != hidden {config.hidden_size}")
        if not fam.as_llama_if_not:
            raise GGUFExportError(f"{why}. Prune it with --hidden {q_width} (or keep hidden and heads together), "
                                  "or use the Hugging Face export.")
        if family == "phi3" and (_rotary_dims(config) != A.head_dim_of(config)
                                 or _rope_params(config)["rope_type"] not in ("default", "linear")):
            raise GGUFExportError(f"{why}, and its partial or long-context rotary embedding has no llama-architecture "
                                  f"equivalent. Prune it with --hidden {q_width}, or use the Hugging Face export.")
        return family, GGUFFamily("llama", "norm", layer={**_LLAMA_LAYER, "self_attn.qkv_proj": "attn_qkv",
                                                          "mlp.gate_up_proj": "ffn_gate_up"})
    return family, fam


# ---- tensors ------------------------------------------------------------------------------------------------

def permute_rope_rows(w: torch.Tensor, n_head: int, rot: int) -> torch.Tensor:
    """HF rotate_half layout -> llama.cpp interleaved pairs, for the rows of q_proj/k_proj (weight
    [n_head * head_dim, in] or bias [n_head * head_dim]): in each head the first `rot` rows
    [x_0..x_{r/2-1}, y_0..y_{r/2-1}] become [x_0, y_0, x_1, y_1, ...]; rows past `rot` are kept."""
    shape = w.shape
    w = w.reshape(n_head, shape[0] // n_head, -1)                        # [H, D, in]
    rotary = w[:, :rot].reshape(n_head, 2, rot // 2, -1).transpose(1, 2)  # [H, r/2, 2, in]
    return torch.cat([rotary.reshape(n_head, rot, -1), w[:, rot:]], dim=1).reshape(shape)


def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every weight of the model, renamed and transformed for llama.cpp.

    Weights keep PyTorch's [out, in]; fused Phi-3 qkv/gate_up are split when written as llama; tied
    lm_head is left out (llama.cpp reuses token_embd) unless the family's graph requires output.weight."""
    config = model.config
    _, fam = resolve_family(config)
    if fam.params is not None:
        return ssm_tensors(model, fam)
    hd, rot = A.head_dim_of(config), _rotary_dims(config)
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = bool(config.tie_word_embeddings)
    out: list[tuple[str, torch.Tensor]] = []
    state = model.state_dict()
    for name, t in state.items():
        t = t.detach().float().cpu()
        base, _, suffix = name.rpartition(".")                # e.g. model.layers.3.self_attn.q_proj / weight
        if base.endswith(".mlp.experts"):                     # fused experts are parameters without .weight
            base, suffix = name, "weight"
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
        if m:
            part = m.group(2)
            if part not in fam.layer:
                raise GGUFExportError(f"tensor {name} has no GGUF name for llama.cpp's {fam.arch}; the model has "
                                      "parts its family table in minitron/export_gguf.py does not know")
            prefix = f"blk.{m.group(1)}."
            if fam.arch == "llama" and part == "self_attn.qkv_proj":   # Phi-3 as llama: [q; k; v] rows
                pieces = zip(("attn_q", "attn_k", "attn_v"), t.split([heads * hd, kv * hd, kv * hd]), strict=True)
            elif fam.arch == "llama" and part == "mlp.gate_up_proj":    # [gate; up] rows
                pieces = zip(("ffn_gate", "ffn_up"), t.chunk(2, dim=0), strict=True)
            elif isinstance(fam.layer[part], tuple):                  # experts [E, 2F, C] -> [E, F, C] x 2
                pieces = zip(fam.layer[part], t.chunk(len(fam.layer[part]), dim=-2), strict=True)
            else:
                pieces = [(fam.layer[part], t)]
            for gname, p in pieces:
                if fam.rope == "norm" and gname in ("attn_q", "attn_k"):
                    p = permute_rope_rows(p, heads if gname == "attn_q" else kv, rot)
                if "norm" in gname and suffix == "weight":
                    p = p + fam.norm_shift
                if gname == "ffn_gate_inp_shexp":
                    p = p.reshape(-1)                                  # [1, C] -> [C], as llama.cpp loads it
                out.append((f"{prefix}{gname}.{suffix}", p.contiguous()))
        elif base in _GLOBAL:
            if base == "lm_head" and tied and not fam.output_required:
                continue
            if base == "model.norm" and suffix == "weight":
                t = t + fam.norm_shift
            out.append((f"{_GLOBAL[base]}.{suffix}", t.contiguous()))
        else:
            raise GGUFExportError(f"tensor {name} has no GGUF name for llama.cpp's {fam.arch}")
    if fam.output_required and tied and "lm_head.weight" not in state:
        out.append(("output.weight", state["model.embed_tokens.weight"].float().cpu()))
    extra = _rope_factor_tensors(config, fam)
    return out + extra


def ssm_tensors(model, fam: GGUFFamily) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) of a Mamba2 or NemotronH model: each parameter under its name in fam.params /
    fam.top, transformed as llama.cpp loads it (_ssm_transform); a convolution without bias (use_conv_bias false)
    gets a zero bias, which llama.cpp's graph always adds; a tied lm_head is left out (llama.cpp reuses
    token_embd)."""
    config = model.config
    groups = getattr(config, A.get_arch(config).mamba.groups_key)
    state = model.state_dict()
    in_layer = re.compile(rf"{re.escape(fam.layers)}\.(\d+)\.(.+)")
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in state.items():
        t = t.detach().float().cpu()
        m = in_layer.fullmatch(name)
        if m is None:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if name not in fam.top:
                raise GGUFExportError(f"tensor {name} has no GGUF name for llama.cpp's {fam.arch}")
            out.append((fam.top[name], t.contiguous()))
            continue
        i, part = m.groups()
        if part not in fam.params:
            raise GGUFExportError(f"tensor {name} has no GGUF name for llama.cpp's {fam.arch}; the model has parts "
                                  "its family table in minitron/export_gguf.py does not know")
        gname = fam.params[part]
        out.append((f"blk.{i}.{gname}", _ssm_transform(gname, t, groups).contiguous()))
        if part == "mixer.conv1d.weight" and f"{fam.layers}.{i}.mixer.conv1d.bias" not in state:
            out.append((f"blk.{i}.ssm_conv1d.bias", torch.zeros(t.shape[0])))
    return out


def _ssm_transform(gname: str, t: torch.Tensor, groups: int) -> torch.Tensor:
    """A Mamba2 parameter as llama.cpp's graph reads it (convert_hf_to_gguf's Mamba2 transforms)."""
    if gname == "ssm_a":
        return -torch.exp(t).reshape(-1, 1)   # A = -exp(A_log): [H] -> [H, 1]
    if gname == "ssm_d":
        return t.reshape(-1, 1)               # [H] -> [H, 1]
    if gname == "ssm_conv1d.weight":
        return t.squeeze(1)                   # depthwise [I + 2GN, 1, K] -> [I + 2GN, K]
    if gname == "ssm_norm.weight":
        return t.reshape(groups, -1)          # gated norm over G groups: [I] -> [G, I/G]
    return t


def _llama3_rope_freqs(config, rp: dict) -> torch.Tensor:
    """Llama-3.1 rope scaling as llama.cpp takes it: per-frequency divisors [rot/2] in rope_freqs.weight."""
    rot, base = _rotary_dims(config), rp.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old / hi, 1.0, torch.where(wavelen > old / lo, factor, mid)).float()


def _rope_factor_tensors(config, fam: GGUFFamily) -> list[tuple[str, torch.Tensor]]:
    rp = _rope_params(config)
    if rp["rope_type"] == "llama3" and fam.arch == "llama":
        return [("rope_freqs.weight", _llama3_rope_freqs(config, rp))]
    if rp["rope_type"] in ("longrope", "su") and fam.arch == "phi3":
        return [("rope_factors_long.weight", torch.tensor(rp["long_factor"], dtype=torch.float32)),
                ("rope_factors_short.weight", torch.tensor(rp["short_factor"], dtype=torch.float32))]
    return []


# ---- metadata -----------------------------------------------------------------------------------------------

def write_hparams(w, config, fam: GGUFFamily) -> None:
    """The {arch}.* keys llama.cpp reads: sizes, explicit head_dim (key/value_length: a pruned model's head_dim
    need not be hidden / heads), rotary settings, norm epsilon, Gemma3's sliding-window layers, Gemma2's
    soft-caps, Granite's multipliers, and the expert counts and widths of MoE families; Mamba2 / NemotronH:
    _write_ssm_hparams."""
    if fam.params is not None:
        _write_ssm_hparams(w, config, fam)
        return
    hd = A.head_dim_of(config)
    w.add_context_length(int(getattr(config, "max_position_embeddings", None) or 2048))
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(_rotary_dims(config))
    rp = _rope_params(config)
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "norm_eps", None) or 1e-5
    (w.add_layer_norm_eps if fam.layer_norm else w.add_layer_norm_rms_eps)(float(eps))
    _write_rope_scaling(w, config, fam, rp)
    if fam.arch == "gemma3":
        if getattr(config, "sliding_window", None):
            w.add_sliding_window(int(config.sliding_window))
            types = getattr(config, "layer_types", None)
            if types:  # else llama.cpp's default: every 6th layer full attention, as transformers' default
                w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            w.add_rope_freq_base_swa(float(_rope_params(config, "sliding_attention").get("rope_theta", 10000.0)))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if fam.arch == "phi3":
        w.add_sliding_window(0)  # llama.cpp's phi3 graph runs full attention
        orig = rp.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
    if fam.arch == "gemma2":
        _write_gemma2_keys(w, config)
    if fam.arch == "granite":
        _write_granite_keys(w, config)
    if A.get_arch(config).moe is not None:
        _write_moe_keys(w, config)


def _write_ssm_hparams(w, config, fam: GGUFFamily) -> None:
    """Mamba2 and NemotronH: the ssm.* keys (conv kernel, inner width H x P, state size, time_step_rank = the number
    of heads, group count), RMS epsilon, a context length of 2^20 (no positions: no RoPE), and for NemotronH the
    per-layer arrays that tell llama.cpp each layer's kind (_write_nemotron_h_layers)."""
    mamba = A.get_arch(config).mamba
    heads, head_dim = getattr(config, mamba.heads_key), getattr(config, mamba.head_dim_key)
    w.add_context_length(2**20)                       # as llama.cpp's converter: no position limit
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(len(A.layer_kinds(config)))
    w.add_vocab_size(config.vocab_size)
    w.add_ssm_conv_kernel(int(config.conv_kernel))
    w.add_ssm_inner_size(heads * head_dim)
    w.add_ssm_state_size(int(getattr(config, mamba.state_key)))
    w.add_ssm_time_step_rank(heads)                   # llama.cpp's name for the number of Mamba heads
    w.add_ssm_group_count(int(getattr(config, mamba.groups_key)))
    w.add_layer_norm_rms_eps(float(config.layer_norm_epsilon))
    if fam.arch == "mamba2":
        w.add_feed_forward_length(0)                  # no MLP, no attention: llama.cpp reads zeros
        w.add_head_count(0)
    else:
        _write_nemotron_h_layers(w, config)


def _write_nemotron_h_layers(w, config) -> None:
    """NemotronH's layer kinds as llama.cpp reads them: a layer is Mamba when its head_count_kv and
    feed_forward_length are both 0, attention when only feed_forward_length is 0, else MLP (or MoE). head_count
    stays one number (llama.cpp takes the attention head size from it), the others are per-layer arrays; MoE:
    expert counts, widths, the shared expert, top-k renormalization and scale, the latent size."""
    kinds = A.layer_kinds(config)
    kv = config.num_key_value_heads or config.num_attention_heads
    moe = "moe" in kinds
    ffn = config.moe_intermediate_size if moe else config.intermediate_size  # _check_ssm: not both kinds
    w.add_layer_norm_eps(float(config.layer_norm_epsilon))  # a key llama.cpp's nemotron_h requires
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([kv if k == "full_attention" else 0 for k in kinds])
    w.add_key_length(A.head_dim_of(config))
    w.add_value_length(A.head_dim_of(config))
    w.add_feed_forward_length([ffn if k in ("mlp", "moe") else 0 for k in kinds])
    if moe:
        w.add_expert_count(config.n_routed_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.moe_shared_expert_intermediate_size)
        w.add_expert_shared_count(getattr(config, "n_shared_experts", 1) or 1)
        w.add_expert_weights_norm(bool(config.norm_topk_prob))
        w.add_expert_weights_scale(float(config.routed_scaling_factor))
        if getattr(config, "moe_latent_size", None):
            w.add_moe_latent_size(int(config.moe_latent_size))


def _write_gemma2_keys(w, config) -> None:
    """Gemma2: attention and final logit soft-caps, and the sliding window (llama.cpp's gemma2 graph slides on
    the even layers, as transformers' default layer_types; check_config refuses any other pattern)."""
    w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    w.add_sliding_window(int(config.sliding_window))


def _write_granite_keys(w, config) -> None:
    """Granite's four multipliers under llama.cpp's names: embeddings times embedding_scale, each block's
    output times residual_scale, attention scores times attention.scale (in place of 1/sqrt(head_dim)),
    logits divided by logit_scale."""
    w.add_embedding_scale(float(config.embedding_multiplier))
    w.add_residual_scale(float(config.residual_multiplier))
    w.add_attention_scale(float(config.attention_multiplier))
    w.add_logit_scale(float(config.logits_scaling))


def _write_moe_keys(w, config) -> None:
    """expert_count, expert_used_count (top-k), expert_feed_forward_length (each expert's width), the shared
    expert's width, and whether the top-k routing weights are renormalized (norm_topk_prob) where the family
    has that switch."""
    d = A.dims_of(config)
    w.add_expert_count(d.experts)
    w.add_expert_used_count(d.top_k)
    w.add_expert_feed_forward_length(d.ffn)
    if d.shared_ffn:
        w.add_expert_shared_feed_forward_length(d.shared_ffn)
    if getattr(config, "norm_topk_prob", None) is not None:
        w.add_expert_weights_norm(bool(config.norm_topk_prob))


def _write_rope_scaling(w, config, fam: GGUFFamily, rp: dict) -> None:
    from gguf import RopeScalingType

    kind = rp["rope_type"]
    if kind == "default" or (kind == "llama3" and fam.arch == "llama"):
        return
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif kind in ("longrope", "su") and fam.arch == "phi3":
        scale = config.max_position_embeddings / rp["original_max_position_embeddings"]
        orig = rp["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
    else:
        raise GGUFExportError(f"rope_type {kind!r} of this {config.model_type} model has no llama.cpp {fam.arch} "
                              "equivalent here; use the Hugging Face export")


def check_config(config) -> None:
    """Refuse, before any work, a config llama.cpp would run differently from transformers."""
    family, fam = resolve_family(config)
    if family in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise GGUFExportError(f"this {family} model uses sliding-window attention, which llama.cpp's {fam.arch} "
                              "graph does not implement; use the Hugging Face export")
    if family == "gemma3_text":
        scalar = getattr(config, "query_pre_attn_scalar", None) or A.head_dim_of(config)
        cpp = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else A.head_dim_of(config)
        if abs(scalar - cpp) > 1e-6:
            raise GGUFExportError(f"llama.cpp's gemma3 graph scales attention by 1/sqrt({cpp:g}), this model by "
                                  f"1/sqrt(query_pre_attn_scalar={scalar:g}); use the Hugging Face export")
    if getattr(config, "attn_logit_softcapping", None) and fam.arch != "gemma2":
        raise GGUFExportError("attention logit soft-capping is not in llama.cpp's graph for this family")
    if family == "gemma2":
        _check_gemma2(config)
    if A.get_arch(config).moe is not None:
        _check_moe(config, family, fam)
    if fam.params is not None:
        _check_ssm(config, family)
        return
    _write_rope_scaling(_NullWriter(), config, fam, _rope_params(config))


def _check_ssm(config, family: str) -> None:
    """Refuse Mamba2 / NemotronH configs llama.cpp's graphs would run differently: its Mamba2 mixer hard-codes a
    SiLU convolution activation, in_proj / out_proj without bias and no clamp on the time step (transformers'
    Mamba2 clamps to config.time_step_limit); NemotronH's MLP is relu^2 without bias (_check_nemotron_h_moe for
    its MoE layers)."""
    mamba2 = family == "mamba2"
    act = config.hidden_act if mamba2 else config.mamba_hidden_act
    if act != "silu":
        raise GGUFExportError(f"llama.cpp's Mamba2 mixer applies SiLU after the convolution, but this {family} model "
                              f"uses {act!r}. Use the Hugging Face export.")
    if getattr(config, "use_bias", False) or getattr(config, "mamba_proj_bias", False):
        raise GGUFExportError(f"this {family} model has in_proj / out_proj biases (use_bias), which llama.cpp's "
                              "Mamba2 mixer has no tensor for. Use the Hugging Face export.")
    if mamba2:
        low, high = (float(x) for x in config.time_step_limit)
        if low != 0.0 or high != math.inf:
            raise GGUFExportError(f"this mamba2 model clamps its time step to time_step_limit=({low:g}, {high:g}), "
                                  "which llama.cpp's Mamba2 graph does not; set time_step_limit=(0.0, inf) if the "
                                  "model never reaches the limits, or use the Hugging Face export.")
        return
    kinds = A.layer_kinds(config)
    unknown = sorted(set(kinds) - {"linear_attention", "full_attention", "mlp", "moe"})
    if unknown:
        raise GGUFExportError(f"this nemotron_h model has layer kinds {unknown} that llama.cpp's nemotron_h graph does "
                              "not run. Use the Hugging Face export.")
    if config.mlp_hidden_act != "relu2":
        raise GGUFExportError(f"llama.cpp's nemotron_h graph runs MLP and experts with relu^2, but this model uses "
                              f"{config.mlp_hidden_act!r}. Use the Hugging Face export.")
    if getattr(config, "mlp_bias", False):
        raise GGUFExportError("this nemotron_h model has MLP biases (mlp_bias), which minitron's GGUF export does not "
                              "write. Use the Hugging Face export.")
    if "moe" in kinds:
        _check_nemotron_h_moe(config, kinds)


def _check_nemotron_h_moe(config, kinds: list[str]) -> None:
    """llama.cpp's nemotron_h_moe graph runs every MLP-kind layer as MoE once the model has experts, and routes
    without expert groups: refuse dense MLP layers mixed with MoE layers, and group-limited routing."""
    dense = [i for i, k in enumerate(kinds) if k == "mlp"]
    if dense:
        raise GGUFExportError(
            f"this nemotron_h model mixes dense MLP layers {dense} with MoE layers, but llama.cpp's nemotron_h_moe "
            "graph runs every feed-forward layer of a model with experts as MoE. Drop the dense MLP layers "
            f"(--drop-layers {','.join(map(str, dense))}), or use the Hugging Face export.")
    n_group, topk_group = getattr(config, "n_group", 1) or 1, getattr(config, "topk_group", 1) or 1
    if n_group > 1 and topk_group < n_group:
        raise GGUFExportError(f"this nemotron_h model routes within expert groups (n_group={n_group}, topk_group="
                              f"{topk_group}), which llama.cpp's nemotron_h_moe graph does not. Use the Hugging "
                              "Face export.")


def _check_gemma2(config) -> None:
    """llama.cpp's gemma2 graph always soft-caps, slides the window on even layers only (transformers'
    default layer_types) and scales attention by 1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 46-layer
    27B): refuse a Gemma2 model that differs, which a pruned one can (layers dropped, heads pruned)."""
    if not config.attn_logit_softcapping or not config.final_logit_softcapping:
        raise GGUFExportError("llama.cpp's gemma2 graph always soft-caps attention and final logits; this model sets "
                              f"attn_logit_softcapping={config.attn_logit_softcapping}, final_logit_softcapping="
                              f"{config.final_logit_softcapping}. Use the Hugging Face export.")
    types = list(getattr(config, "layer_types", None) or [])
    cpp = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    if types and types != cpp:
        raise GGUFExportError(
            f"llama.cpp's gemma2 graph slides the attention window on even layers and attends fully on odd ones, but "
            f"this model's layer_types are {types} (dropping layers shifted the pattern). Drop neighbouring layers in "
            "pairs, which keeps the alternation (e.g. --drop-layers 2,3), or use the Hugging Face export.")
    scalar = config.query_pre_attn_scalar
    cpp_scalar = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 46 else A.head_dim_of(config)
    if abs(scalar - cpp_scalar) > 1e-6:
        raise GGUFExportError(f"llama.cpp's gemma2 graph scales attention by 1/sqrt({cpp_scalar:g}), this model by "
                              f"1/sqrt(query_pre_attn_scalar={scalar:g}); use the Hugging Face export")


# whether llama.cpp's graph renormalizes the top-k routing weights: fixed per architecture (the expert_weights_norm
# key is written but these graphs do not read it); transformers follows config.norm_topk_prob where it has one
_TOPK_RENORMALIZED = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}


def _check_moe(config, family: str, fam: GGUFFamily) -> None:
    """Refuse MoE configs llama.cpp would route or shape differently: a norm_topk_prob other than the one its
    graph hard-codes, and OLMoE with fewer KV heads than query heads (llama.cpp sizes its k norm as hidden)."""
    A.dims_of(config)                                    # refuses dense layers mixed among the MoE ones
    fixed = _TOPK_RENORMALIZED[fam.arch]
    norm = getattr(config, "norm_topk_prob", fixed)
    if bool(norm) != fixed:
        raise GGUFExportError(
            f"llama.cpp's {fam.arch} graph {'always' if fixed else 'never'} renormalizes the top-k routing weights, "
            f"but this {family} model has norm_topk_prob={norm}: llama.cpp would weight the experts differently. "
            "Use the Hugging Face export.")
    kv = config.num_key_value_heads or config.num_attention_heads
    if family == "olmoe" and kv != config.num_attention_heads:
        raise GGUFExportError(
            f"llama.cpp's olmoe graph has no grouped-query attention (its k norm spans hidden = {config.hidden_size} "
            f"channels), but this OLMoE model has {kv} KV heads for {config.num_attention_heads} query heads. Prune "
            "KV heads together with query heads (--kv-heads equal to --heads), or use the Hugging Face export.")


class _NullWriter:
    """Swallows add_* calls: lets check_config run the rope-scaling checks without a file."""

    def __getattr__(self, name):
        return lambda *a, **k: None


# ---- tokenizer ----------------------------------------------------------------------------------------------

_GPT2_SPLIT = None  # the ByteLevel pre-tokenizer's own regex (GPT-2's)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# a byte-level BPE pre-tokenizer (as in tokenizer.json) -> llama.cpp's tokenizer.ggml.pre that splits the same way
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
    (("Split", _QWEN2_SPLIT), "ByteLevel-noregex"): "qwen2",
    (("Split", _LLAMA3_SPLIT), "ByteLevel-noregex"): "llama-bpe",
}


def _pre_signature(pre: dict | None) -> tuple:
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else ([pre] if pre else [])
    sig = []
    for s in steps:
        if s["type"] == "ByteLevel":
            if s.get("add_prefix_space"):
                return ("ByteLevel+prefix-space",)
            sig.append("ByteLevel" if s.get("use_regex", True) else "ByteLevel-noregex")
        elif s["type"] == "Digits" and s.get("individual_digits"):
            sig.append("Digits")
        elif s["type"] == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            sig.append(("Split", s["pattern"].get("Regex")))
        else:
            sig.append(s["type"])
    return tuple(sig)


def _spm_prefix(spec: dict) -> bool | None:
    """Whether a sentencepiece-style tokenizer.json prepends '▁' (None: it does not escape spaces as '▁')."""
    norms = spec.get("normalizer") or {}
    norms = norms.get("normalizers", [norms]) if norms else []
    escapes = any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in norms)
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in norms)
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return prepend if escapes else None


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it."""

    model: str                     # "gpt2" (byte-level BPE) | "llama" (sentencepiece-style BPE with byte fallback)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Read a fast tokenizer's tokenizer.json into llama.cpp's form, padded to the model's vocab_size rows
    ([PADi] tokens, type UNUSED); raises GGUFExportError for a tokenizer llama.cpp would split differently."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise GGUFExportError("the tokenizer has no tokenizer.json (a slow, python-only tokenizer): save it as a fast "
                              "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained) first")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise GGUFExportError(f"the tokenizer is a {model['type']} model; GGUF export writes BPE tokenizers only "
                              "(byte-level like GPT-2/Llama-3/Qwen, or sentencepiece-style with byte fallback)")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise GGUFExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows: "
                              "the tokenizer does not belong to this model")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(TokenType.UNUSED)] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        if i in added:
            types[i] = int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types[i] = int(TokenType.BYTE)
        else:
            types[i] = int(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        prefix = _spm_prefix(spec)
        if prefix is None:
            raise GGUFExportError("the tokenizer falls back to bytes but does not write spaces as '▁' the way "
                                  "sentencepiece does; llama.cpp's sentencepiece tokenizer would split it differently")
        rank = {}
        for r, m in enumerate(merges):                   # a merged piece's score: minus the rank that makes it
            rank.setdefault(m.replace(" ", "", 1), r)
        scores = [-float(rank.get(t, 0)) for t in tokens]
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = int(TokenType.UNKNOWN)
        return GGUFVocab("llama", None, tokens, types, merges, scores, add_space_prefix=prefix)
    decoder = (spec.get("decoder") or {}).get("type")
    sig = _pre_signature(spec.get("pre_tokenizer"))
    if decoder != "ByteLevel" or sig not in _PRE_TOKENIZERS:
        raise GGUFExportError(
            f"llama.cpp has no pre-tokenizer matching this tokenizer's ({sig}, decoder {decoder}): it would split "
            f"text differently and the model would see other tokens. Supported: byte-level BPE with "
            f"{', '.join(sorted(set(_PRE_TOKENIZERS.values())))}-style splitting, or sentencepiece-style BPE.")
    return GGUFVocab("gpt2", _PRE_TOKENIZERS[sig], tokens, types, merges)


def write_tokenizer(w, tokenizer, vocab_size: int) -> GGUFVocab:
    """tokenizer.ggml.* keys: model, pre, tokens, token types, merges (scores for sentencepiece), special ids,
    add_bos/add_eos as the tokenizer really adds them, and the chat template."""
    v = gguf_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.merges:
        w.add_token_merges(v.merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and 0 <= tid < vocab_size:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    w.add_add_bos_token(bool(tokenizer.bos_token_id is not None and len(ids) > len(plain)
                             and ids[0] == tokenizer.bos_token_id))
    w.add_add_eos_token(bool(tokenizer.eos_token_id is not None and len(ids) > len(plain)
                             and ids[-1] == tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)
    return v


# ---- the file -----------------------------------------------------------------------------------------------

def _encode(t: torch.Tensor, qtype: str, types: dict):
    """(array, raw GGML type or None, GGML type name) of one tensor in the requested type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = t.numpy().astype(np.float32)
    if qtype == "f32" or a.ndim < 2:
        return a, None, "F32"
    target = types[qtype]
    if target == Q.F16:
        return a.astype(np.float16), None, "F16"
    block = quants.GGML_QUANT_SIZES[target][0]
    if a.shape[-1] % block:                              # rows not a whole number of blocks: f16, as convert does
        return a.astype(np.float16), None, "F16"
    return quants.quantize(a, target), target, target.name


def gguf_file_name(name: str, qtype: str) -> str:
    """`<name>-<TYPE>.gguf`, llama.cpp's naming (e.g. student-Q8_0.gguf)."""
    return f"{name}-{qtype.upper()}.gguf"


def export_gguf(model, tokenizer, path: str | os.PathLike, qtype: str = "f16", name: str | None = None) -> dict:
    """Write `model` (a transformers causal LM of a family in GGUF_FAMILIES) and its fast tokenizer to `path`.

    Returns what was written: file, type, architecture, bytes, tensor count per GGML type, seconds.
    Raises GGUFExportError (a ValueError) for a family, config, tokenizer or type llama.cpp cannot take;
    nothing is left at `path` then."""
    import gguf

    qtype = check_type(qtype)
    path = Path(path)
    config = model.config
    check_config(config)
    if qtype in LLAMA_CPP_TYPES:
        return _export_llama_cpp_quant(model, tokenizer, path, qtype, name)
    family, fam = resolve_family(config)
    start = time.time()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        label = name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
        w.add_name(label)
        w.add_type("model")
        ftype = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}[qtype]
        w.add_file_type(ftype)
        if qtype not in ("f32", "f16", "bf16"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, config, fam)
        vocab = write_tokenizer(w, tokenizer, config.vocab_size)
        counts: dict[str, int] = {}
        types, odd_rows = _numpy_types(), set()
        for gname, t in gguf_tensors(model):
            keep_f32 = gname.endswith(_ALWAYS_F32) or not gname.endswith(".weight")  # ssm_a, ssm_d, biases
            arr, raw, tname = _encode(t, "f32" if keep_f32 else qtype, types)
            w.add_tensor(gname, arr, raw_dtype=raw)
            counts[tname] = counts.get(tname, 0) + 1
            if tname == "F16" and qtype not in ("f16", "f32"):
                odd_rows.add(t.shape[-1])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if odd_rows:
        block = _numpy_types()[qtype]
        from gguf import GGML_QUANT_SIZES

        print(f"[minitron] gguf: {counts.get('F16', 0)} matrices stay f16: their rows ({sorted(odd_rows)}) are not a "
              f"multiple of the {qtype} block ({GGML_QUANT_SIZES[block][0]}), so the file is larger and slower than "
              "it could be. Prune to widths that are multiples of 32 (--hidden/--ffn, or --round-to 32) to quantize "
              "every matrix.")
    return {"file": path.name, "path": str(path), "type": qtype, "architecture": fam.arch, "family": family,
            "bytes": path.stat().st_size, "tensor_types": counts, "tokenizer": {"model": vocab.model, "pre": vocab.pre},
            "unquantized_rows": sorted(odd_rows), "seconds": round(time.time() - start, 2)}


def _export_llama_cpp_quant(model, tokenizer, path: Path, qtype: str, name: str | None) -> dict:
    """A k-quant: an f32 GGUF first, then llama.cpp's own quantizer (llama_model_quantize) through
    llama-cpp-python, which is the quantizer every published K-quant GGUF comes from."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFExportError(f"GGUF type {qtype} is quantized by llama.cpp itself: install llama-cpp-python "
                              "(pip install 'minitron[gguf-runtime]', a source build of llama.cpp), or choose "
                              f"one of {', '.join(NUMPY_TYPES)}") from e
    start = time.time()
    f32 = path.with_name(f".{path.name}.f32-{os.getpid()}.gguf")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        info = export_gguf(model, tokenizer, f32, "f32", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_CPP_TYPES[qtype]
        params.nthread = os.cpu_count() or 1
        from minitron.gguf_runtime import _quiet

        with _quiet():                                   # llama.cpp logs every tensor on stderr
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise GGUFExportError(f"llama.cpp's quantizer could not write {qtype} (return code {rc})")
        os.replace(tmp, path)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return {**info, "file": path.name, "path": str(path), "type": qtype, "bytes": path.stat().st_size,
            "tensor_types": tensor_types(path), "seconds": round(time.time() - start, 2)}


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """Tensor count per GGML type of a GGUF file (read with the gguf reader)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def export_model(model: str, qtype: str, out: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """`minitron export`: a saved model dir (or `default`, or a hub id) -> one GGUF file, loaded in fp32 on the CPU.

    out: a `.gguf` path, or a folder that gets `<name>-<TYPE>.gguf` (default: the model dir itself when it is a
    local dir, else the current dir). An existing file is refused unless overwrite."""
    from minitron.models import DEFAULT_MODEL, load_model
    from minitron.plan import source_config

    qtype = check_type(qtype)
    check_config(source_config(model))                # refuse before the weights are read
    local = Path(model).expanduser()
    name = "SmolLM2-135M-Instruct" if model == DEFAULT_MODEL else local.name if local.is_dir() else model.split("/")[-1]
    target = Path(out) if out else (local if local.is_dir() else Path("."))
    if target.suffix != ".gguf":
        target = target / gguf_file_name(name, qtype)
    if target.exists() and not overwrite:
        raise GGUFExportError(f"{target} exists: pass --overwrite to replace it, or choose another --out")
    loaded, tok = load_model(model, "cpu", "float32")
    info = export_gguf(loaded, tok, target, qtype, name=name)
    print(f"[minitron] export: {target} ({info['architecture']}, {qtype}, {info['bytes'] / 2**20:.1f} MiB, "
          f"tensors {info['tensor_types']})")
    return info
