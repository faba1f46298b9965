"""Write a Hugging Face causal LM as one GGUF file that llama.cpp runs.

    export_gguf(model, tokenizer, "runs/x/export/student-Q8_0.gguf", "q8_0")

The `gguf` package (llama.cpp's own writer) writes the file. What llama.cpp expects of each family lives
in one table, `GGUF_FAMILIES` (gguf_families.py): its llama.cpp architecture, how its rotary embedding is laid
out, the GGUF name of every tensor, and the quirks (norm weights stored as 1 + w, a graph that assumes
heads * head_dim == hidden). llama.cpp's `convert_hf_to_gguf.py` is the reference for names and metadata keys.

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

One concern per module: gguf_families (the table, resolve_family), gguf_tensors (weights -> GGUF tensors),
gguf_hparams (metadata keys), gguf_ssm (Mamba2 / NemotronH: tensors, keys, refusals), gguf_tokenizer
(tokenizer.ggml.* keys); this module holds the entry points, the types, the other refusals and the file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from minitron.arch import adapters as A
from minitron.arch.files import quiet_stderr
from minitron.arch.gguf_tokenizer import write_tokenizer
from minitron.export.families import GGUFExportError, GGUFFamily, _rope_params, resolve_family
from minitron.export.hparams import Provenance, _write_rope_scaling, write_general, write_hparams
from minitron.export.ssm import _check_ssm
from minitron.export.tensors import gguf_tensors

# ---- types --------------------------------------------------------------------------------------------

def _numpy_types() -> dict:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
            "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}


# llama.cpp file types reached through llama-cpp-python's llama_model_quantize (no numpy quantizer exists)
LLAMA_CPP_TYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
                   "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}
NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def row_multiple(qtype: str) -> int:
    """The row length (a matrix's input width) that GGUF type `qtype` quantizes: 1 for f32 / f16 / bf16; 32 for
    the block types (q8_0, q4_0, ...) and for the k-quants, whose 256-wide super-blocks llama.cpp replaces by a
    32-block fallback type on other rows. Rows that are not a multiple stay f16 (larger, slower files)."""
    t = check_type(qtype)
    return 1 if t in ("f32", "f16", "bf16") else 32


def check_type(qtype: str) -> str:
    """The lower-case type name, or GGUFExportError naming the types there are."""
    t = str(qtype).lower()
    if t in NUMPY_TYPES or t in LLAMA_CPP_TYPES:
        return t
    raise GGUFExportError(f"unknown GGUF type {qtype!r}: use one of {', '.join(NUMPY_TYPES)} (written in numpy), "
                          f"or a llama.cpp k-quant {', '.join(LLAMA_CPP_TYPES)} (needs llama-cpp-python: "
                          "pip install 'minitron[gguf-runtime]')")


# tensors llama.cpp's converter always keeps in f32, whatever the file type: the routers, the Mamba convolution and
# gated norm (besides every 1-D tensor and every tensor without a .weight suffix, such as ssm_a / ssm_d)
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight", "ssm_norm.weight")


# ---- refusals -----------------------------------------------------------------------------------------------

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


def export_gguf(model, tokenizer, path: str | os.PathLike, qtype: str = "f16", name: str | None = None,
                provenance: Provenance | None = None) -> dict:
    """Write `model` (a transformers causal LM of a family in GGUF_FAMILIES) and its fast tokenizer to `path`.

    provenance: who the model is, for general.* (name, size label, base model; see gguf_hparams.write_general);
    without one, general.name is `name`, else the name of the dir the model was loaded from.
    Returns what was written: file, type, architecture, bytes, tensor count per GGML type, the general.* naming
    keys, seconds.
    Raises GGUFExportError (a ValueError) for a family, config, tokenizer or type llama.cpp cannot take;
    nothing is left at `path` then."""
    import gguf

    qtype = check_type(qtype)
    path = Path(path)
    config = model.config
    check_config(config)
    prov = provenance or Provenance()
    fallback = name or prov.name or Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
    prov = Provenance(prov.hub_id, prov.base_model, prov.minitron, fallback)
    if qtype in LLAMA_CPP_TYPES:
        return _export_llama_cpp_quant(model, tokenizer, path, qtype, prov)
    family, fam = resolve_family(config)
    start = time.time()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
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
        ftype = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9}[qtype]
        general = write_general(w, prov, ftype)          # after the tensors: its size label counts them
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
            "general": general,
            "unquantized_rows": sorted(odd_rows), "seconds": round(time.time() - start, 2)}


def _export_llama_cpp_quant(model, tokenizer, path: Path, qtype: str, prov: Provenance) -> dict:
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
        info = export_gguf(model, tokenizer, f32, "f32", provenance=prov)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_CPP_TYPES[qtype]
        params.nthread = os.cpu_count() or 1
        with quiet_stderr():                                   # llama.cpp logs every tensor on stderr
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
    from minitron.arch.models import load_model
    from minitron.prune.plan import source_config

    qtype = check_type(qtype)
    check_config(source_config(model))                # refuse before the weights are read
    local = Path(model).expanduser()
    prov = model_provenance(model)
    target = Path(out) if out else (local if local.is_dir() else Path("."))
    if target.suffix != ".gguf":
        target = target / gguf_file_name(prov.name, qtype)
    if target.exists() and not overwrite:
        raise GGUFExportError(f"{target} exists: pass --overwrite to replace it, or choose another --out")
    loaded, tok = load_model(model, "cpu", "float32")
    info = export_gguf(loaded, tok, target, qtype, provenance=prov)
    print(f"[minitron] export: {target} ({info['architecture']}, {qtype}, {info['bytes'] / 2**20:.1f} MiB, "
          f"tensors {info['tensor_types']})")
    return info


def model_provenance(model: str) -> Provenance:
    """Who `model` (`default`, a hub id or a local dir) is, for the general.* keys (gguf_hparams.Provenance), from
    what minitron and Hugging Face record: `default` and a hub id are their hub id; a dir convert_gguf wrote names
    its hub id in minitron_source.json; a dir with a model card (README.md front matter, as llama.cpp's converter
    reads it) has the card's base_model, and is a minitron student when the card's tags say minitron; a dir a
    minitron stage wrote (stage.json) was made from the model its record read. The fallback name is the dir's."""
    import json

    from gguf.metadata import Metadata

    from minitron.arch.models import DEFAULT_HUB_ID, DEFAULT_MODEL, SOURCE_FILE, hub_id
    from minitron.data.fingerprint import RECORD

    if model == DEFAULT_MODEL:
        return Provenance(hub_id=DEFAULT_HUB_ID, name=DEFAULT_HUB_ID.split("/")[-1])
    local = Path(model).expanduser()
    if not local.is_dir():
        return Provenance(hub_id=model, name=model.split("/")[-1])
    if (local / SOURCE_FILE).is_file():
        return Provenance(hub_id=json.loads((local / SOURCE_FILE).read_text()).get("hub_id"), name=local.name)
    card = Metadata.load_model_card(local)
    base = card.get("base_model")
    if base:
        tags = card.get("tags") or []
        return Provenance(base_model=base[0] if isinstance(base, list) else str(base),
                          minitron="minitron" in tags, name=local.name)
    if (local / RECORD).is_file():                       # a stage's dir: pruned / distilled from the model it read
        inputs = json.loads((local / RECORD).read_text()).get("inputs", {})
        source = (inputs.get("model") or inputs.get("teacher") or {}).get("model")
        return Provenance(base_model=hub_id(source) if source else None, minitron=True, name=local.name)
    return Provenance(name=local.name)
