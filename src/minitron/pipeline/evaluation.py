"""The recipe's evaluation: `evaluate_recipe` (the harness with the recipe's limits) and the teacher's scores,
computed once and cached for every run with the same teacher and evaluation settings (`teacher_scores`)."""

from __future__ import annotations

import json
import os
import time

import minitron
from minitron.arch.files import digest
from minitron.arch.models import cache_dir
from minitron.data.fingerprint import corpus_identity, model_identity
from minitron.pipeline.recipe import RunConfig

CACHE_VERSION = 1          # bump when a score the cache holds would come out differently


def evaluate_recipe(cfg: RunConfig, models: list[str], tasks: list[str], reuse: dict | None = None) -> dict:
    """The recipe's evaluation of `models` on `tasks`: perplexity tasks with eval.ppl_limit, the others with
    eval.limit, merged model by model (minitron.eval.harness.evaluate; `reuse` as there)."""
    from minitron.eval.harness import evaluate

    e = cfg.eval
    ppl = [t for t in tasks if t == "wikitext2" or t.startswith("loss:")]
    results: dict = {}
    for part_tasks, limit in ((ppl, e.ppl_limit), ([t for t in tasks if t not in ppl], e.limit)):
        if not part_tasks:
            continue
        part = evaluate(models, part_tasks, limit=limit, batch_size=e.batch_size, device=cfg.model.device,
                        dtype=cfg.model.dtype, data_root=cfg.data.data_dir, window=e.window, seq_len=cfg.data.seq_len,
                        speed_rounds=e.speed_rounds, reuse=reuse)
        if not results:
            results = part
            continue
        for name, entry in part["models"].items():  # merge the two passes model by model
            mine = results["models"][name]
            mine["tasks"].update(entry["tasks"])
            mine["wall_s"].update(entry["wall_s"])
            if "average" in entry:
                mine["average"] = entry["average"]
        results["config"].update({k: v for k, v in part["config"].items() if k.startswith("speed")})
    return results


def _cache_key(cfg: RunConfig, teacher: str, tasks: list[str]) -> str:
    from minitron.data.corpus import data_dir
    from minitron.eval.harness import WIKITEXT_FILE

    e = cfg.eval
    inputs = {t: corpus_identity(t[5:], cfg.data.data_dir) for t in tasks if t.startswith("loss:")}
    if "wikitext2" in tasks:
        inputs["wikitext2"] = corpus_identity(str(data_dir(cfg.data.data_dir) / WIKITEXT_FILE))
    return digest({"v": CACHE_VERSION, "minitron": minitron.__version__, "teacher": model_identity(teacher),
                   "tasks": tasks, "limit": e.limit, "ppl_limit": e.ppl_limit, "batch_size": e.batch_size,
                   "window": e.window, "seq_len": cfg.data.seq_len, "val_fraction": cfg.data.val_fraction,
                   "seed": cfg.data.seed, "device": cfg.model.device, "dtype": cfg.model.dtype, "inputs": inputs})[:24]


def teacher_scores(cfg: RunConfig, teacher: str) -> dict:
    """The teacher's results on the recipe's non-speed tasks ({"tasks", "wall_s"}) and the seconds of one speed
    round ("speed_round_s", when the recipe measures speed), computed once and cached by teacher identity and
    evaluation settings in <cache>/teacher_scores/."""
    tasks = [t for t in cfg.eval.tasks if t != "speed"]
    path = cache_dir() / "teacher_scores" / f"{_cache_key(cfg, teacher, tasks)}.json"
    entry = json.loads(path.read_text()) if path.is_file() else None
    if entry is not None:
        print(f"[minitron] the teacher's scores on {', '.join(tasks)}: reused from {path}")
        if "speed" not in cfg.eval.tasks or "speed_round_s" in entry:
            return entry
    if entry is None:
        entry = evaluate_recipe(cfg, [teacher], tasks)["models"][teacher] if tasks else {"tasks": {}, "wall_s": {}}
    if "speed" in cfg.eval.tasks:  # (a cached entry of a run without speed gains it)
        entry["speed_round_s"] = _speed_round_seconds(cfg, teacher)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=1))
    os.replace(tmp, path)
    return entry


def _speed_round_seconds(cfg: RunConfig, teacher: str) -> float:
    """Seconds of one speed round of the teacher (the final evaluation runs eval.speed_rounds of them)."""
    from minitron.arch.models import load_model, resolve_device
    from minitron.eval.harness import measure_speed

    model = load_model(teacher, resolve_device(cfg.model.device), cfg.model.dtype, with_tokenizer=False)[0]
    t0 = time.perf_counter()
    measure_speed(model)
    return time.perf_counter() - t0


