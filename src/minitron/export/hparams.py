"""The metadata keys of a GGUF file: general.* (who the model is, write_general) and the {arch}.* keys llama.cpp
reads of the attention families, dense and MoE (Mamba2 / NemotronH: gguf_ssm._write_ssm_hparams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minitron.arch import adapters as A
from minitron.arch import layerwise
from minitron.export.families import DECI_ZERO_FFN, GGUFExportError, GGUFFamily, _rope_params, _rotary_dims
from minitron.export.ssm import _write_ssm_hparams


@dataclass(frozen=True)
class Provenance:
    """Who a model is, for the general.* keys.

    hub_id: the Hugging Face id of the very model the file holds (unchanged weights, e.g. the default teacher
        HuggingFaceTB/SmolLM2-135M-Instruct): named after it, as llama.cpp names a model from its id.
    base_model: the hub id of the model it was made from (its model card's base_model): general.base_model.0.*.
    minitron: made by minitron from base_model (pruned, distilled): named "<base model's name> Minitron <size>".
    name: general.name when none of the above says (e.g. the model dir's name, as llama.cpp falls back to)."""

    hub_id: str | None = None
    base_model: str | None = None
    minitron: bool = False
    name: str | None = None


def write_general(w, prov: Provenance | None, file_type: int) -> dict:
    """general.* keys as llama.cpp's convert_hf_to_gguf.py writes them (gguf.Metadata's heuristics on the hub ids):
    name, organization / basename / finetune (of a model that is its hub id), size_label (gguf.size_label of the
    tensors already added to `w`, e.g. "70M", "4x35M" for MoE), base_model.count / .0.name / .0.organization /
    .0.repo_url, file_type and quantization_version (every type, as the converter writes it). Call it after the
    tensors are added. Returns {key: value} of the naming keys written."""
    import gguf
    from gguf.metadata import Metadata

    prov = prov or Provenance()
    total, shared, expert, n_expert = w.get_total_parameter_count()
    card = {"base_model": prov.base_model} if prov.base_model else None
    meta = Metadata.apply_metadata_heuristic(Metadata(), card, {"_name_or_path": prov.hub_id} if prov.hub_id else None,
                                             None, total)
    meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, n_expert)
    if prov.hub_id is None and prov.minitron and meta.base_models and "name" in meta.base_models[0]:
        meta.name = f"{meta.base_models[0]['name']} Minitron {meta.size_label}"
    meta.name = meta.name or prov.name or "model"
    meta.set_gguf_meta_model(w)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return {k: v for k, v in (("name", meta.name), ("size_label", meta.size_label), ("base_model", prov.base_model))
            if v}


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
    if fam.arch == "deci":  # one entry per layer (minitron.arch.layerwise); see families.DECI_ZERO_FFN
        widths = layerwise.layer_widths(config)
        w.add_feed_forward_length([x.ffn or (DECI_ZERO_FFN if x.heads else 0) for x in widths])
        w.add_head_count([x.heads for x in widths])
        w.add_head_count_kv([x.kv_heads for x in widths])
    else:
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

