"""Evaluation: windowed perplexity, held-out loss, lm-eval-exact zero-shot tasks, speed and memory.

Scoring follows lm-evaluation-harness 0.4.x (HFLM, causal): a request (context, continuation) is
tokenized as enc(context + continuation) and enc(context) with the tokenizer's default special tokens;
trailing spaces of the context move to the continuation; the continuation tokens are
whole[len(enc(context)):]; inputs longer than the model's max length keep their last max_length+1
tokens. The score is the fp32 sum of the continuation tokens' log-softmax. `acc` takes the argmax of
the sums, `acc_norm` the argmax of sum / len(choice) in characters, stderr = sample std / sqrt(n).
LAMBADA: acc = every continuation token is the greedy argmax; perplexity = exp(-mean item log-lik).

Perplexity as the pruning papers measure it (LLM-Pruner, Minitron tables): WikiText-2 raw test rows
joined with "\\n\\n", tokenized once, non-overlapping windows of `window` tokens (last partial window
dropped), exp of the mean NLL of the window-1 predicted tokens of every window.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minitron.arch.adapters import prefill_kwargs
from minitron.arch.models import load_model, parse_dtype, resolve_device, token_nll_sum
from minitron.data.corpus import data_dir, load_splits, report_blocks
from minitron.eval import tasks as T

# the convention of the pruning papers' average: acc_norm for these, acc for every other task
NORM_TASKS = ("hellaswag", "arc_challenge", "openbookqa")
WIKITEXT_FILE = "wikitext-2-raw/wiki.test.raw"


# ---------------------------------------------------------------- tokenization (lm-eval rules)
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context, continuation) -> (context ids, continuation ids) exactly as lm-eval's HFLM does."""
    if context == "":  # lm-eval conditions on the prefix token (BOS, else EOS)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    # default special tokens, except for text that already starts with the prefix token's text (as lm-eval)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    special = prefix is None or not context.startswith(tokenizer.decode(prefix))
    whole = tokenizer.encode(context + continuation, add_special_tokens=special)
    ctx = tokenizer.encode(context, add_special_tokens=special)
    return ctx, whole[len(ctx):]


def model_max_length(model, default: int = 2048) -> int:
    """lm-eval's max_length: the config's position limit, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    return default


# ---------------------------------------------------------------- batched log-likelihood
def _logits_from(model, ids: torch.Tensor, mask: torch.Tensor, lo: int) -> torch.Tensor:
    """Logits of positions lo.. of ids [B, T] -> [B, T - lo, V]; the LM head runs on those positions
    only where the model takes `logits_to_keep` (transformers' causal LMs), else all are sliced."""
    try:
        keep = torch.arange(lo, ids.shape[1], device=ids.device)
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    except TypeError:  # a model class without logits_to_keep
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, lo:]

@torch.no_grad()
def score_requests(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8,
                   pad_id: int = 0, desc: str | None = None) -> list[tuple[float, bool]]:
    """Sum of continuation log-probs and whether every continuation token is the greedy argmax.

    pairs: (context ids, continuation ids). The model input of a pair is (context + continuation)[:-1]
    (its last max_length + 1 tokens first); pairs with the same input (e.g. " yes"/" no" or MMLU's
    letters after one context) share one row. Rows are sorted longest first, right-padded with an
    attention mask, and only continuation positions go through the LM head; a row's scores do not
    depend on its batch (batched == unbatched up to float rounding). Returns one tuple per pair.
    """
    device = next(model.parameters()).device
    max_len = model_max_length(model)
    rows: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of the pairs it scores
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError("a continuation tokenized to zero tokens; check the task's continuation strings")
        rows.setdefault(tuple((ctx + cont)[-(max_len + 1):][:-1]), []).append(i)
    order = sorted(rows, key=len, reverse=True)
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = order[start:start + batch_size]
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for r, seq in enumerate(batch):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        # positions whose logits predict continuation tokens: [len - contlen, len) per pair
        lo = min(len(seq) - len(pairs[i][1]) for seq in batch for i in rows[seq])
        logits = _logits_from(model, ids.to(device), mask.to(device), lo)  # [B, width - lo, V]
        for r, seq in enumerate(batch):
            for i in rows[seq]:
                cont = pairs[i][1]
                sel = logits[r, len(seq) - len(cont) - lo:len(seq) - lo].float().log_softmax(-1)  # [C, V]
                target = torch.tensor(cont, device=device)  # [C]
                ll = sel.gather(-1, target[:, None]).sum().item()
                out[i] = (ll, bool((sel.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std / sqrt(n) (lm-eval's mean_stderr)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def score_task(model, tokenizer, task: T.Task, batch_size: int = 8, progress: bool = True) -> dict:
    """Score a task's items -> metrics and per-item results (lls, predictions)."""
    flat = [(i, req) for i, item in enumerate(task.items) for req in item.requests]
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    pairs = []
    for _, req in flat:
        if req not in cache:
            cache[req] = encode_pair(tokenizer, *req)
        pairs.append(cache[req])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_requests(model, pairs, batch_size, pad_id, desc=task.name if progress else None)
    lls: list[list[float]] = [[] for _ in task.items]
    greedy: list[list[bool]] = [[] for _ in task.items]
    for (i, _), (ll, g) in zip(flat, scores, strict=True):
        lls[i].append(ll)
        greedy[i].append(g)
    res: dict = {"n": len(task.items), "source": task.source}
    if task.note:
        res["note"] = task.note
    if task.kind == "loglikelihood":
        acc = [float(g[0]) for g in greedy]
        res["acc"], res["acc_stderr"] = _mean_stderr(acc)
        res["perplexity"] = math.exp(-sum(x[0] for x in lls) / len(lls))
        res["items"] = {"ll": [x[0] for x in lls], "greedy": [g[0] for g in greedy]}
        return res
    pred = [T._argmax_first(x) for x in lls]
    pred_norm = [T._argmax_first([v / len(c) for v, c in zip(x, item.choices, strict=True)]) for x, item in zip(lls, task.items, strict=True)]
    golds = [item.gold for item in task.items]
    res["acc"], res["acc_stderr"] = _mean_stderr([float(p == g) for p, g in zip(pred, golds, strict=True)])
    res["acc_norm"], res["acc_norm_stderr"] = _mean_stderr([float(p == g) for p, g in zip(pred_norm, golds, strict=True)])
    res["items"] = {"ll": lls, "pred": pred, "pred_norm": pred_norm, "gold": golds}
    return res


# ---------------------------------------------------------------- perplexity
def wikitext_ids(tokenizer, root: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> torch.Tensor:
    """WikiText-2 raw test as the HF rows joined by "\\n\\n", tokenized once -> LongTensor [N]."""
    if path is None:
        base = data_dir(root)
        if base is None or not (base / WIKITEXT_FILE).is_file():
            raise T.TaskError(f"wikitext2 needs {WIKITEXT_FILE} under the data dir ({base}); pass --data-dir "
                              "or set MINITRON_DATA_DIR to a folder laid out like shared/data")
        path = base / WIKITEXT_FILE
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    rows = ["" if line.strip() == "" else line for line in lines]  # HF rows: blank " \n" lines are ""
    return torch.tensor(tokenizer("\n\n".join(rows))["input_ids"], dtype=torch.long)


@torch.no_grad()
def token_nll(model, blocks: torch.Tensor, batch_size: int = 1, desc: str | None = None) -> tuple[float, int]:
    """Summed NLL (fp32 per token, fp64 sum) of the T-1 predicted tokens of every block [N, T] -> (sum, count).
    Logits are made a chunk of tokens at a time (models.token_nll_sum), never [B, T, V]."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=desc is None, leave=False):
        s, n = token_nll_sum(model, blocks[start:start + batch_size].to(device))  # [B, T] -> sum, count
        total += s
        count += n
    return float(total), count


def windowed_perplexity(model, ids: torch.Tensor, window: int, batch_size: int = 1, limit: int | None = None,
                        desc: str | None = None) -> dict:
    """Non-overlapping windows of `window` tokens of ids [N] (partial last window dropped) -> ppl."""
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of {window}")
    if limit:
        n = min(n, limit)
    blocks = ids[: n * window].view(n, window)  # [W, window]
    total, count = token_nll(model, blocks, batch_size, desc)
    return {"perplexity": math.exp(total / count), "loss": total / count, "window": window,
            "windows": n, "tokens": count}


def heldout_loss(model, tokenizer, source: str, seq_len: int, batch_size: int = 1, limit: int | None = None,
                 root: str | os.PathLike | None = None, desc: str | None = None) -> dict:
    """Loss/perplexity on the report half of the validation split of any corpus minitron.data.corpus reads
    (load_splits' split; the other half is what pruning choices are made on)."""
    splits = load_splits(source, tokenizer, seq_len, data_root=root, lazy=True)  # reads only the blocks scored
    blocks = report_blocks(splits.validation, limit or None)                         # [N, T]
    total, count = token_nll(model, blocks, batch_size, desc)
    return {"loss": total / count, "perplexity": math.exp(total / count), "seq_len": seq_len,
            "blocks": blocks.shape[0], "tokens": count, "source": source}


# ---------------------------------------------------------------- speed and memory
class _PeakRSS:
    """Samples this process's resident memory in a thread; .peak in bytes (CPU memory measure)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PREFILL_REPEATS = 3  # timed prefill forwards per batch size and round, the fastest kept


@torch.no_grad()
def measure_speed(model, prompt_len: int = 128, decode_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 8),
                  seed: int = 0) -> dict:
    """Prefill and KV-cached greedy decode throughput at each batch size (seeded random prompts).

    prefill_tok_s[B] = B * prompt_len / time of one forward over [B, prompt_len] that, as a generation's prefill,
    computes the last position's logits only (adapters.prefill_kwargs; before 2026-12-07 every position's), the
    fastest of PREFILL_REPEATS such forwards (before 2026-12-07: one);
    decode_tok_s[B] = B * decode_tokens / time of decode_tokens single-token steps with the KV cache.
    """
    prefill = prefill_kwargs(model)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    res: dict = {"prompt_len": prompt_len, "decode_tokens": decode_tokens, "prefill_tok_s": {}, "decode_tok_s": {}}
    warm = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)  # [1, P]
    out = model(input_ids=warm, use_cache=True, **prefill)
    for _ in range(2):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    for bs in batch_sizes:
        ids = torch.randint(0, vocab, (bs, prompt_len), generator=gen).to(device)  # [B, P]
        prefill_s = float("inf")
        for _ in range(PREFILL_REPEATS):  # a single short call is at the mercy of a shared machine's hiccups
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **prefill)
            _sync(device)
            prefill_s = min(prefill_s, time.perf_counter() - t0)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        _sync(device)
        t2 = time.perf_counter()
        res["prefill_tok_s"][bs] = bs * prompt_len / prefill_s
        res["decode_tok_s"][bs] = bs * decode_tokens / (t2 - t1)
    return res


def _release(dev: torch.device) -> None:
    """Free what dropped Python references held: gc, the CUDA cache, and (glibc) heap pages returned to
    the OS so that the next resident-memory baseline does not hide a freed arena the next model reuses."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _memory_baseline(dev: torch.device) -> int:
    """Bytes in use before a model loads: CUDA memory_allocated on GPU, else this process's RSS."""
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _PeakRSS.rss()


def _speed_with_memory(model, dev: torch.device, before: int, *args) -> dict:
    """One measure_speed round plus the peak memory during it, minus `before` (_memory_baseline taken
    just before this model loaded, so weights count and models loaded earlier do not): CUDA
    max_memory_allocated on GPU; on CPU the peak resident memory of the process (sampled, approximate)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        r = measure_speed(model, *args)
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated_minus_before_load"
    else:
        with _PeakRSS() as mem:
            r = measure_speed(model, *args)
        peak, kind = mem.peak, "cpu_peak_rss_minus_before_load"
    r["peak_memory_mib"], r["memory_kind"] = (peak - before) / 2**20, kind
    return r


SPEED_METRICS = ("prefill_tok_s", "decode_tok_s")


def _keep_best(best: dict | None, r: dict) -> dict:
    """Fold one round r (a measure_speed result) into best (None before round 1): per metric and batch
    size the highest tok/s is kept, and best["all_rounds"][metric][B] lists every round's value in order."""
    if best is None:
        r["all_rounds"] = {k: {b: [v] for b, v in r[k].items()} for k in SPEED_METRICS}
        return r
    for k in SPEED_METRICS:
        for b, v in r[k].items():
            best["all_rounds"][k][b].append(v)
            best[k][b] = max(best[k][b], v)
    return best


def speed_phase(names: list[str], dev: torch.device, dtype: str, rounds: int, prompt_len: int,
                decode_tokens: int, batch_sizes: tuple[int, ...]) -> dict[str, dict]:
    """Best-of-`rounds` speed of every model, rounds interleaved across models so that load from other
    work on the machine hits all of them alike: A1 B1 A2 B2 ... All models are resident together (they
    must fit at once) and freed at the end.

    Memory is measured in round 1, which runs right after the model loads and before the next one
    loads, so only that model is running: its peak minus the baseline taken just before it loaded
    (_speed_with_memory). Models loaded earlier sit idle in that baseline, and their freed activations
    were trimmed before it, so each model's number is its own weights plus its own activations, as when
    it was measured alone. Later rounds only time.

    Returns name -> measure_speed's dict with prefill_tok_s / decode_tok_s {B: best tok/s},
    all_rounds {metric: {B: [tok/s per round]}}, rounds, peak_memory_mib, memory_kind, wall_s (the
    seconds of its own rounds).
    """
    if rounds < 1:
        raise ValueError(f"speed_rounds must be >= 1, got {rounds}")
    args = (prompt_len, decode_tokens, batch_sizes)
    models: dict = {}
    best: dict[str, dict] = {}
    wall: dict[str, float] = {}
    try:
        for name in dict.fromkeys(names):  # round 1: load, then time it alone with its memory
            _release(dev)
            before = _memory_baseline(dev)
            models[name] = load_model(name, dev, dtype, with_tokenizer=False)[0]
            t0 = time.perf_counter()
            best[name] = _keep_best(None, _speed_with_memory(models[name], dev, before, *args))
            wall[name] = time.perf_counter() - t0
        for _ in range(rounds - 1):
            for name in models:
                t0 = time.perf_counter()
                _keep_best(best[name], measure_speed(models[name], *args))
                wall[name] += time.perf_counter() - t0
    finally:
        models.clear()
        _release(dev)
    for name, r in best.items():
        r["rounds"], r["wall_s"] = rounds, wall[name]
    return best


# ---------------------------------------------------------------- the driver
def _headline(task: str, r: dict) -> float:
    return r["acc_norm"] if task in NORM_TASKS else r["acc"]


def _run_task(model, tok, name: str, t: str, loaded: dict, opts: dict) -> dict:
    """One non-speed task on a loaded model -> its result dict (see evaluate for the task names)."""
    desc = f"{name} {t}" if opts["progress"] else None
    if t == "wikitext2":
        ids = wikitext_ids(tok, opts["data_root"])
        window = opts["window"]
        return windowed_perplexity(model, ids, window, max(1, opts["batch_size"] * 256 // window), opts["limit"],
                                   desc)  # ~2k tokens of logits per forward
    if t.startswith("loss:"):
        return heldout_loss(model, tok, t[5:], opts["seq_len"], opts["batch_size"], opts["limit"],
                            opts["data_root"], desc)
    r = score_task(model, tok, loaded[t], opts["batch_size"], opts["progress"])
    if not opts["keep_items"]:
        r.pop("items")
    return r


def _task_phase(name: str, tasks: list[str], loaded: dict, dev: torch.device, dtype: str, opts: dict) -> dict:
    """Load one model, run the non-speed tasks on it, free it -> {"tasks": {task: result}, "wall_s": {task: s}}."""
    entry: dict = {"tasks": {}, "wall_s": {}}
    if not tasks:
        return entry
    _release(dev)
    model, tok = load_model(name, dev, dtype)
    for t in tasks:
        t0 = time.perf_counter()
        entry["tasks"][t] = _run_task(model, tok, name, t, loaded, opts)
        entry["wall_s"][t] = time.perf_counter() - t0
    del model
    _release(dev)
    return entry


def _add_speed_ratios(results: dict, first: str) -> None:
    """ratio_to_first of every model's speed result: {metric: {B: tok/s / first's}, peak_memory: ratio}."""
    ref = results["models"][first]["tasks"]["speed"]
    for e in results["models"].values():
        sp = e["tasks"]["speed"]
        sp["ratio_to_first"] = {k: {b: v / ref[k][b] for b, v in sp[k].items()} for k in SPEED_METRICS}
        sp["ratio_to_first"]["peak_memory"] = sp["peak_memory_mib"] / max(ref["peak_memory_mib"], 1e-9)


def evaluate(models: list[str], tasks: list[str], limit: int | None = None, batch_size: int = 8,
             device: str = "auto", dtype: str = "float32", out_dir: str | os.PathLike | None = None,
             data_root: str | os.PathLike | None = None, window: int = 2048, seq_len: int = 512,
             prompt_len: int = 128, decode_tokens: int = 32, speed_batch: int = 8, progress: bool = True,
             keep_items: bool = False, speed_rounds: int = 5, reuse: dict[str, dict] | None = None) -> dict:
    """Evaluate each model on each task; write results.json, results.md, results.png into out_dir.

    tasks: `wikitext2` (windowed ppl, `window` tokens), `loss:<corpus>` (held-out loss on the
    validation split of a corpus, blocks of `seq_len`), `speed` (prefill/decode tok/s, peak memory),
    or a zero-shot task name (minitron.eval.tasks). `limit` caps items (windows/blocks for perplexity).
    The non-speed tasks run one model at a time; then `speed` loads all models together and keeps each
    one's best of `speed_rounds` interleaved rounds (speed_phase). Ratios are to the first model.
    reuse: model -> an entry ({"tasks", "wall_s"}) already computed with these settings for every non-speed task
    (e.g. a teacher's cached scores): those tasks are not run again for that model.
    """
    dev = resolve_device(device)
    parse_dtype(dtype)
    if speed_rounds < 1:
        raise ValueError(f"speed_rounds must be >= 1, got {speed_rounds}")
    for t in tasks:  # fail on bad names and missing files before loading any model
        if t not in ("wikitext2", "speed") and not t.startswith("loss:"):
            T.task_file(t, data_root)
    loaded = {t: T.load_task(t, data_root, limit) for t in tasks
              if t not in ("wikitext2", "speed") and not t.startswith("loss:")}
    results: dict = {"config": {"models": models, "tasks": tasks, "limit": limit, "batch_size": batch_size,
                                "device": str(dev), "dtype": dtype, "window": window, "seq_len": seq_len,
                                "speed_rounds": speed_rounds},
                     "models": {}}
    opts = {"limit": limit, "batch_size": batch_size, "data_root": data_root, "window": window,
            "seq_len": seq_len, "progress": progress, "keep_items": keep_items}
    plain = [t for t in tasks if t != "speed"]
    for name in models:
        done = (reuse or {}).get(name)
        if done is not None and not set(plain) <= set(done["tasks"]):
            raise ValueError(f"reuse for {name} lacks the tasks {sorted(set(plain) - set(done['tasks']))}")
        results["models"][name] = ({"tasks": {t: done["tasks"][t] for t in plain},
                                    "wall_s": {t: done["wall_s"][t] for t in plain}} if done is not None
                                   else _task_phase(name, plain, loaded, dev, dtype, opts))
    if "speed" in tasks:
        speed = speed_phase(models, dev, dtype, speed_rounds, prompt_len, decode_tokens, (1, speed_batch))
        for name, r in speed.items():
            results["models"][name]["wall_s"]["speed"] = r.pop("wall_s")
            results["models"][name]["tasks"]["speed"] = r
        _add_speed_ratios(results, models[0])
    for entry in results["models"].values():
        entry["tasks"] = {t: entry["tasks"][t] for t in tasks}  # the order of `tasks`
        accs = [_headline(t, r) for t, r in entry["tasks"].items() if "acc" in r]
        if accs:
            entry["average"] = sum(accs) / len(accs)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


# ---------------------------------------------------------------- outputs
def _cell(task: str, r: dict) -> str:
    if task == "wikitext2":
        return f"{r['perplexity']:.2f} (w{r['window']})"
    if task.startswith("loss:"):
        return f"{r['loss']:.4f} / {r['perplexity']:.2f}"
    if task == "lambada":
        return f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}, ppl {r['perplexity']:.2f}"
    m = "acc_norm" if task in NORM_TASKS else "acc"
    return f"{r[m]:.4f} ± {r[m + '_stderr']:.4f}"


def _speed_caption(first: dict) -> str:
    """The line above the speed table: how the numbers were taken (results from before rounds: one run)."""
    n = first.get("rounds", 1)
    how = f"best of {n} interleaved rounds per model" if n > 1 else "one round per model"
    return (f"Speed: {how} (prompt {first['prompt_len']} tokens, {first['decode_tokens']} decoded tokens), "
            "ratios to the first model; peak memory from round 1.")


def markdown_table(results: dict) -> str:
    """Models x tasks (headline metric, see NORM_TASKS), plus the speed table with ratios to the first model."""
    tasks = [t for t in results["config"]["tasks"] if t != "speed"]
    labels = results.get("labels", {})  # model path -> a short name (set by the pipeline)
    lines = []
    if tasks:
        head = [f"{t} ({'acc_norm' if t in NORM_TASKS else 'ppl' if t == 'wikitext2' else 'loss / ppl' if t.startswith('loss:') else 'acc'})"
                for t in tasks]
        lines += ["| model | " + " | ".join(head) + " | average |", "|---" * (len(tasks) + 2) + "|"]
        for name, e in results["models"].items():
            avg = f"{e['average']:.4f}" if "average" in e else "-"
            lines.append(f"| {labels.get(name, name)} | " + " | ".join(_cell(t, e["tasks"][t]) for t in tasks) + f" | {avg} |")
    if "speed" in results["config"]["tasks"]:
        first = next(iter(results["models"].values()))["tasks"]["speed"]
        bss = list(first["prefill_tok_s"])
        cols = [f"prefill tok/s b{b}" for b in bss] + [f"decode tok/s b{b}" for b in bss] + ["peak MiB"]
        lines += ["", _speed_caption(first), "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, e in results["models"].items():
            s = e["tasks"]["speed"]
            vals = [(s["prefill_tok_s"][b], first["prefill_tok_s"][b]) for b in bss]
            vals += [(s["decode_tok_s"][b], first["decode_tok_s"][b]) for b in bss]
            cells = [f"{v:.0f} ({v / f:.2f}x)" for v, f in vals]
            cells.append(f"{s['peak_memory_mib']:.0f} ({s['peak_memory_mib'] / max(first['peak_memory_mib'], 1e-9):.2f}x)")
            lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(results: dict, path: str | os.PathLike) -> None:
    """Grouped bars: headline accuracy per task (and the average) for each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    tasks = [t for t in results["config"]["tasks"] if "acc" in next(iter(results["models"].values()))["tasks"].get(t, {})]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * (len(tasks) + 1) * max(1, len(models)) / 2), 4))
    if tasks:
        width = 0.8 / len(models)
        for k, name in enumerate(models):
            e = results["models"][name]
            vals = [_headline(t, e["tasks"][t]) for t in tasks] + [e.get("average", 0.0)]
            ax.bar([i + k * width for i in range(len(tasks) + 1)], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks) + 1)], tasks + ["average"], rotation=30)
        ax.set_ylabel("accuracy")
        ax.set_title("acc_norm for " + ", ".join(NORM_TASKS) + "; acc for the others", fontsize=9)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no accuracy tasks", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out_dir: str | os.PathLike) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown_table(results))
    bar_plot(results, out / "results.png")


# ---------------------------------------------------------------- CLI
def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity, zero-shot tasks (lm-eval scoring), speed and memory")
    p.add_argument("--model", action="append", required=True,
                   help="model: `default`, a HF dir or a hub id; repeat for side-by-side (ratios to the first)")
    p.add_argument("--tasks", default="wikitext2",
                   help="comma list: wikitext2, loss:<corpus>, speed, " + ", ".join(T.MC_TASKS))
    p.add_argument("--limit", type=int, default=None, help="first N items per task (windows/blocks for perplexity)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="eval-out", help="output dir: results.json, results.md, results.png")
    p.add_argument("--data-dir", default=None, help="task data folder laid out like shared/data (else $MINITRON_DATA_DIR)")
    p.add_argument("--window", type=int, default=2048, help="wikitext2 window length (papers: 128 or 2048)")
    p.add_argument("--seq-len", type=int, default=512, help="block length for loss:<corpus>")
    p.add_argument("--prompt-len", type=int, default=128, help="speed: prompt tokens")
    p.add_argument("--decode-tokens", type=int, default=32, help="speed: decoded tokens")
    p.add_argument("--speed-batch", type=int, default=8, help="speed: the larger batch (besides 1)")
    p.add_argument("--speed-rounds", type=int, default=5,
                   help="speed: rounds, interleaved across models; each model's best tok/s is kept")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(args.model, tasks, args.limit, args.batch_size, args.device, args.dtype, args.out,
                       args.data_dir, args.window, args.seq_len, args.prompt_len, args.decode_tokens,
                       args.speed_batch, speed_rounds=args.speed_rounds)
    print(markdown_table(results), end="")
    print(f"[minitron] wrote {Path(args.out) / 'results.json'}, results.md, results.png")
    return results
