"""A fast tokenizer's tokenizer.json as llama.cpp stores it (tokenizer.ggml.* keys), and back: byte-level BPE with a
pre-tokenizer llama.cpp knows, or sentencepiece-style BPE with byte fallback; anything llama.cpp would split
differently is refused.

tokenizer.ggml.pre is chosen as llama.cpp's convert_hf_to_gguf.py chooses it: the sha256 of the ids the tokenizer
gives its check text, looked up in llama.cpp's table (check_hash, LLAMA_CPP_PRE_HASHES); a tokenizer not in the
table falls back, with a warning, to the pre-tokenizer whose splitting its tokenizer.json spells out. A GGUF's
tokenizer is rebuilt as a tokenizer.json whose pre-tokenizer splits as the file's tokenizer.ggml.pre says
(tokenizer_from_gguf: transformers' own reader keeps a plain byte-level split for e.g. SmolLM's `smollm`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path


class GGUFExportError(ValueError):
    """The model, its tokenizer or the requested type cannot be written as GGUF; the message says the fix.
    (Defined here, the lowest module that raises it; minitron.export.families re-exports it.)"""


_GPT2_SPLIT = None  # the ByteLevel pre-tokenizer's own regex (GPT-2's)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# a byte-level BPE pre-tokenizer (as in tokenizer.json) -> llama.cpp's tokenizer.ggml.pre that splits the same way
# (llama.cpp's smollm: the regex \p{N} (every digit alone), then GPT-2's; HF spells it Digits + ByteLevel)
_PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",
    (("Split", _QWEN2_SPLIT), "ByteLevel-noregex"): "qwen2",
    (("Split", _LLAMA3_SPLIT), "ByteLevel-noregex"): "llama-bpe",
}

# llama.cpp's check text and the tokenizers it recognizes by the sha256 of str(tokenizer.encode(CHKTXT)): data
# copied from llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre, written by convert_hf_to_gguf_update.py),
# the entries for the tokenizers of the families minitron exports and their close kin
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple "
          "emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
          "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
          "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e "
          "\u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? "
          "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
LLAMA_CPP_PRE_HASHES = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",        # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",       # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",    # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",    # Smaug-Llama-3-70B-Instruct
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",        # Qwen/Qwen1.5-7B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",         # OLMo-1.7-7B-hf (= mpt's)
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",         # databricks/dbrx-base
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",      # tiiuae/Falcon3-7B-Base
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",       # Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",      # mistral-community/pixtral-12b
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",        # microsoft/phi-2
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",       # Xenova/gpt-4o
}


def check_hash(tokenizer) -> str:
    """llama.cpp's chkhsh: sha256 of the text of the id list the tokenizer gives CHKTXT (special tokens added
    as the tokenizer adds them, as the converter's tokenizer.encode does)."""
    return hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


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
    return GGUFVocab("gpt2", choose_pre(tokenizer, spec, decoder), tokens, types, merges)


def choose_pre(tokenizer, spec: dict, decoder: str | None) -> str:
    """tokenizer.ggml.pre of a byte-level BPE tokenizer, as llama.cpp's converter chooses it: its check hash in
    llama.cpp's table. A tokenizer not in the table gets the pre-tokenizer its tokenizer.json spells out (with a
    warning: llama.cpp's converter would refuse it); one that is neither is refused (GGUFExportError)."""
    sig = _pre_signature(spec.get("pre_tokenizer"))
    spelled = _PRE_TOKENIZERS.get(sig) if decoder == "ByteLevel" else None
    known = LLAMA_CPP_PRE_HASHES.get(check_hash(tokenizer))
    if known:
        if spelled and spelled != known:
            print(f"[minitron] gguf: the tokenizer's vocabulary is llama.cpp's {known!r} (by its check hash), but its "
                  f"tokenizer.json splits text as {spelled!r}: the GGUF says {known!r}, as llama.cpp's converter would; "
                  "llama.cpp will split some text (e.g. digits, runs of spaces) differently from this tokenizer.json")
        return known
    if spelled is None:
        raise GGUFExportError(
            f"llama.cpp has no pre-tokenizer matching this tokenizer's ({sig}, decoder {decoder}): it would split "
            f"text differently and the model would see other tokens. Supported: byte-level BPE with "
            f"{', '.join(sorted(set(_PRE_TOKENIZERS.values())))}-style splitting, or sentencepiece-style BPE.")
    print(f"[minitron] gguf: llama.cpp does not know this tokenizer (its check hash is not in llama.cpp's table); "
          f"tokenizer.ggml.pre = {spelled!r}, the llama.cpp pre-tokenizer that splits text as its tokenizer.json does")
    return spelled


def hf_pre_tokenizer(pre: str):
    """The tokenizers pre-tokenizer that splits text as llama.cpp's tokenizer.ggml.pre `pre` does (the inverse of
    _PRE_TOKENIZERS; llama.cpp: llama-vocab.cpp's regex_exprs), or None for a pre this table lacks."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as P

    byte_level = P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    splits = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
    if pre == "gpt-2":
        return byte_level
    if pre == "smollm":                                  # \p{N} alone, then GPT-2's regex
        return P.Sequence([P.Digits(individual_digits=True), byte_level])
    if pre in splits:
        return P.Sequence([P.Split(Regex(splits[pre]), behavior="isolated", invert=False),
                           P.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    return None


def tokenizer_from_gguf(gguf_path: str | Path):
    """The tokenizer a GGUF file describes, as a transformers fast tokenizer: transformers' GGUF reader (tokens,
    merges, special tokens, chat template), with the pre-tokenizer set to split text as the file's
    tokenizer.ggml.pre says. Returns (tokenizer, pre: str | None). A pre this module cannot spell keeps
    transformers' split, with a warning that the tokenizer may split some text unlike llama.cpp."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    fields = GGUFReader(str(gguf_path)).fields
    text = {k: bytes(fields[k].parts[fields[k].data[0]]).decode() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre")
            if k in fields}
    pre = text.get("tokenizer.ggml.pre")
    if text.get("tokenizer.ggml.model") != "gpt2" or pre is None:
        return tokenizer, pre                            # sentencepiece-style: no pre-tokenizer to choose
    backend = tokenizer.backend_tokenizer
    spelled = _PRE_TOKENIZERS.get(_pre_signature(json.loads(backend.to_str()).get("pre_tokenizer")))
    wanted = hf_pre_tokenizer(pre)
    if spelled != pre and wanted is not None:
        backend.pre_tokenizer = wanted
    elif spelled != pre:
        print(f"[minitron] {gguf_path.name}: its tokenizer.ggml.pre {pre!r} has no tokenizer.json spelling here; the "
              "converted tokenizer keeps transformers' split and may split some text unlike llama.cpp")
    return tokenizer, pre


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

