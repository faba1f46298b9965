"""A fast tokenizer's tokenizer.json as llama.cpp stores it (tokenizer.ggml.* keys): byte-level BPE with a
pre-tokenizer llama.cpp knows, or sentencepiece-style BPE with byte fallback; anything llama.cpp would split
differently is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from minitron.gguf_families import GGUFExportError

_GPT2_SPLIT = None  # the ByteLevel pre-tokenizer's own regex (GPT-2's)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# a byte-level BPE pre-tokenizer (as in tokenizer.json) -> llama.cpp's tokenizer.ggml.pre that splits the same way
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
    (("Split", _QWEN2_SPLIT), "ByteLevel-noregex"): "qwen2",
    (("Split", _LLAMA3_SPLIT), "ByteLevel-noregex"): "llama-bpe",
}


def _pre_signature(pre: dict | None) -> tuple:
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else ([pre] if pre else [])
    sig = []
    for s in steps:
        if s["type"] == "ByteLevel":
            if s.get("add_prefix_space"):
                return ("ByteLevel+prefix-space",)
            sig.append("ByteLevel" if s.get("use_regex", True) else "ByteLevel-noregex")
        elif s["type"] == "Digits" and s.get("individual_digits"):
            sig.append("Digits")
        elif s["type"] == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            sig.append(("Split", s["pattern"].get("Regex")))
        else:
            sig.append(s["type"])
    return tuple(sig)


def _spm_prefix(spec: dict) -> bool | None:
    """Whether a sentencepiece-style tokenizer.json prepends '▁' (None: it does not escape spaces as '▁')."""
    norms = spec.get("normalizer") or {}
    norms = norms.get("normalizers", [norms]) if norms else []
    escapes = any(n.get("type") == "Replace" and n.get("content") == "\u2581" for n in norms)
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in norms)
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    return prepend if escapes else None


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it."""

    model: str                     # "gpt2" (byte-level BPE) | "llama" (sentencepiece-style BPE with byte fallback)
    pre: str | None
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Read a fast tokenizer's tokenizer.json into llama.cpp's form, padded to the model's vocab_size rows
    ([PADi] tokens, type UNUSED); raises GGUFExportError for a tokenizer llama.cpp would split differently."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise GGUFExportError("the tokenizer has no tokenizer.json (a slow, python-only tokenizer): save it as a fast "
                              "tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained) first")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise GGUFExportError(f"the tokenizer is a {model['type']} model; GGUF export writes BPE tokenizers only "
                              "(byte-level like GPT-2/Llama-3/Qwen, or sentencepiece-style with byte fallback)")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise GGUFExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows: "
                              "the tokenizer does not belong to this model")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [int(TokenType.UNUSED)] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        if i in added:
            types[i] = int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types[i] = int(TokenType.BYTE)
        else:
            types[i] = int(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        prefix = _spm_prefix(spec)
        if prefix is None:
            raise GGUFExportError("the tokenizer falls back to bytes but does not write spaces as '▁' the way "
                                  "sentencepiece does; llama.cpp's sentencepiece tokenizer would split it differently")
        rank = {}
        for r, m in enumerate(merges):                   # a merged piece's score: minus the rank that makes it
            rank.setdefault(m.replace(" ", "", 1), r)
        scores = [-float(rank.get(t, 0)) for t in tokens]
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = int(TokenType.UNKNOWN)
        return GGUFVocab("llama", None, tokens, types, merges, scores, add_space_prefix=prefix)
    decoder = (spec.get("decoder") or {}).get("type")
    sig = _pre_signature(spec.get("pre_tokenizer"))
    if decoder != "ByteLevel" or sig not in _PRE_TOKENIZERS:
        raise GGUFExportError(
            f"llama.cpp has no pre-tokenizer matching this tokenizer's ({sig}, decoder {decoder}): it would split "
            f"text differently and the model would see other tokens. Supported: byte-level BPE with "
            f"{', '.join(sorted(set(_PRE_TOKENIZERS.values())))}-style splitting, or sentencepiece-style BPE.")
    return GGUFVocab("gpt2", _PRE_TOKENIZERS[sig], tokens, types, merges)


def write_tokenizer(w, tokenizer, vocab_size: int) -> GGUFVocab:
    """tokenizer.ggml.* keys: model, pre, tokens, token types, merges (scores for sentencepiece), special ids,
    add_bos/add_eos as the tokenizer really adds them, and the chat template."""
    v = gguf_vocab(tokenizer, vocab_size)
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.merges:
        w.add_token_merges(v.merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and 0 <= tid < vocab_size:
            getattr(w, f"add_{kind}_token_id")(int(tid))
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    w.add_add_bos_token(bool(tokenizer.bos_token_id is not None and len(ids) > len(plain)
                             and ids[0] == tokenizer.bos_token_id))
    w.add_add_eos_token(bool(tokenizer.eos_token_id is not None and len(ids) > len(plain)
                             and ids[-1] == tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)
    return v

