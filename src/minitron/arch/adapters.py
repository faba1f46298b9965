"""Every architecture fact minitron uses, one small adapter per model family.

Stage code (importance, prune, distill, ...) reaches modules and config keys only through the
functions here; nothing else probes a model with hasattr.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

# A projection's output rows are a concatenation of segments: "q" (query heads x head_dim),
# "kv" (KV heads x head_dim) or "ffn" (MLP neurons). Split projections have one segment each; fused
# ones (Phi-3 qkv_proj, gate_up_proj) list theirs in order.
Segments = tuple[str, ...]
LLAMA_ATTN_IN: tuple[tuple[str, Segments], ...] = (("q_proj", ("q",)), ("k_proj", ("kv",)), ("v_proj", ("kv",)))
GATED_MLP_IN: tuple[tuple[str, Segments], ...] = (("gate_proj", ("ffn",)), ("up_proj", ("ffn",)))


@dataclass(frozen=True)
class MoeArch:
    """A sparse MoE block in place of the MLP (transformers 5 layout, see minitron.arch.moe): a top-k router
    `router.weight` [E, C] and fused experts `experts.gate_up_proj` [E, 2F, C] (gate rows then up rows) and
    `experts.down_proj` [E, C, F]; optionally a shared expert (a gated MLP of its own width) whose output is
    scaled by sigmoid(shared_gate(x)), shared_gate a Linear [1, C]."""

    n_experts_key: str = "num_experts"           # config key of E
    width_key: str = "moe_intermediate_size"     # config key of each expert's width F (Dims.ffn)
    top_k_key: str = "num_experts_per_tok"
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None                    # Qwen2-MoE: "shared_expert"
    shared_gate: str | None = None               # Qwen2-MoE: "shared_expert_gate"
    shared_width_key: str | None = None          # Qwen2-MoE: "shared_expert_intermediate_size"


@dataclass(frozen=True)
class MambaArch:
    """A Mamba2 mixer (transformers 5 layout, see minitron.arch.mamba). With H heads of dim P (I = H*P inner
    channels), G groups and state size N: in_proj [I + (I + 2GN) + H, C] emits the segments
    [z (I) | x (I) | B (GN) | C (GN) | dt (H)]; conv1d (depthwise, weight [I + 2GN, 1, K]) runs over
    [x | B | C]; A_log, D, dt_bias [H]; a gated RMSNorm (weight [I]) over G contiguous groups of I/G channels;
    out_proj [C, I]. Head h reads B/C group h // (H/G)."""

    heads_key: str = "mamba_num_heads"
    head_dim_key: str = "mamba_head_dim"
    groups_key: str = "n_groups"
    state_key: str = "ssm_state_size"
    in_proj: str = "in_proj"
    conv1d: str = "conv1d"
    out_proj: str = "out_proj"
    norm: str = "norm"                         # the gated group RMSNorm over the inner channels
    per_head: tuple[str, ...] = ("A_log", "D", "dt_bias")  # parameters [H]
    # Mamba2: config.expand (an integer) ties the inner width to hidden: hidden * expand == heads * head_dim
    expand_key: str | None = None


@dataclass(frozen=True)
class HybridMoeArch:
    """A hybrid family's MoE mixer, pruned along hidden (and dropped by depth) only (NemotronH): non-gated experts
    `experts.up_proj` [E, F, C'] and `experts.down_proj` [E, C', F], a sigmoid router `gate.weight` [E, C], a shared
    expert (`shared_experts.up_proj` / `down_proj` Linears) and, where config.<latent_key> is set, latent
    projections `fc1_latent_proj` [C', C] / `fc2_latent_proj` [C, C'] around the experts (C' = the latent size,
    else C)."""

    experts: str = "experts"
    router: str = "gate"
    shared: str = "shared_experts"
    latent_key: str = "moe_latent_size"
    latent_in: str = "fc1_latent_proj"
    latent_out: str = "fc2_latent_proj"


@dataclass(frozen=True)
class HybridArch:
    """Layers of one kind each (NemotronH): config.<types_key> names each layer's kind, the layer holds a
    pre-norm `norm` over the hidden axis and one mixer `mixer` of that kind (residual around both)."""

    types_key: str | None = "layers_block_type"  # None: every layer is of kind single_kind (Mamba2)
    single_kind: str | None = None
    mixer: str = "mixer"
    norm: str = "norm"
    moe: HybridMoeArch = HybridMoeArch()
    # the config's name of each kind -> the parts minitron prunes in such a layer
    kinds: tuple[tuple[str, str], ...] = (("linear_attention", "mamba"), ("full_attention", "attn"),
                                          ("mlp", "mlp"), ("moe", "moe"))
    # transformers' hybrid cache counts the sequence on attention layers: without one the model cannot generate
    # with the cache, so depth pruning must keep at least one "full_attention" layer
    keeps_attention: str | None = "full_attention"
    # the kinds whose layers hold a cache; transformers (5.2x) reads the cached length from the first layer, so a
    # model whose first layer is of another kind (an MLP / MoE layer) cannot generate with its cache
    cache_kinds: tuple[str, ...] = ("linear_attention", "full_attention")
    # the short names a user may give for a kind (Target.depth_types) -> the config's name
    aliases: tuple[tuple[str, str], ...] = (("mamba", "linear_attention"), ("M", "linear_attention"),
                                            ("attention", "full_attention"), ("*", "full_attention"),
                                            ("-", "mlp"), ("E", "moe"))


@dataclass(frozen=True)
class Arch:
    """Where the parts of one decoder-only family live, and which optional parts it has."""

    family: str
    layers: str = "model.layers"               # ModuleList of decoder layers
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    attn_in: tuple[tuple[str, Segments], ...] = LLAMA_ATTN_IN  # projections reading the hidden states
    o_proj: str = "o_proj"                     # its input (all heads) is hooked for head importance
    mlp: str = "mlp"
    mlp_in: tuple[tuple[str, Segments], ...] = GATED_MLP_IN
    down_proj: str = "down_proj"               # its input (all neurons) is hooked for neuron importance
    # its output feeds q/k/v: hooked for channel importance. None: no pre-norm (OLMo2 normalizes after
    # attention and MLP), the attention's input (the residual stream) is hooked instead
    pre_attn_norm: str | None = "input_layernorm"
    pre_mlp_norm: str | None = "post_attention_layernorm"  # its output feeds the MLP: hooked likewise
    other_hidden_norms: tuple[str, ...] = ()   # further per-layer norms over the hidden axis (sliced only)
    head_norms: tuple[str, ...] = ()           # per-head norms over head_dim (q_norm/k_norm): untouched
    # attention norms over a whole projection's output (OLMo2, OLMoE: q_norm [H*D], k_norm [K*D]): name and
    # the segment ("q" or "kv") whose kept rows slice them
    proj_norms: tuple[tuple[str, str], ...] = ()
    moe: MoeArch | None = None                 # a sparse MoE block in place of the MLP (Mixtral, Qwen-MoE, OLMoE)
    hybrid: HybridArch | None = None           # one mixer per layer, of the kind the config names (NemotronH)
    mamba: MambaArch | None = None             # the Mamba2 mixer of hybrid / Mamba layers
    # OLMoE builds q_norm over config.hidden_size although it normalizes q [H*D]: hidden must equal heads*head_dim
    hidden_is_q_width: bool = False
    final_softcap: bool = False                # logits = cap * tanh(raw / cap), cap = config.final_logit_softcapping
    logits_scaling: bool = False               # logits = raw / config.logits_scaling (Granite)
    has_layer_types: bool = False              # config.layer_types: one entry per layer
    layer_has_idx: bool = False                # the decoder layer itself stores layer_idx
    scaled_embedding: bool = False             # embeddings multiplied by sqrt(hidden_size)
    # a norm's per-channel gain is (norm_weight_offset + weight): 1.0 where norms multiply by (1 + w)
    # (Gemma3RMSNorm, Nemotron's LayerNorm1P), 0.0 where they multiply by w
    norm_weight_offset: float = 0.0
    # transformers' config validation demands hidden_size % num_attention_heads == 0 (even with an
    # explicit head_dim): a pruned config that breaks it would not load with from_pretrained
    hidden_divisible_by_heads: bool = False
    attention_free: bool = False               # no attention or MLP config keys at all (Mamba2)
    # a layer's output is its input plus what o_proj and down_proj output, as they are (no post-norm, no residual
    # multiplier): the prune stage's least-squares refit of those projections (minitron.prune.refit) applies
    residual_outputs: bool = True
    # width attributes that modules cache at construction (names -> Dims, see set_module_widths)
    layer_attrs: tuple[str, ...] = ("hidden_size",)
    attn_attrs: tuple[str, ...] = ("num_key_value_groups",)
    mlp_attrs: tuple[str, ...] = ("hidden_size", "intermediate_size")


FAMILIES: dict[str, Arch] = {
    "llama": Arch("llama", hidden_divisible_by_heads=True),
    "mistral": Arch("mistral"),
    "qwen2": Arch("qwen2", has_layer_types=True),   # q/k/v biases: sliced with their rows
    "qwen3": Arch("qwen3", head_norms=("q_norm", "k_norm"), has_layer_types=True),
    "gemma3_text": Arch("gemma3_text", pre_mlp_norm="pre_feedforward_layernorm",
                        other_hidden_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                        head_norms=("q_norm", "k_norm"), has_layer_types=True, layer_has_idx=True,
                        scaled_embedding=True, hidden_divisible_by_heads=True, norm_weight_offset=1.0,
                        residual_outputs=False),
    "phi3": Arch("phi3", attn_in=(("qkv_proj", ("q", "kv", "kv")),), mlp_in=(("gate_up_proj", ("ffn", "ffn")),),
                 attn_attrs=("num_key_value_groups", "num_key_value_heads"), mlp_attrs=()),
    "gemma2": Arch("gemma2", pre_mlp_norm="pre_feedforward_layernorm",  # soft-capped logits and attention
                   other_hidden_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                   has_layer_types=True, scaled_embedding=True, hidden_divisible_by_heads=True,
                   norm_weight_offset=1.0, final_softcap=True, residual_outputs=False),
    "olmo2": Arch("olmo2", pre_attn_norm=None, pre_mlp_norm=None,  # norms after attention and MLP only
                  other_hidden_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                  proj_norms=(("q_norm", "q"), ("k_norm", "kv")), residual_outputs=False),
    # embedding / residual / attention multipliers: scalars
    "granite": Arch("granite", logits_scaling=True, residual_outputs=False),
    "mixtral": Arch("mixtral", moe=MoeArch(n_experts_key="num_local_experts", width_key="intermediate_size"),
                    mlp_attrs=()),
    "qwen2_moe": Arch("qwen2_moe", has_layer_types=True, mlp_attrs=(),
                      moe=MoeArch(shared="shared_expert", shared_gate="shared_expert_gate",
                                  shared_width_key="shared_expert_intermediate_size")),
    "qwen3_moe": Arch("qwen3_moe", head_norms=("q_norm", "k_norm"), mlp_attrs=(), moe=MoeArch()),
    "olmoe": Arch("olmoe", proj_norms=(("q_norm", "q"), ("k_norm", "kv")), mlp_attrs=(), hidden_is_q_width=True,
                  moe=MoeArch(n_experts_key="num_experts", width_key="intermediate_size")),
    "nemotron": Arch("nemotron", mlp_in=(("up_proj", ("ffn",)),),  # relu^2 MLP without a gate; LayerNorm1P
                     attn_attrs=("hidden_size", "num_heads", "num_key_value_heads", "num_key_value_groups"),
                     norm_weight_offset=1.0),
    # hybrid Mamba2 / attention / MLP layers, one mixer each; no RoPE; relu^2 MLP without a gate
    "nemotron_h": Arch("nemotron_h", embed="model.embeddings", final_norm="model.norm_f", attn="mixer", mlp="mixer",
                       mlp_in=(("up_proj", ("ffn",)),), pre_attn_norm="norm", pre_mlp_norm=None,
                       has_layer_types=True, layer_has_idx=True, hybrid=HybridArch(), mamba=MambaArch(),
                       layer_attrs=(), attn_attrs=("num_key_value_groups",)),
    # Mamba2 layers only (norm + mixer); inner width = hidden * expand
    "mamba2": Arch("mamba2", layers="backbone.layers", embed="backbone.embeddings", final_norm="backbone.norm_f",
                   attn="mixer", mlp="mixer", pre_attn_norm="norm", pre_mlp_norm=None, layer_has_idx=True,
                   attention_free=True, layer_attrs=(), attn_attrs=(), mlp_attrs=(),
                   hybrid=HybridArch(types_key=None, single_kind="linear_attention", keeps_attention=None),
                   mamba=MambaArch(heads_key="num_heads", head_dim_key="head_dim", state_key="state_size",
                                   expand_key="expand")),
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
            "Adding one is a new entry in minitron/arch/adapters.py.")
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
    experts: int = 0      # MoE: experts per layer (0: a dense model); ffn is then each expert's width
    top_k: int = 0        # MoE: experts each token is routed to
    shared_ffn: int = 0   # MoE: the shared expert's width (0: none)
    mamba_heads: int = 0     # Mamba2 heads per mamba layer (0: no mamba layers)
    mamba_head_dim: int = 0  # channels per Mamba2 head

    def to_dict(self) -> dict:
        """Every field, less the MoE and Mamba ones of a model without them (so dense dims read as before)."""
        return {k: v for k, v in self.__dict__.items() if v or k not in OPTIONAL_DIMS}


OPTIONAL_DIMS = ("experts", "top_k", "shared_ffn", "mamba_heads", "mamba_head_dim")


def head_dim_of(config) -> int:
    """config.head_dim when set, else hidden_size // num_attention_heads (transformers' fallback)."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def is_per_layer(config) -> bool:
    """Whether a config gives its layers their own widths (transformers' per_layer_config; minitron.arch.layerwise)."""
    return bool(getattr(config, "is_heterogeneous", False))


def config_value(config, key: str):
    """config.key; on a per-layer config the global value, which minitron writes as the widest layer's."""
    if is_per_layer(config):
        return config._getattr_without_heterogeneous_validation(key)
    return getattr(config, key)


def dims_of(config) -> Dims:
    """Read Dims from an HF config of a supported family (per-layer widths: the widest layer's)."""
    a = get_arch(config)
    if a.attention_free:  # Mamba2: only hidden, depth and the Mamba axes
        d = Dims(hidden=config.hidden_size, ffn=0, heads=0, kv_heads=0, layers=config.num_hidden_layers, head_dim=0,
                 vocab=config.vocab_size, tied=bool(config.tie_word_embeddings))
        d.mamba_heads, d.mamba_head_dim = getattr(config, a.mamba.heads_key), getattr(config, a.mamba.head_dim_key)
        return d
    heads = config_value(config, "num_attention_heads")
    kv = config_value(config, "num_key_value_heads") or heads
    d = Dims(hidden=config.hidden_size, ffn=config_value(config, "intermediate_size"), heads=heads,
             kv_heads=kv, layers=config.num_hidden_layers, head_dim=head_dim_of(config),
             vocab=config.vocab_size, tied=bool(config.tie_word_embeddings))
    if a.moe is not None:
        check_all_layers_sparse(config)
        m = a.moe
        d.ffn, d.experts, d.top_k = getattr(config, m.width_key), getattr(config, m.n_experts_key), getattr(config, m.top_k_key)
        d.shared_ffn = getattr(config, m.shared_width_key) if m.shared_width_key else 0
    if a.mamba is not None and "mamba" in {p for parts in layer_parts(config) for p in parts}:
        d.mamba_heads, d.mamba_head_dim = getattr(config, a.mamba.heads_key), getattr(config, a.mamba.head_dim_key)
    return d


def check_all_layers_sparse(config) -> None:
    """Refuse MoE configs that mix dense MLP layers in (Qwen-MoE's mlp_only_layers / decoder_sparse_step):
    minitron's MoE axes assume every layer holds the sparse block."""
    only, step = getattr(config, "mlp_only_layers", None) or [], getattr(config, "decoder_sparse_step", None) or 1
    if only or step != 1:
        raise UnsupportedArchitecture(
            f"{config.model_type} with dense MLP layers among the MoE ones (mlp_only_layers={only}, "
            f"decoder_sparse_step={step}) is not supported yet: minitron prunes MoE models whose every layer is "
            "sparse (mlp_only_layers=[] and decoder_sparse_step=1)")




def hidden_step(config, heads: int, round_to: int = 1) -> int:
    """The granularity hidden_size must keep: lcm(round_to, heads) where the family requires
    hidden_size % num_attention_heads == 0, else round_to."""
    return math.lcm(round_to, heads) if get_arch(config).hidden_divisible_by_heads else round_to


def write_dims(config, dims: Dims, kept_layers: list[int] | None = None) -> None:
    """Write pruned dims into a config in place (head_dim explicitly; layer_types subset to kept layers)."""
    arch = get_arch(config)
    config.hidden_size = dims.hidden
    if arch.mamba is not None and dims.mamba_heads:
        setattr(config, arch.mamba.heads_key, dims.mamba_heads)
        setattr(config, arch.mamba.head_dim_key, dims.mamba_head_dim)
        if arch.mamba.expand_key:  # checked by the plan to be a whole number
            setattr(config, arch.mamba.expand_key, dims.mamba_heads * dims.mamba_head_dim // dims.hidden)
    if arch.attention_free:
        config.num_hidden_layers = dims.layers
        return
    if arch.moe is None:
        config.intermediate_size = dims.ffn
    else:
        setattr(config, arch.moe.width_key, dims.ffn)
        setattr(config, arch.moe.n_experts_key, dims.experts)
        setattr(config, arch.moe.top_k_key, dims.top_k)
        if arch.moe.shared_width_key:
            setattr(config, arch.moe.shared_width_key, dims.shared_ffn)
    config.num_attention_heads = dims.heads
    config.num_key_value_heads = dims.kv_heads
    config.head_dim = dims.head_dim
    if kept_layers is not None:
        if arch.has_layer_types and getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in kept_layers]
        if arch.family.startswith(("qwen2", "qwen3")) and getattr(config, "max_window_layers", None) is not None:
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


def attn_inputs(model: nn.Module, layer: nn.Module) -> list[tuple[nn.Linear, Segments]]:
    """The attention projections that read hidden states, each with its output-row segments."""
    arch = get_arch(model)
    attn = getattr(layer, arch.attn)
    return [(getattr(attn, name), segs) for name, segs in arch.attn_in]


def attn_output(model: nn.Module, layer: nn.Module) -> nn.Linear:
    """o_proj: input [B, T, heads*head_dim], output [B, T, hidden]."""
    arch = get_arch(model)
    return getattr(getattr(layer, arch.attn), arch.o_proj)


def mlp_inputs(model: nn.Module, layer: nn.Module) -> list[tuple[nn.Linear, Segments]]:
    """The MLP projections that read hidden states, each with its output-row segments."""
    arch = get_arch(model)
    mlp = getattr(layer, arch.mlp)
    return [(getattr(mlp, name), segs) for name, segs in arch.mlp_in]


def mlp_output(model: nn.Module, layer: nn.Module) -> nn.Linear:
    """down_proj: input [B, T, ffn], output [B, T, hidden]."""
    arch = get_arch(model)
    return getattr(getattr(layer, arch.mlp), arch.down_proj)


def channel_norms(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The pre-attention and pre-MLP norms a family has (none in OLMo2): their outputs feed q/k/v and the MLP."""
    arch = get_arch(model)
    return [getattr(layer, n) for n in (arch.pre_attn_norm, arch.pre_mlp_norm) if n is not None]


def channel_taps(model: nn.Module, layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """The two hidden-channel activations [B, T, C] of a layer that channel importance scores, as
    (module, "output" | "input"): the outputs of the pre-attention and pre-MLP norms, or, where a family
    has no pre-norm (OLMo2), the input of the attention / the MLP (the residual stream they read)."""
    arch = get_arch(model)
    if arch.hybrid is not None:  # one pre-norm per layer, whatever its mixer
        return [(getattr(layer, arch.hybrid.norm), "output")]
    return [(getattr(layer, norm), "output") if norm is not None else (getattr(layer, part), "input")
            for norm, part in ((arch.pre_attn_norm, arch.attn), (arch.pre_mlp_norm, arch.mlp))]


def proj_norms(model: nn.Module, layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """Attention norms over a whole projection (OLMo2 / OLMoE q_norm [H*D], k_norm [K*D]) with the segment
    ("q" | "kv") whose kept rows slice their weight."""
    arch = get_arch(model)
    attn = getattr(layer, arch.attn)
    return [(getattr(attn, name), seg) for name, seg in arch.proj_norms]


def hidden_norms(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """Every per-layer norm whose weight spans the hidden axis (sliced when hidden shrinks)."""
    arch = get_arch(model)
    return [*channel_norms(model, layer), *(getattr(layer, n) for n in arch.other_hidden_norms)]


# ---- layer kinds (hybrid families hold one mixer per layer) ------------------------------------------

DENSE_PARTS = frozenset({"attn", "mlp"})


def layer_kinds(config) -> list[str]:
    """Each layer's kind as the config names it (NemotronH: "linear_attention", "full_attention", "mlp",
    "moe"); a family without a hybrid adapter: "decoder" for every layer (attention and MLP)."""
    a = get_arch(config)
    if a.hybrid is None:
        return ["decoder"] * config.num_hidden_layers
    if a.hybrid.types_key is None:
        return [a.hybrid.single_kind] * config.num_hidden_layers
    return list(getattr(config, a.hybrid.types_key))


def first_cache_layer(config) -> int | None:
    """The layer depth pruning must keep so that the pruned model's first layer holds a cache (hybrid families with
    layers that hold none, e.g. NemotronH's MLP layers): the first layer of a cache kind; None when any first
    layer will do (dense, MoE, Mamba2: every layer holds a cache)."""
    a = get_arch(config)
    kinds = layer_kinds(config)
    if a.hybrid is None or all(k in a.hybrid.cache_kinds for k in kinds):
        return None
    return next((i for i, k in enumerate(kinds) if k in a.hybrid.cache_kinds), None)


def layer_parts(model_or_config) -> list[frozenset[str]]:
    """The prunable parts of each layer: {"attn", "mlp"} in a dense / MoE family (its MLP is the MoE block
    there); hybrid layers hold one of {"mamba"}, {"attn"}, {"mlp"}, {"moe"}."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    a = get_arch(config)
    if a.hybrid is None:
        return [DENSE_PARTS - skip for skip in skipped_parts(config)]
    parts = dict(a.hybrid.kinds)
    return [frozenset({parts[k]}) for k in layer_kinds(config)]


SKIP_NAMES = {"attention": "attn", "mlp": "mlp"}  # per_layer_config[i]["skip"] (transformers) -> a layer part here


def skipped_parts(config) -> list[frozenset[str]]:
    """Each layer's parts ("attn", "mlp") that a per-layer config skips (per_layer_config[i]["skip"]); none on
    a uniform config."""
    if not is_per_layer(config):
        return [frozenset()] * config.num_hidden_layers
    return [frozenset(SKIP_NAMES[s] for s in (getattr(config.per_layer_config[i], "skip", None) or ()))
            for i in range(config.num_hidden_layers)]


def kind_name(config, name: str) -> str:
    """A layer kind as the config names it, from that name or a short alias ("mamba", "attention", "M", ...)."""
    a = get_arch(config)
    if a.hybrid is None:
        raise ValueError(f"{a.family} has one kind of layer; layer kinds apply to hybrid families (NemotronH)")
    name = dict(a.hybrid.aliases).get(name, name)
    known = [k for k, _ in a.hybrid.kinds]
    if name not in known:
        raise ValueError(f"layer kind {name!r} unknown; choose from {', '.join(known)} (or mamba, attention)")
    return name


def hybrid_moe_hidden_axes(model: nn.Module, layer: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """Every tensor of a hybrid MoE layer's mixer that spans the hidden axis, as (module, parameter name, axis):
    router columns, shared-expert up columns / down rows (and bias), and the experts' columns / rows, or, with
    latent projections, those projections' columns / rows (the experts then work in the latent space)."""
    a = get_arch(model)
    m = a.hybrid.moe
    mixer = getattr(layer, a.hybrid.mixer)
    shared = getattr(mixer, m.shared)
    out = [(getattr(mixer, m.router), "weight", 1), (shared.up_proj, "weight", 1), (shared.down_proj, "weight", 0)]
    if shared.down_proj.bias is not None:
        out.append((shared.down_proj, "bias", 0))
    if getattr(model.config, m.latent_key, None) is None:
        experts = getattr(mixer, m.experts)
        return out + [(experts, "up_proj", 2), (experts, "down_proj", 1)]  # [E, F, C], [E, C, F]
    lat_in, lat_out = getattr(mixer, m.latent_in), getattr(mixer, m.latent_out)
    out += [(lat_in, "weight", 1), (lat_out, "weight", 0)]
    return out + ([(lat_out, "bias", 0)] if lat_out.bias is not None else [])


def set_hybrid_moe_widths(model: nn.Module, layer: nn.Module, hidden: int) -> None:
    """Fix the hidden width a hybrid MoE mixer's modules cache (router, shared expert, experts, Linears)."""
    a = get_arch(model)
    m = a.hybrid.moe
    mixer = getattr(layer, a.hybrid.mixer)
    getattr(mixer, m.router).hidden_dim = hidden
    getattr(mixer, m.shared).hidden_size = hidden
    if getattr(model.config, m.latent_key, None) is None:
        getattr(mixer, m.experts).hidden_dim = hidden
    for module, name, _ in hybrid_moe_hidden_axes(model, layer):
        if isinstance(module, nn.Linear) and name == "weight":
            module.out_features, module.in_features = module.weight.shape


# ---- Mamba2 mixers (layout: MambaArch; their pruning and scoring: minitron.arch.mamba) --------------------

@dataclass
class MambaParts:
    """The modules and per-head parameters of one Mamba2 mixer (shapes in MambaArch)."""

    mixer: nn.Module
    in_proj: nn.Linear
    conv1d: nn.Conv1d
    out_proj: nn.Linear
    norm: nn.Module
    per_head: list[str]      # names of the mixer's [H] parameters (A_log, D, dt_bias)
    groups: int              # G: B/C groups
    state: int               # N: state size


def mamba_parts(model: nn.Module, layer: nn.Module) -> MambaParts:
    a = get_arch(model)
    m = a.mamba
    if m is None:
        raise ValueError(f"{a.family} has no Mamba mixer")
    mixer = getattr(layer, a.hybrid.mixer) if a.hybrid is not None else layer
    return MambaParts(mixer, getattr(mixer, m.in_proj), getattr(mixer, m.conv1d), getattr(mixer, m.out_proj),
                      getattr(mixer, m.norm), list(m.per_head), getattr(model.config, m.groups_key),
                      getattr(model.config, m.state_key))


def set_mamba_widths(model: nn.Module, layer: nn.Module, dims: Dims) -> None:
    """Fix the widths a Mamba2 mixer caches (heads, head dim, inner and conv widths, hidden) and those of its
    conv1d and gated norm (group size = inner / G)."""
    p = mamba_parts(model, layer)
    inner = dims.mamba_heads * dims.mamba_head_dim
    conv_dim = inner + 2 * p.groups * p.state
    mx = p.mixer
    mx.num_heads, mx.head_dim, mx.intermediate_size, mx.conv_dim = dims.mamba_heads, dims.mamba_head_dim, inner, conv_dim
    mx.hidden_size = dims.hidden
    p.conv1d.in_channels = p.conv1d.out_channels = p.conv1d.groups = conv_dim
    p.norm.group_size = inner // p.groups


# ---- MoE blocks (layout: MoeArch; the pruning and scoring of experts: minitron.arch.moe) -------------------

def residual_outputs(model_or_config) -> bool:
    """Whether each layer adds its o_proj / down_proj outputs to the residual stream unchanged (Arch)."""
    return get_arch(model_or_config).residual_outputs


def is_moe(model_or_config) -> bool:
    """Whether the family's MLP is a sparse MoE block."""
    return get_arch(model_or_config).moe is not None


@dataclass
class MoeParts:
    """The modules of one layer's MoE block."""

    block: nn.Module
    router: nn.Module              # .weight [E, C]
    experts: nn.Module             # .gate_up_proj [E, 2F, C], .down_proj [E, C, F], .act_fn
    shared: nn.Module | None       # a gated MLP (gate_proj, up_proj [Fs, C], down_proj [C, Fs]) or None
    shared_gate: nn.Linear | None  # [1, C]


def moe_parts(model: nn.Module, layer: nn.Module) -> MoeParts:
    arch = get_arch(model)
    m = arch.moe
    if m is None:
        raise ValueError(f"{arch.family} has no MoE block")
    block = getattr(layer, arch.mlp)
    return MoeParts(block, getattr(block, m.router), getattr(block, m.experts),
                    getattr(block, m.shared) if m.shared else None, getattr(block, m.shared_gate) if m.shared_gate else None)


def set_moe_widths(model: nn.Module, layer: nn.Module, dims: Dims) -> None:
    """Fix the widths an MoE block's modules cache (experts and router: E, C, F, top-k; shared expert: C, Fs)
    and the CausalLM's own copies of E and top-k (read by its load-balancing loss)."""
    p = moe_parts(model, layer)
    p.experts.num_experts, p.experts.hidden_dim, p.experts.intermediate_dim = dims.experts, dims.hidden, dims.ffn
    p.router.num_experts, p.router.hidden_dim, p.router.top_k = dims.experts, dims.hidden, dims.top_k
    if "top_k" in vars(p.block):  # Mixtral's block keeps its own copy
        p.block.top_k = dims.top_k
    if p.shared is not None:
        p.shared.hidden_size, p.shared.intermediate_size = dims.hidden, dims.shared_ffn
    model.num_experts, model.num_experts_per_tok = dims.experts, dims.top_k


def set_layer_index(model: nn.Module, layer: nn.Module, idx: int) -> None:
    """Renumber a decoder layer after layers were dropped (its KV-cache slot).

    Each kept layer keeps its own layer type: write_dims subsets config.layer_types the same way.
    """
    attention(model, layer).layer_idx = idx
    if get_arch(model).layer_has_idx:
        layer.layer_idx = idx


def set_module_widths(model: nn.Module, layer: nn.Module, dims: Dims, parts: frozenset[str] = DENSE_PARTS) -> None:
    """Fix the width attributes that transformers modules cache at construction time, in a layer holding
    `parts` (layer_parts)."""
    arch = get_arch(model)
    values = {"hidden_size": dims.hidden, "intermediate_size": dims.ffn, "num_heads": dims.heads,
              "num_key_value_heads": dims.kv_heads, "num_key_value_groups": dims.heads // max(dims.kv_heads, 1)}  # kv 0: no attention
    targets = [(layer, arch.layer_attrs)]
    if "attn" in parts:
        targets.append((attention(model, layer), arch.attn_attrs))
    if "mlp" in parts:
        targets.append((getattr(layer, arch.mlp), arch.mlp_attrs))
    for module, names in targets:
        for name in names:
            setattr(module, name, values[name])
    if "mamba" in parts:
        set_mamba_widths(model, layer, dims)
    if "moe" in parts:  # a hybrid MoE mixer (dense-family MoE blocks: set_moe_widths)
        set_hybrid_moe_widths(model, layer, dims.hidden)


def scale_norm_gain(model: nn.Module, norm: nn.Module, factor: float) -> None:
    """Multiply a norm's effective per-channel gain by factor, in place: (offset + w) -> factor * (offset + w),
    with the family's norm_weight_offset (1.0 for norms that multiply by 1 + w). A LayerNorm's bias is left."""
    if factor == 1.0:  # (1 + w) - 1 would round small w: leave the weight bit-identical
        return
    off = get_arch(model).norm_weight_offset
    w = norm.weight.data
    w.copy_(((off + w.double()) * factor - off).to(w.dtype))


def rescale_embedding(model: nn.Module, hidden: int) -> None:
    """Keep a scaled embedding's output unchanged when hidden_size becomes `hidden`.

    Families with scaled_embedding multiply the embedding by sqrt(hidden_size), and transformers recomputes
    that scale from config.hidden_size on reload (Gemma3TextScaledWordEmbedding). So the new scale
    sqrt(hidden) is set in memory too, and the ratio old/new scale is folded into the embedding weight:
    weight' * scale' == weight * scale on every kept channel. When the lm_head is tied to the embedding,
    the fold would scale the logits by the same ratio; the final norm (whose output only the lm_head
    reads) takes the inverse, so the logits are unchanged by it."""
    if not get_arch(model).scaled_embedding:
        return
    emb = embedding(model)
    dtype = emb.weight.dtype  # the forward multiplies by embed_scale.to(weight dtype): fold exactly that
    old = float(emb.embed_scale.to(dtype))
    new = float(torch.tensor(hidden**0.5, dtype=emb.embed_scale.dtype).to(dtype))
    emb.scalar_embed_scale = hidden**0.5
    emb.embed_scale.fill_(hidden**0.5)
    if old == new:
        return
    fold = old / new
    emb.weight.data.mul_(fold)  # in place: a tied lm_head shares this tensor
    if model.config.tie_word_embeddings:
        scale_norm_gain(model, final_norm(model), 1.0 / fold)


def layer_output(output) -> torch.Tensor:
    """A decoder layer's forward output -> hidden states [B, T, C] (tuple in older transformers)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def without_layers(model: nn.Module, drop: list[int]):
    """Temporarily run the model with some decoder layers removed (use_cache=False forward only)."""
    layers = decoder_layers(model)
    config = model.config
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    # layer_types is rewritten only where it is a stored list (Mamba2 derives it from num_hidden_layers)
    types = getattr(config, "layer_types", None) if get_arch(model).has_layer_types else None
    saved = (config.num_hidden_layers, types)
    set_decoder_layers(model, nn.ModuleList([layers[i] for i in keep]))
    config.num_hidden_layers = len(keep)
    if types is not None:
        config.layer_types = [types[i] for i in keep]
    try:
        yield model
    finally:
        set_decoder_layers(model, layers)
        config.num_hidden_layers = saved[0]
        if types is not None:
            config.layer_types = types


# ---- output head: hidden states -> logits, as the family's CausalLM forward computes them -----------

# ---- slicing (shared by dense, MoE and Mamba trimming) -----------------------------------------------

def slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    """Keep rows out_idx and columns in_idx of a Linear (and its bias rows), in place."""
    w = lin.weight.data  # [out, in]
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, out_idx.to(w.device)).clone())
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    lin.weight = nn.Parameter(w.clone())
    lin.out_features, lin.in_features = w.shape


def slice_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    """Keep channels idx of a norm's weight (and bias, for LayerNorm), in place."""
    norm.weight = nn.Parameter(norm.weight.data.index_select(0, idx.to(norm.weight.device)).clone())
    if isinstance(norm, nn.LayerNorm):
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias.data.index_select(0, idx.to(norm.bias.device)).clone())
        norm.normalized_shape = (len(idx),)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant). transformers >= 5.2x names it
    activation_checkpointing_enable (gradient_checkpointing_enable is its deprecated alias, to go in v6); earlier
    5.x releases (5.17, on GPU images) have only gradient_checkpointing_enable."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (`model.model` for every family here): called with input_ids
    [B, T], its `last_hidden_state` [B, T, C] is what the CausalLM forward feeds its lm_head."""
    return get_module(model, get_arch(model).layers.rpartition(".")[0])


def logit_map(model: nn.Module) -> tuple[float, float | None]:
    """(scale, cap): the model's logits are raw / scale, then cap * tanh(x / cap) when cap is set. Gemma2 /
    Gemma3 soft-cap them when config.final_logit_softcapping is set; Granite divides them by
    config.logits_scaling; every other family is (1.0, None): lm_head's output unchanged."""
    a = get_arch(model)
    scale = float(model.config.logits_scaling) if a.logits_scaling else 1.0
    cap = getattr(model.config, "final_logit_softcapping", None) if a.final_softcap or a.family == "gemma3_text" else None
    return scale, (float(cap) if cap else None)


def final_logits(model: nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """Raw lm_head outputs [..., V] -> the model's logits [..., V], in the same dtype, as its forward computes
    them (logit_map)."""
    scale, cap = logit_map(model)
    if scale != 1.0:
        raw = raw / scale
    return raw if cap is None else torch.tanh(raw / cap) * cap


def logits_of_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states [..., C] (backbone output) -> the model's logits [..., V]."""
    return final_logits(model, lm_head(model)(hidden))


def prefill_kwargs(model: nn.Module) -> dict:
    """The forward options of a generation's prefill: only the last position's logits where the model computes them
    alone (`logits_to_keep`, as transformers' generate sets it, and as llama.cpp and vLLM do), since the next token
    needs no others; {} for a family without it."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
