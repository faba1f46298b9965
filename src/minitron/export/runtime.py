"""Run GGUF files under llama.cpp through llama-cpp-python (the optional `gguf-runtime` extra).

Logits, greedy generation, speed (prompt processing and generation, interleaved rounds, best kept) and
windowed perplexity on token ids made by the Hugging Face tokenizer, so that a llama.cpp figure and a
transformers figure score exactly the same tokens. Used by tests/test_gguf.py, benchmarks/gguf_bench.py and
the export stage of `minitron run` (export.gguf_speed).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from minitron.arch.files import quiet_stderr


class RuntimeMissing(ValueError):
    """llama-cpp-python is not installed."""


def llama_cpp():
    """The llama_cpp module, or RuntimeMissing saying how to install it."""
    try:
        import llama_cpp as lc
    except ImportError as e:
        raise RuntimeMissing("running GGUF files needs llama-cpp-python: pip install 'minitron[gguf-runtime]' "
                             "(PyPI has only its source: the install builds llama.cpp with cmake and a C++ compiler, "
                             "about 40 minutes on 2 cores)") from e
    return lc


def load(path: str | os.PathLike, n_ctx: int = 512, logits_all: bool = False, threads: int | None = None,
         kv_f32: bool = False):
    """A llama_cpp.Llama on the CPU (n_batch = n_ctx: a whole window is one batch). llama.cpp keeps its KV cache
    in f16 by default; kv_f32 keeps it in f32 (for exact comparisons with transformers)."""
    lc = llama_cpp()
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    threads = threads or os.cpu_count() or 1
    kv = {"type_k": lc.GGML_TYPE_F32, "type_v": lc.GGML_TYPE_F32} if kv_f32 else {}
    with quiet_stderr():
        return lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                        n_threads=threads, n_threads_batch=threads, seed=0, verbose=False, **kv)


def logits(llm, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of every position of ids (llm loaded with logits_all=True)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def generate(llm, prompt: str, max_tokens: int = 32) -> str:
    """Greedy completion of a prompt (llama.cpp's tokenizer, special tokens parsed)."""
    ids = llm.tokenize(prompt.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                       special=True)
    out = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        if tok == llm.token_eos() or len(out) >= max_tokens:
            break
        out.append(tok)
    return llm.detokenize(out).decode("utf-8", errors="replace")


def _one_speed(llm, prompt: list[int], gen: int) -> dict:
    """Prompt processing of len(prompt) tokens in one batch, then `gen` greedy single-token steps."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    for _ in range(gen):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": gen / (t2 - t1)}


def speed(paths: dict[str, str | os.PathLike], prompt_tokens: int = 128, gen_tokens: int = 32, rounds: int = 3,
          threads: int | None = None, seed: int = 0) -> dict[str, dict]:
    """Tokens/s of prompt processing and of generation (batch 1) of each GGUF file under llama.cpp.

    All models stay loaded; each round measures every model once in turn (interleaved, so a slow spell of
    the machine hits them alike) after one warm-up, and the best of the rounds is kept per model."""
    rng = np.random.default_rng(seed)
    models = {k: load(p, n_ctx=prompt_tokens + gen_tokens + 8, threads=threads) for k, p in paths.items()}
    prompts = {k: rng.integers(10, m.n_vocab(), prompt_tokens).tolist() for k, m in models.items()}
    for k, m in models.items():
        _one_speed(m, prompts[k][:16], 4)  # warm-up
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for k, m in models.items():
            r = _one_speed(m, prompts[k], gen_tokens)
            best[k] = {key: max(v, best.get(k, {}).get(key, 0.0)) for key, v in r.items()}
    for m in models.values():
        m.close()
    return {k: {**v, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "rounds": rounds,
                "threads": threads or os.cpu_count()} for k, v in best.items()}


def perplexity(path: str | os.PathLike, ids, window: int = 512, limit: int | None = None,
               threads: int | None = None) -> dict:
    """exp(mean NLL) of the window-1 predicted tokens of non-overlapping windows of ids [N] (the partial last
    window dropped) — evaluate.windowed_perplexity's windows, scored by llama.cpp."""
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.size // window
    if limit:
        n = min(n, limit)
    if n == 0:
        raise ValueError(f"{ids.size} tokens do not fill one window of {window}")
    llm = load(path, n_ctx=window, logits_all=True, threads=threads)
    total, count = 0.0, 0
    for w in range(n):
        block = ids[w * window:(w + 1) * window]
        lg = logits(llm, block.tolist())[:-1].astype(np.float64)       # [T-1, V]
        lg -= lg.max(axis=1, keepdims=True)
        logz = np.log(np.exp(lg).sum(axis=1))
        total += float((logz - lg[np.arange(window - 1), block[1:]]).sum())
        count += window - 1
    llm.close()
    return {"perplexity": math.exp(total / count), "loss": total / count, "window": window, "windows": n,
            "tokens": count}


def export_run_gguf(model, tokenizer, folder: Path, qtype: str, teacher: str | None = None,
                    measure: bool = False) -> dict:
    """The export stage's GGUF: student-<TYPE>.gguf in `folder`; with `measure`, the teacher exported to the same
    type in a temporary folder and both timed under llama.cpp (speed above). Returns what the card reports."""
    import tempfile

    from minitron.arch.models import hub_id
    from minitron.export.gguf import export_gguf, gguf_file_name
    from minitron.export.hparams import Provenance

    base = hub_id(teacher) if teacher else None          # general.name: "<teacher's name> Minitron <size>"
    info = export_gguf(model, tokenizer, Path(folder) / gguf_file_name("student", qtype), qtype,
                       provenance=Provenance(base_model=base, minitron=True, name="student"))
    info.pop("path")
    if measure and teacher:
        from minitron.arch.models import load_model

        llama_cpp()
        t_model, t_tok = load_model(teacher, "cpu", "float32")
        with tempfile.TemporaryDirectory() as tmp:
            t_info = export_gguf(t_model, t_tok, Path(tmp) / gguf_file_name("teacher", qtype), qtype,
                                 provenance=Provenance(hub_id=base, name="teacher"))
            s = speed({"teacher": t_info["path"], "student": Path(folder) / info["file"]})
        info["llama_cpp"] = {**s, "teacher_bytes": t_info["bytes"],
                             "prefill_speedup": s["student"]["prefill_tok_s"] / s["teacher"]["prefill_tok_s"],
                             "decode_speedup": s["student"]["decode_tok_s"] / s["teacher"]["decode_tok_s"]}
    return info
