"""The weights of a model as GGUF tensors: renamed through the family table, q/k rows permuted for llama.cpp's
rope, fused Phi-3 projections and MoE experts split, norms shifted, rope factor tensors (Mamba2 / NemotronH:
gguf_ssm.ssm_tensors).
"""

from __future__ import annotations

import math
import re

import torch

from minitron.arch import adapters as A
from minitron.arch import layerwise
from minitron.export.families import (
    _GLOBAL,
    DECI_ZERO_FFN,
    GGUFExportError,
    GGUFFamily,
    _rope_params,
    _rotary_dims,
    resolve_family,
)
from minitron.export.ssm import ssm_tensors


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
    deci = fam.arch == "deci"  # per-layer widths (minitron.arch.layerwise)
    widths = layerwise.layer_widths(config) if deci else None
    heads, kv = (0, 0) if deci else (config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads)
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
                                      "parts its family table in minitron/export/families.py does not know")
            prefix = f"blk.{m.group(1)}."
            if deci:
                heads, kv = widths[int(m.group(1))].heads, widths[int(m.group(1))].kv_heads
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
    if deci:
        out += _deci_zero_mlps(config, widths)
    extra = _rope_factor_tensors(config, fam)
    return out + extra


def _deci_zero_mlps(config, widths) -> list[tuple[str, torch.Tensor]]:
    """The zero MLP (DECI_ZERO_FFN neurons, norm gain 1) of every layer with attention and no MLP: llama.cpp's deci
    graph skips the residual add of a layer whose n_ff is 0; a zero MLP adds 0, exactly."""
    c, f = config.hidden_size, DECI_ZERO_FFN
    out = []
    for i, w in enumerate(widths):
        if w.heads and not w.ffn:
            out += [(f"blk.{i}.ffn_norm.weight", torch.ones(c)), (f"blk.{i}.ffn_gate.weight", torch.zeros(f, c)),
                    (f"blk.{i}.ffn_up.weight", torch.zeros(f, c)), (f"blk.{i}.ffn_down.weight", torch.zeros(c, f))]
    return out


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
    if rp["rope_type"] == "llama3" and fam.arch in ("llama", "deci"):
        return [("rope_freqs.weight", _llama3_rope_freqs(config, rp))]
    if rp["rope_type"] in ("longrope", "su") and fam.arch == "phi3":
        return [("rope_factors_long.weight", torch.tensor(rp["long_factor"], dtype=torch.float32)),
                ("rope_factors_short.weight", torch.tensor(rp["short_factor"], dtype=torch.float32))]
    return []

