"""Every architecture fact minitron uses, one small adapter per model family.

Stage code (importance, prune, distill, ...) reaches modules and config keys only through the
functions here; nothing else probes a model with hasattr.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Arch:
    """Where the parts of one decoder-only family live, and which optional parts it has."""

    family: str
    layers: str = "model.layers"               # ModuleList of decoder layers
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    pre_attn_norm: str = "input_layernorm"     # its output feeds q/k/v: hooked for channel importance
    pre_mlp_norm: str = "post_attention_layernorm"  # its output feeds gate/up: hooked likewise
    other_hidden_norms: tuple[str, ...] = ()   # further per-layer norms over the hidden axis (sliced only)
    head_norms: tuple[str, ...] = ()           # per-head norms over head_dim (Qwen3 q_norm/k_norm): untouched
    has_layer_types: bool = False              # config.layer_types: one entry per layer


FAMILIES: dict[str, Arch] = {
    "llama": Arch("llama"),
    "mistral": Arch("mistral"),
    "qwen2": Arch("qwen2", has_layer_types=True),   # q/k/v biases: sliced with their rows
    "qwen3": Arch("qwen3", head_norms=("q_norm", "k_norm"), has_layer_types=True),
}


class UnsupportedArchitecture(ValueError):
    """The model family has no adapter here."""


def get_arch(model_or_config) -> Arch:
    """The adapter of a model or config, by config.model_type."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    model_type = config.model_type
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}. "
            "Adding one is a new entry in minitron/arch.py.")
    return FAMILIES[model_type]


# ---- dims ---------------------------------------------------------------------------------------

@dataclass
class Dims:
    """The widths and depth minitron prunes. head_dim never changes."""

    hidden: int
    ffn: int
    heads: int        # query heads per layer
    kv_heads: int     # key/value heads (GQA groups) per layer
    layers: int
    head_dim: int
    vocab: int
    tied: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def head_dim_of(config) -> int:
    """config.head_dim when set, else hidden_size // num_attention_heads (transformers' fallback)."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def dims_of(config) -> Dims:
    """Read Dims from an HF config of a supported family."""
    get_arch(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Dims(hidden=config.hidden_size, ffn=config.intermediate_size, heads=config.num_attention_heads,
                kv_heads=kv, layers=config.num_hidden_layers, head_dim=head_dim_of(config),
                vocab=config.vocab_size, tied=bool(config.tie_word_embeddings))


def write_dims(config, dims: Dims, kept_layers: list[int] | None = None) -> None:
    """Write pruned dims into a config in place (head_dim explicitly; layer_types subset to kept layers)."""
    arch = get_arch(config)
    config.hidden_size = dims.hidden
    config.intermediate_size = dims.ffn
    config.num_attention_heads = dims.heads
    config.num_key_value_heads = dims.kv_heads
    config.head_dim = dims.head_dim
    if kept_layers is not None:
        if arch.has_layer_types and getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in kept_layers]
        if arch.family in ("qwen2", "qwen3") and getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, len(kept_layers))
    config.num_hidden_layers = dims.layers


# ---- module access ------------------------------------------------------------------------------

def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, get_arch(model).layers)


def set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    parent, _, name = get_arch(model).layers.rpartition(".")
    setattr(get_module(model, parent), name, layers)


def embedding(model: nn.Module) -> nn.Embedding:
    return get_module(model, get_arch(model).embed)


def final_norm(model: nn.Module) -> nn.Module:
    return get_module(model, get_arch(model).final_norm)


def lm_head(model: nn.Module) -> nn.Linear:
    return get_module(model, get_arch(model).lm_head)


def attention(model: nn.Module, layer: nn.Module) -> nn.Module:
    return getattr(layer, get_arch(model).attn)


def attn_projs(model: nn.Module, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """(q_proj, k_proj, v_proj, o_proj) of one decoder layer."""
    arch = get_arch(model)
    attn = getattr(layer, arch.attn)
    return (getattr(attn, arch.q_proj), getattr(attn, arch.k_proj), getattr(attn, arch.v_proj),
            getattr(attn, arch.o_proj))


def mlp_projs(model: nn.Module, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(gate_proj, up_proj, down_proj) of one decoder layer."""
    arch = get_arch(model)
    mlp = getattr(layer, arch.mlp)
    return getattr(mlp, arch.gate_proj), getattr(mlp, arch.up_proj), getattr(mlp, arch.down_proj)


def channel_norms(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(pre-attention norm, pre-MLP norm): their outputs are the hidden-channel activations hooked."""
    arch = get_arch(model)
    return getattr(layer, arch.pre_attn_norm), getattr(layer, arch.pre_mlp_norm)


def hidden_norms(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """Every per-layer norm whose weight spans the hidden axis (sliced when hidden shrinks)."""
    arch = get_arch(model)
    return [*channel_norms(model, layer), *(getattr(layer, n) for n in arch.other_hidden_norms)]


def set_layer_index(model: nn.Module, layer: nn.Module, idx: int) -> None:
    """Renumber a decoder layer after layers were dropped (its KV-cache slot).

    Each kept layer keeps its own layer type: write_dims subsets config.layer_types the same way.
    """
    attention(model, layer).layer_idx = idx


def set_module_widths(model: nn.Module, layer: nn.Module, dims: Dims) -> None:
    """Fix the width attributes that transformers modules cache at construction time."""
    layer.hidden_size = dims.hidden
    attention(model, layer).num_key_value_groups = dims.heads // dims.kv_heads
    mlp = getattr(layer, get_arch(model).mlp)
    mlp.hidden_size = dims.hidden
    mlp.intermediate_size = dims.ffn


def layer_output(output) -> torch.Tensor:
    """A decoder layer's forward output -> hidden states [B, T, C] (tuple in older transformers)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def without_layers(model: nn.Module, drop: list[int]):
    """Temporarily run the model with some decoder layers removed (use_cache=False forward only)."""
    layers = decoder_layers(model)
    config = model.config
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    set_decoder_layers(model, nn.ModuleList([layers[i] for i in keep]))
    config.num_hidden_layers = len(keep)
    if get_arch(model).has_layer_types and saved[1] is not None:
        config.layer_types = [saved[1][i] for i in keep]
    try:
        yield model
    finally:
        set_decoder_layers(model, layers)
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]
