"""The {arch}.* metadata keys llama.cpp reads of the attention families, dense and MoE (Mamba2 / NemotronH:
gguf_ssm._write_ssm_hparams).
"""

from __future__ import annotations

import math

from minitron import arch as A
from minitron.gguf_families import GGUFExportError, GGUFFamily, _rope_params, _rotary_dims
from minitron.gguf_ssm import _write_ssm_hparams


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

