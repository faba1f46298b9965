"""A compute budget for the whole recipe: `budget.minutes` of wall time (or `budget.gpu_hours` over the ranks).

How it is spent (`plan_distill`): the stages before distillation run as the recipe sets them and are timed; the
teacher's evaluation runs next and is timed (minitron.pipeline.evaluation.teacher_scores: cached for every later
run with the same teacher, tasks and data, so it is paid once per machine); the final evaluation (the student's
tasks and the speed rounds of both) and the export are reserved from those measurements, scaled by the student's
share of the teacher's parameters; distillation gets what is left, as a time budget that its loop turns into a
number of steps after timing its first ones (minitron.distill.loop.plan_steps). `budget.json` in the run folder
records the plan; `finish` adds what was spent, and the report shows both.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from minitron.distill.loop import SAVE_BYTES_PER_S
from minitron.pipeline.config import ConfigError
from minitron.pipeline.recipe import RunConfig

MIN_DISTILL_S = 30.0       # less than this left for distillation is an error, not a student


def budget_seconds(cfg: RunConfig, world: int = 1) -> float | None:
    """The run's wall-time budget in seconds: budget.minutes, or budget.gpu_hours shared by `world` GPUs."""
    b = cfg.budget
    if b.minutes is not None:
        return 60.0 * b.minutes
    if b.gpu_hours is not None:
        return 3600.0 * b.gpu_hours / max(1, world)
    return None


def _params(name: str) -> int:
    from minitron.prune.plan import count_params, source_config

    return count_params(source_config(name))["total"]


def plan_distill(cfg: RunConfig, out: Path, t0: float, teacher: str, student: str, teacher_entry: dict,
                 world: int = 1) -> float:
    """Seconds of the budget left for distillation: the budget, less what the run has spent so far, the final
    evaluation (the teacher's measured task time scaled by the student's share of its parameters, and speed rounds
    of both) and the export (writing the weights). Writes budget.json. Fails when less than MIN_DISTILL_S is left."""
    total = budget_seconds(cfg, world)
    spent = time.perf_counter() - t0
    n_student = _params(student)  # (a meta-device build each: once)
    share = n_student / _params(teacher)
    student_tasks = share * sum(teacher_entry["wall_s"].values())
    speed = cfg.eval.speed_rounds * teacher_entry.get("speed_round_s", 0.0) * (1 + share)
    export = 2.0 + 4 * n_student * (2 if cfg.export.gguf else 1) / SAVE_BYTES_PER_S
    left = total - spent - student_tasks - speed - export
    plan = {"run_t0": t0, "budget_s": round(total, 1), "spent_before_distill_s": round(spent, 1),
            "teacher_eval_s": round(sum(teacher_entry["wall_s"].values()), 1), "student_share": round(share, 4),
            "reserved": {"student_eval_s": round(student_tasks, 1), "speed_s": round(speed, 1),
                         "export_s": round(export, 1)},
            "distill_s": round(left, 1)}
    if left < MIN_DISTILL_S:
        raise ConfigError(f"budget: {total / 60:.1f} min leaves {left:.0f} s for distillation after {spent:.0f} s "
                          f"spent and {student_tasks + speed + export:.0f} s reserved for evaluation and export; "
                          f"raise budget.minutes (to at least {(total - left + 300) / 60:.0f} for 5 minutes of "
                          "distillation), or evaluate less (eval.tasks, eval.limit, eval.ppl_limit)")
    _write(out, plan)
    print(f"[minitron] budget {total / 60:.1f} min: {spent:.0f} s spent, {student_tasks + speed + export:.0f} s "
          f"reserved for evaluation and export -> {left:.0f} s of distillation")
    return left


def finish(out: Path, t0: float, distill_dir: Path) -> None:
    """Add what was spent to budget.json: the run's wall time, the distillation's plan (steps, tokens). Only when
    this invocation (started at t0) made the plan: a rerun that found distillation finished leaves it as it was."""
    path = out / "budget.json"
    plan = json.loads(path.read_text()) if path.is_file() else {}
    if plan.get("run_t0") != t0:
        return
    plan["spent_s"] = round(time.perf_counter() - t0, 1)
    plan["over_s"] = round(plan["spent_s"] - plan["budget_s"], 1)
    loop = distill_dir / "budget.json"
    if loop.is_file():
        plan["distill"] = json.loads(loop.read_text())
    _write(out, plan)


def _write(out: Path, plan: dict) -> None:
    tmp = out / "budget.json.tmp"
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, out / "budget.json")


# ---- the same plan before a run, from the recipe alone (minitron plan --estimate) ----------------------------

CPU_TFLOPS = 0.19     # achieved fp32 TFLOP/s of a distillation step on this project's 2-core CPU (270 tok/s, 70M/135M)
GPU_TFLOPS = 400.0    # assumed achieved bf16 TFLOP/s per GPU (an H100 at ~40% of its dense peak)
MC_REQUEST_TOKENS = 80    # tokens per multiple-choice request (context + one choice; PIQA ~83, ARC-Easy ~56 here)
MC_CHOICES = 3            # choices per item assumed (PIQA 2, ARC 4, HellaSwag 4)
MC_ITEMS_UNLIMITED = 2000  # items assumed per zero-shot task when eval.limit is null
WIKITEXT_TOKENS = 300_000  # WikiText-2 test, tokenized (a 50k-130k vocabulary)


def _compute_params(s) -> int:
    """Parameters one token's forward multiplies through (memory_terms.Shape): the embedding lookup is free, the
    LM head is not."""
    embed = s.vocab * s.hidden
    return s.params - embed * (1 if s.tied else 2) + embed


def distill_flops(cfg: RunConfig, shapes: dict) -> float:
    """FLOPs of one distillation token: the student's forward and backward (6 per parameter it multiplies
    through), the teacher's forward (2), less the LM head's weight gradient (2 V C) where distill.freeze_embeddings
    leaves it untrained."""
    t, s = shapes["teacher"], shapes["student"]
    frozen = cfg.distill.embeddings_frozen(s.hidden, t.hidden)
    return 6 * _compute_params(s) + 2 * _compute_params(t) - (2 * s.vocab * s.hidden if frozen else 0)


def estimate_lines(cfg: RunConfig, shapes: dict, world: int, cuda: bool, tflops: float | None = None) -> list[str]:
    """How `minitron run` would spend the recipe's budget, from FLOPs (2 per parameter a token passes forward, 6
    forward + backward) at an achieved `tflops` per device (default GPU_TFLOPS on CUDA, CPU_TFLOPS here): the
    stages before distillation, the teacher's and the student's evaluation, then the distillation tokens that
    the rest buys. An estimate for sizing the budget; the run itself plans from what it measures."""
    total = budget_seconds(cfg, world)
    if total is None:
        return []
    rate = (tflops or (GPU_TFLOPS if cuda else CPU_TFLOPS)) * 1e12 * world
    t, s = _compute_params(shapes["teacher"]), _compute_params(shapes["student"])
    e, seq = cfg.eval, cfg.data.seq_len
    imp = cfg.importance
    before = {"correction": 6 * t * cfg.correction.tokens if cfg.correction.enabled else 0,
              "importance": 2 * t * (imp.calib_samples + imp.heldout_samples * (2 + shapes["n_drop"])) * seq,
              # the hidden/MLP split (a few candidates scored); the refit: the teacher's and two student passes
              "prune": 2 * s * imp.heldout_samples * seq * 4
              + (0 if cfg.prune.refit == "none" else 2 * (t + 2 * s) * min(cfg.prune.refit_samples, imp.calib_samples) * seq)}
    axes = cfg.search.layer_widths if cfg.search.enabled else cfg.target.layer_widths
    if axes and cfg.target.layer_norm == "measured":  # per-layer widths measured: probes of each layer from it on
        from minitron.prune.per_layer import MEASURE_BLOCKS, MEASURED_LEVELS

        teacher = shapes["teacher"]
        head = teacher.vocab * teacher.hidden
        low = 0.0 if cfg.target.drop_parts else cfg.target.layer_floor  # no probe below a layer's floor
        probes = teacher.layers * (1 + sum(f > low for f in MEASURED_LEVELS)) * len(axes)
        before["prune"] += probes * 2 * (head + (t - head) / 2) * MEASURE_BLOCKS * seq
    if cfg.search.enabled:  # each candidate scored on the held-out blocks (MAX_MEASURED of them), the best trained
        from minitron.prune.search import MAX_MEASURED

        before["search"] = (MAX_MEASURED * 2 * s * imp.heldout_samples * seq
                            + cfg.search.max_candidates * (6 * s + 2 * t) * cfg.search.train_tokens)
    ppl = sum(min(e.ppl_limit or 10**9, WIKITEXT_TOKENS // e.window) * e.window if task == "wikitext2"
              else (e.ppl_limit or 64) * seq for task in e.tasks if task == "wikitext2" or task.startswith("loss:"))
    mc = sum(MC_CHOICES * (e.limit or MC_ITEMS_UNLIMITED) * MC_REQUEST_TOKENS for task in e.tasks
             if task != "speed" and task != "wikitext2" and not task.startswith("loss:"))
    evals = {"teacher_eval": 2 * t * (ppl + mc), "eval": 2 * s * (ppl + mc)}
    secs = {k: v / rate for k, v in {**before, **evals}.items() if v}
    left = total - sum(secs.values())
    per_token = distill_flops(cfg, shapes)
    tokens = max(0.0, left) * rate / per_token
    unit = f"{cfg.budget.gpu_hours:g} GPU-hours over {world} GPUs = " if cfg.budget.gpu_hours else ""
    lines = [f"Budget: {unit}{total / 60:.1f} min of wall time, spent as estimated from FLOPs at "
             f"{rate / world / 1e12:g} TFLOP/s achieved per {'GPU' if cuda else 'CPU process'} (the run plans from "
             "what it measures instead):", "", "| stage | minutes |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in secs.items()]
    lines.append(f"| distill | {max(0.0, left) / 60:.1f} (~{tokens / 1e6:,.1f}M tokens at "
                 f"{rate / per_token:,.0f} tokens/s) |")
    if left < MIN_DISTILL_S:
        lines.append("The budget leaves no time for distillation: raise budget.minutes / gpu_hours.")
    return lines
