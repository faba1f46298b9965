"""What llama.cpp expects of each family GGUF export writes: one table, `GGUF_FAMILIES`, of its llama.cpp
architecture, how its rotary embedding is laid out, the GGUF name of every tensor (a map per layer part; Mamba2 and
NemotronH: a map per parameter) and the quirks; resolve_family picks the entry a (pruned) config is written as.
llama.cpp's `convert_hf_to_gguf.py` is the reference for names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from minitron.arch import adapters as A
from minitron.arch import layerwise
from minitron.arch.gguf_tokenizer import GGUFExportError  # noqa: F401 (raised by every export module)

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
# per-layer widths (minitron.arch.layerwise): llama.cpp's deci reads feed_forward_length / head_count / head_count_kv
# per layer (0 heads: no attention, no attn_norm; q/k permuted as llama's); a layer with attention and no MLP gets a
# zero MLP of DECI_ZERO_FFN neurons, because deci's graph drops the attention output of a layer whose n_ff is 0
DECI = GGUFFamily("deci", "norm")
DECI_ZERO_FFN = 32
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
            "or add the family to GGUF_FAMILIES in minitron/export/families.py if llama.cpp has a graph for it.")
    fam = GGUF_FAMILIES[family]
    if layerwise.is_per_layer(config):  # each layer its own widths: llama.cpp's deci graph (Llama math per layer)
        try:
            layerwise.check_family(config)
        except A.UnsupportedArchitecture as e:
            raise GGUFExportError(str(e)) from e
        return family, DECI
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
