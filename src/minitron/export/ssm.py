"""GGUF export of Mamba2 and NemotronH (hybrid Mamba2 / attention / MLP / MoE layers): each parameter under its
llama.cpp ssm_* name (A = -exp(A_log), reshapes), the ssm.* keys and NemotronH's per-layer kinds, and the refusals
where llama.cpp's mamba2 / nemotron_h graphs run a config differently from transformers.
"""

from __future__ import annotations

import math
import re

import torch

from minitron.arch import adapters as A
from minitron.export.families import GGUFExportError, GGUFFamily

# ---- tensors ------------------------------------------------------------------------------------------------

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
                                  "its family table in minitron/export/families.py does not know")
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


# ---- metadata -----------------------------------------------------------------------------------------------

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


# ---- refusals -----------------------------------------------------------------------------------------------

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

