"""The two Hugging Face layouts of a per-layer student (minitron.arch.layerwise) besides its own dir:

- `padded`: the source family's stock format, every layer zero-padded to the widest layer's widths, which any
  `AutoModelForCausalLM.from_pretrained` loads with exactly the same logits. It saves no memory and no compute.
- `nemotron-nas`: NVIDIA's DeciLM layout (`model_type: nemotron-nas`, `DeciLMForCausalLM`, one `block_configs` entry
  per layer: attention `n_heads_in_group` / `no_op`, ffn `ffn_mult` / `intermediate_size` / `no_op`), which vLLM
  loads natively (transformers only with NVIDIA's remote code, which auto_map names). The weights keep the Llama
  names; a no-op part has no weights and no norm, as vLLM builds it. vLLM's rules (read from
  vllm/model_executor/models/nemotron_nas.py): every attention layer has config.num_attention_heads query heads and
  num_attention_heads // n_heads_in_group KV heads; a layer's MLP width is int(2 * ffn_mult * hidden / 3) rounded
  up to a multiple of 256; attention biases by `attention_bias` (all four) or `qkv_bias` (q, k, v).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minitron.arch import adapters as A
from minitron.arch import layerwise
from minitron.arch.files import atomic_dir
from minitron.arch.models import save_model

VLLM_FFN_MULTIPLE = 256  # vLLM's _ffn_mult_to_intermediate_size rounds widths up to this
# NVIDIA's DeciLM config and modeling code, for transformers (vLLM reads the config through it too)
DECI_REMOTE = "nvidia/Llama-3_3-Nemotron-Super-49B-v1"


class PerLayerExportError(ValueError):
    """A per-layer model that a layout cannot hold; the message names what to use instead."""


def write_padded(model, tokenizer, out: Path) -> Path:
    """A stock HF dir of `model` zero-padded to uniform widths (layerwise.pad_to_uniform), written atomically."""
    padded = layerwise.pad_to_uniform(model)
    with atomic_dir(Path(out)) as tmp:
        padded.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def check_nemotron_nas(config) -> None:
    """Refuse, before any weight is written, a model vLLM's nemotron-nas loader would build differently."""
    family = A.get_arch(config).family
    if family not in layerwise.PER_LAYER_FAMILIES:
        raise PerLayerExportError(f"nemotron-nas holds Llama-math models ({', '.join(layerwise.PER_LAYER_FAMILIES)}), "
                                  f"not {family}; use the Hugging Face or GGUF export")
    window = getattr(config, "sliding_window", None) if family == "mistral" or getattr(
        config, "use_sliding_window", False) else None
    if window and window < config.max_position_embeddings:  # a window as long as the context changes nothing
        raise PerLayerExportError(f"this {family} model uses sliding-window attention ({window} of "
                                  f"{config.max_position_embeddings} positions), which vLLM's nemotron-nas does not; "
                                  "use the Hugging Face export")
    widths = layerwise.layer_widths(config)
    heads = {w.heads for w in widths if w.heads}
    if len(heads) > 1:
        raise PerLayerExportError(
            f"vLLM's nemotron-nas gives every attention layer the same query heads (config.num_attention_heads), but "
            f"this model's layers keep {sorted(heads)}: per-layer KV groups (layer_widths: [kv_heads]) change the query "
            "heads with them. Use the GGUF (llama.cpp deci) or Hugging Face export, or prune with layer_widths: [ffn].")
    if not widths[0].heads:
        raise PerLayerExportError("vLLM's nemotron-nas needs attention in layer 0; use the GGUF or Hugging Face export")
    odd = sorted({w.ffn for w in widths if w.ffn % VLLM_FFN_MULTIPLE})
    if odd:
        raise PerLayerExportError(
            f"vLLM's nemotron-nas rounds every MLP width up to a multiple of {VLLM_FFN_MULTIPLE}, and this model has "
            f"widths {odd[:6]}: prune with target.round_to={VLLM_FFN_MULTIPLE} (whole blocks of 256 neurons), or use "
            "the GGUF or Hugging Face export")


def nemotron_nas_config(config) -> dict:
    """config.json of the nemotron-nas layout: the source's keys, less the widths that block_configs now give."""
    widths = layerwise.layer_widths(config)
    heads = next(w.heads for w in widths if w.heads)
    d = layerwise.config_json(config) if layerwise.is_per_layer(config) else config.to_dict()
    for key in ("per_layer_config", "intermediate_size", "num_key_value_heads", "layer_types", "use_sliding_window",
                "max_window_layers", "sliding_window"):
        d.pop(key, None)
    bias = A.get_arch(config).family == "qwen2"  # q/k/v biases, none on o_proj
    blocks = []
    for w in widths:
        attention = ({"no_op": True, "replace_with_linear": False, "n_heads_in_group": None} if not w.heads else
                     {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // w.kv_heads})
        # ffn_mult such that int(2 * ffn_mult * hidden / 3) == width (vLLM's rule; width a multiple of 256)
        ffn = ({"no_op": True, "replace_with_linear": False, "ffn_mult": None} if not w.ffn else
               {"no_op": False, "replace_with_linear": False, "intermediate_size": w.ffn,
                "ffn_mult": (w.ffn + 0.5) * 3 / (2 * config.hidden_size)})
        blocks.append({"attention": attention, "ffn": ffn})
    d.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], num_attention_heads=heads,
             head_dim=A.head_dim_of(config), block_configs=blocks, hidden_act="silu",
             attention_bias=False, mlp_bias=False, **({"qkv_bias": True} if bias else {}),
             auto_map={"AutoConfig": f"{DECI_REMOTE}--configuration_decilm.DeciLMConfig",
                       "AutoModelForCausalLM": f"{DECI_REMOTE}--modeling_decilm.DeciLMForCausalLM"})
    return d


@torch.no_grad()
def write_nemotron_nas(model, tokenizer, out: Path) -> Path:
    """The nemotron-nas dir of a per-layer (or uniform) Llama-math model, written atomically."""
    check_nemotron_nas(model.config)
    with atomic_dir(Path(out)) as tmp:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(nemotron_nas_config(model.config), indent=2) + "\n")
    return Path(out)


def export_layouts(model: str, padded: str | None, nemotron_nas: str | None, overwrite: bool = False) -> None:
    """`minitron export --padded DIR / --nemotron-nas DIR`: a saved model in those layouts (refusals first)."""
    from minitron.arch.models import load_config, load_model

    config = load_config(model)
    if nemotron_nas:
        check_nemotron_nas(config)
    for out in (padded, nemotron_nas):
        if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())) and not overwrite:
            raise PerLayerExportError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    loaded, tok = load_model(model, "cpu", "float32")
    if padded:
        write_padded(loaded, tok, Path(padded))
        print(f"[minitron] export: {padded} (stock {config.model_type} layout, zero-padded to the widest layer)")
    if nemotron_nas:
        write_nemotron_nas(loaded, tok, Path(nemotron_nas))
        print(f"[minitron] export: {nemotron_nas} (nemotron-nas / DeciLMForCausalLM, for vLLM)")
