"""Per-layer widths: each decoder layer keeps its own MLP width and KV groups, or no MLP / no attention at all.

The format is transformers' own (5.25+, HeterogeneousConfigMixin): `config.per_layer_config` maps a layer index to
the attributes that differ there, e.g. {"5": {"intermediate_size": 512}, "7": {"skip": ["attention"]}}, saved in
config.json. The global values stay the widest layer's (so every uniform check of the config passes). Llama,
Mistral and Qwen2 modeling in transformers 5.25 still build every layer from the global config, so minitron builds
such a model itself (`build`): the model from the global config, then each layer again from its own merged config,
a layer's skipped attention or MLP replaced by a module that adds nothing (`ZeroAttention`, `ZeroMLP`) and its norm
by an identity. The weights then load as they are: a skipped part simply has none.

Only families whose math is Llama's are written this way (PER_LAYER_FAMILIES): llama.cpp's `deci` architecture and
vLLM's `nemotron-nas` run the same math per layer, and nothing else would run the result.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minitron.arch import adapters as A

PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2")
SKIP_ATTENTION, SKIP_MLP = tuple(A.SKIP_NAMES)  # "attention", "mlp": transformers' names in per_layer_config[i]["skip"]
is_per_layer = A.is_per_layer


@dataclass(frozen=True)
class LayerWidth:
    """One decoder layer's widths. heads == kv_heads == 0: no attention; ffn == 0: no MLP."""

    heads: int
    kv_heads: int
    ffn: int


class ZeroAttention(nn.Module):
    """A skipped attention: adds nothing to the residual stream (the layer's norm before it is an identity)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # [B, T, C] -> ([B, T, C] zeros, no weights)
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """A skipped MLP: adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, T, C] zeros
        return torch.zeros_like(x)


def supports_config() -> bool:
    """Whether this transformers has per_layer_config (5.25+)."""
    from transformers import PretrainedConfig

    return isinstance(getattr(PretrainedConfig, "per_layer_config", None), property)


def check_family(config) -> None:
    """Refuse, naming what to use instead, a family or transformers that cannot hold per-layer widths."""
    family = A.get_arch(config).family
    if family not in PER_LAYER_FAMILIES:
        raise A.UnsupportedArchitecture(
            f"per-layer widths are written for Llama-math families only ({', '.join(PER_LAYER_FAMILIES)}: what "
            f"llama.cpp's deci and vLLM's nemotron-nas run); {family} is not one of them. Prune it with uniform "
            "widths (drop target.layer_widths).")
    if not supports_config():
        import transformers

        raise A.UnsupportedArchitecture(f"per-layer widths need transformers >= 5.25 (its config.per_layer_config); "
                                        f"this is {transformers.__version__}: pip install -U 'transformers>=5.25,<6'")


def layer_widths(config) -> list[LayerWidth]:
    """Each layer's widths, read from per_layer_config (or the global values for a uniform config)."""
    out = []
    for i, skip in enumerate(A.skipped_parts(config)):
        c = config.per_layer_config[i] if is_per_layer(config) else config
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        out.append(LayerWidth(heads=0 if "attn" in skip else c.num_attention_heads,
                              kv_heads=0 if "attn" in skip else kv, ffn=0 if "mlp" in skip else c.intermediate_size))
    return out


def write_layer_widths(config, widths: list[LayerWidth]) -> None:
    """Set per_layer_config from each layer's widths, in place; the global values become the widest layer's.
    Layers equal to the global values get no entry; a uniform list clears per_layer_config."""
    config.per_layer_config = None
    heads = max(w.heads for w in widths)
    config.num_attention_heads = heads
    config.num_key_value_heads = max(w.kv_heads for w in widths)
    config.intermediate_size = max(w.ffn for w in widths)
    over = {}
    for i, w in enumerate(widths):
        o: dict = {}
        if w.heads == 0:
            o["skip"] = [SKIP_ATTENTION]
        elif (w.heads, w.kv_heads) != (heads, config.num_key_value_heads):
            o.update(num_attention_heads=w.heads, num_key_value_heads=w.kv_heads)
        if w.ffn == 0:
            o["skip"] = [*o.get("skip", []), SKIP_MLP]
        elif w.ffn != config.intermediate_size:
            o["intermediate_size"] = w.ffn
        if o:
            over[i] = o
    if over:
        config.per_layer_config = over


def read_config(path: Path):
    """The config of a model dir whose config.json has per_layer_config. transformers' Llama config validation
    reads num_attention_heads globally, which per-layer query heads make ambiguous, so the config is made without
    per_layer_config and it is set afterwards (the setter checks the layer indices)."""
    from transformers import AutoConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    over = raw.pop("per_layer_config", None) or None
    raw.pop("transformers_version", None)
    config = AutoConfig.for_model(**raw)
    config.per_layer_config = over
    return config


def uniform_config(config):
    """A copy of a per-layer config without per_layer_config: every layer at the widest layer's widths."""
    base = copy.deepcopy(config)
    base.per_layer_config = None
    return base


@contextlib.contextmanager
def global_access(config):
    """Let transformers read the global values of a per-layer config (its Llama config validation reads
    num_attention_heads, which per_layer_config makes ambiguous) for the time of a save."""
    import logging

    log = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")  # its warning: ours to heed
    level = log.level
    config.allow_global_per_layer_attribute_access = True
    log.setLevel(logging.ERROR)
    try:
        yield config
    finally:
        config.__dict__.pop("allow_global_per_layer_attribute_access", None)
        log.setLevel(level)


def config_json(config) -> dict:
    """config.to_dict() of a per-layer config, without the global-access switch."""
    with global_access(config):
        d = config.to_dict()
    d.pop("allow_global_per_layer_attribute_access", None)
    return d


def save_pretrained(model: nn.Module, out: Path, **kwargs) -> None:
    """model.save_pretrained(out) of a per-layer model: weights as transformers writes them (a skipped part has
    none), config.json with per_layer_config and without the global-access switch."""
    with global_access(model.config):
        model.save_pretrained(out, **kwargs)
    (Path(out) / "config.json").write_text(json.dumps(config_json(model.config), indent=2, sort_keys=True) + "\n")


def skip_parts(model: nn.Module, layer: nn.Module, parts: frozenset[str]) -> None:
    """Replace a layer's attention ("attn") and / or MLP ("mlp") by modules that add nothing, and the norm before
    each by an identity (it has no weight then, as in llama.cpp's deci and vLLM's nemotron-nas)."""
    arch = A.get_arch(model)
    if "attn" in parts:
        setattr(layer, arch.attn, ZeroAttention())
        setattr(layer, arch.pre_attn_norm, nn.Identity())
    if "mlp" in parts:
        setattr(layer, arch.mlp, ZeroMLP())
        setattr(layer, arch.pre_mlp_norm, nn.Identity())


def rebuild_layers(model: nn.Module, config) -> None:
    """Replace each decoder layer of `model` (built from uniform_config(config)) by one built from its own merged
    config, skipped parts as Zero modules with identity norms; model.config becomes `config`. Parameters are
    created on the device and dtype of the model's embedding (meta under init_empty_weights)."""
    layers = A.decoder_layers(model)
    attn_impl = model.config._attn_implementation
    emb = A.embedding(model).weight
    for i, (layer, skip) in enumerate(zip(layers, A.skipped_parts(config), strict=True)):
        c = config.per_layer_config[i]
        c._attn_implementation = attn_impl
        with torch.device(emb.device):
            new = type(layer)(c, i).to(emb.dtype)
        skip_parts(model, new, skip)
        layers[i] = new
    model.config = config


def build(config, dtype: torch.dtype | None = None, empty: bool = False) -> nn.Module:
    """A model of a per-layer config (dtype None: from_config's choice): random weights, or (empty) parameters on the
    meta device and buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    ctx = init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext()
    with ctx:
        model = AutoModelForCausalLM.from_config(uniform_config(config), **({} if dtype is None else {"dtype": dtype}))
        rebuild_layers(model, config)
    return model


def load(path: Path, config, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A per-layer model saved in `path` (safetensors) in `dtype` (None: the checkpoint's own): built empty, then every
    weight read and assigned; a weight the file lacks or has beyond the model is an error naming them."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("model*.safetensors"))  # (a prune dir also holds scores.safetensors)
    if not files:
        raise FileNotFoundError(f"{path}: a per-layer model is read from safetensors only, and none is there")
    state = {}
    for f in files:
        state.update(load_file(f))
    dtype = dtype or next(v.dtype for v in state.values() if v.is_floating_point())
    model = build(config, dtype, empty=True)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop(A.get_arch(config).lm_head + ".weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != A.get_arch(config).lm_head + ".weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match its per_layer_config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval()


@torch.no_grad()
def pad_to_uniform(model: nn.Module) -> nn.Module:
    """A stock model of the same family at the widest layer's widths everywhere, that gives exactly the same logits:
    padded MLP neurons have zero gate/up rows and zero down columns (they add 0); padded KV groups have zero q/k/v
    rows and zero o_proj columns (their heads attend to zero values and add 0); a skipped part becomes all zeros
    (norm gains 1). No memory is saved: this is for loaders without per-layer support."""
    emb = A.embedding(model).weight
    full = build(uniform_config(model.config), dtype=emb.dtype, empty=True)
    arch = A.get_arch(model)
    norms = tuple(f"{n}.weight" for n in (arch.pre_attn_norm, arch.pre_mlp_norm))
    src = model.state_dict()
    out = {}
    for key, like in full.state_dict().items():
        if key in src:
            out[key] = _place(src[key], like)
        else:  # a skipped part: zero weights, norm gains 1 (the zeros after the norm make its output 0 anyway)
            fill = torch.ones if key.endswith(norms) else torch.zeros
            out[key] = fill(like.shape, dtype=emb.dtype, device=emb.device)
    full.load_state_dict(out, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        full.tie_weights()
    return full.eval()


def _place(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tensor `t` of the per-layer model in the leading corner of zeros shaped like the uniform model's tensor.
    Query heads then sit group by group (a layer keeping k of K KV groups has its k groups' heads first), so every
    zero query head reads a zero KV head."""
    if t.shape == like.shape:
        return t.clone()
    out = torch.zeros(like.shape, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
