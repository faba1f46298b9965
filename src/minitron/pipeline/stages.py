"""`minitron run`: the whole Minitron recipe as straight-line stage calls.

    correction -> importance -> search -> prune -> teacher_eval -> distill -> eval -> export -> report

(teacher_eval: the teacher's scores, cached per teacher and evaluation settings, measured before distillation so
that a budget, `budget.minutes`, can plan from them: minitron.pipeline.budget.)

Each stage writes into its own folder of the output dir, atomically (temp dir + rename), with a
`stage.json` that records what it was made from: its own settings, the fingerprints of the stages it
read, and the identity of every model and corpus it read (minitron.data.fingerprint). A rerun skips a stage
whose record is unchanged; a stage whose record changed is redone, and so is every later one (their
records hold its fingerprint), with a message naming what changed. Distillation resumes from its last
checkpoint when its record is unchanged. `from_stage` redoes a stage and everything after it. With
`iterative.budgets`, importance -> prune -> distill repeats once per budget on the current student
(the first paper's iterative schedule).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from minitron.arch import adapters as arch
from minitron.arch import ranks, runlog
from minitron.arch.files import atomic_dir
from minitron.arch.models import hub_id, load_config, load_model, save_model
from minitron.data.corpus import calibration_sample, load_splits, selection_blocks
from minitron.data.fingerprint import (
    corpus_identity,
    dir_identity,
    make_record,
    model_identity,
    stale_reason,
    write_record,
)
from minitron.distill.config import RESUMABLE_CHANGES, auto_lr
from minitron.pipeline.budget import budget_seconds, plan_distill
from minitron.pipeline.budget import finish as finish_budget
from minitron.pipeline.config import ConfigError, save_config
from minitron.pipeline.evaluation import teacher_scores
from minitron.pipeline.recipe import (  # noqa: F401 (the recipe's names are importable from here too)
    STAGES,
    CorrectionSection,
    DataSection,
    DistillSection,
    EvalSection,
    ExportSection,
    ImportanceSection,
    IterativeSection,
    ModelSection,
    RunConfig,
)
from minitron.prune.importance import ImportanceConfig, load_scores, save_scores, score_model
from minitron.prune.plan import PlanError, Target, parse_count, resolve_dims, source_config
from minitron.prune.search import save_table, search, target_of
from minitron.prune.trim import PruneConfig, prune

# ---- stage records: what each stage was made from ------------------------------------------------------

def _data(cfg: RunConfig) -> dict:
    """The data settings that change what a stage computes (data_dir only locates files: their identity
    is recorded instead)."""
    return {k: v for k, v in asdict(cfg.data).items() if k != "data_dir"}


def _corpus(cfg: RunConfig) -> dict:
    """The corpus' identity; a blend file (minitron.data.blends.read_blend) by each source's identity and weight."""
    from minitron.data.blends import blend_identity, is_blend

    if is_blend(cfg.data.corpus):
        return {"corpus": cfg.data.corpus, **blend_identity(cfg.data.corpus, cfg.data.data_dir)}
    return corpus_identity(cfg.data.corpus, cfg.data.data_dir)


def _resumable(section: str, values) -> tuple[dict, tuple[str, ...]]:
    """A distillation section (`distill`, `correction`) as a stage record holds it, and the dotted names of what
    it leaves out: the settings distillation itself resumes across (minitron.distill.config.RESUMABLE_CHANGES:
    eval_every, save_every, distributed, ...), so that changing them continues the distillation (or keeps a
    finished one) instead of redoing it."""
    settings = asdict(values)
    left_out = tuple(k for k in RESUMABLE_CHANGES if k in settings)
    return ({k: v for k, v in settings.items() if k not in left_out},
            tuple(f"{section}.{k}" for k in left_out))


def up_to_date(folder: Path, record: dict, marker: str, left_out: tuple[str, ...] = ()) -> bool:
    """True when `folder` holds this stage, finished (`marker` exists), made from `record`: skip it.
    A folder made from another record is removed, with a message naming what changed; an unfinished
    folder with the same record is left for the stage to resume. `left_out`: dotted settings the record leaves
    out on purpose; a record on disk from before, which still holds them, is compared without them.
    Decided by rank 0 under torchrun."""
    return ranks.main_only(lambda: _up_to_date(folder, record, marker, left_out))


def _up_to_date(folder: Path, record: dict, marker: str, left_out: tuple[str, ...] = ()) -> bool:
    if not folder.exists():
        return False
    reason = stale_reason(folder, record, left_out)
    if reason is None:
        if (folder / marker).exists():
            print(f"[minitron] {record['stage']}: up to date, skipped ({folder})")
            return True
        return False
    print(f"[minitron] {record['stage']}: redoing {folder} and every later stage, because {reason}")
    shutil.rmtree(folder)
    return False


# ---- stages ------------------------------------------------------------------------------------------

def stage_correction(cfg: RunConfig, out: Path) -> str:
    """Teacher correction (optional): returns the teacher to use from here on."""
    folder = out / "correction"
    if not cfg.correction.enabled:
        return cfg.model.teacher
    from minitron.distill import FINISHED, DistillConfig, can_resume, distill

    correction, left_out = _resumable("correction", cfg.correction)
    record = make_record("correction", {"correction": correction, "data": _data(cfg), "dtype": cfg.model.dtype},
                         {"teacher": model_identity(cfg.model.teacher), "corpus": _corpus(cfg)})
    if not up_to_date(folder, record, FINISHED, left_out):
        ranks.main_only(lambda: write_record(folder, record))
        distill(DistillConfig(student=cfg.model.teacher, teacher=None, out=str(folder), data=cfg.data.corpus,
                              tokens=cfg.correction.tokens, lr=cfg.correction.lr, min_lr=cfg.correction.lr / 10,
                              kd_weight=0.0, ce_weight=1.0, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                              split_seed=cfg.data.seed, val_fraction=cfg.data.val_fraction,
                              batch_size=cfg.correction.batch_size, grad_accum=cfg.correction.grad_accum,
                              autocast=cfg.correction.autocast, grad_checkpointing=cfg.correction.grad_checkpointing,
                              distributed=cfg.correction.distributed,
                              fsdp_reduce_every_micro=cfg.correction.fsdp_reduce_every_micro,
                              device=cfg.model.device, dtype=cfg.model.dtype, data_root=cfg.data.data_dir,
                              resume=can_resume(folder)))
    return str(folder)


def _depth_needs(cfg: RunConfig, model_name: str, target: Target | None) -> dict:
    """Which depth scores the importance pass computes: LM-loss / task blocks of the size the target drops."""
    config = source_config(model_name, cfg.model.trust_remote_code)
    if target is None:  # a search: Block Importance of every block size its depth candidates drop
        from minitron.prune.search import depth_block_sizes

        return {"n_drop": 0, "layer_metric": cfg.search.layer_metric, "contiguous": True,
                "bi_block_sizes": sorted({1, *depth_block_sizes(config, cfg.search)})}
    n_drop = arch.dims_of(config).layers - resolve_dims(config, target).layers
    n_drop = n_drop if not target.drop_layers else 0
    return {"n_drop": n_drop, "layer_metric": target.layer_metric, "contiguous": target.contiguous,
            "bi_block_sizes": [1, n_drop] if n_drop > 0 and target.contiguous else [1]}


def stage_importance(cfg: RunConfig, folder: Path, model_name: str, target: Target | None) -> Path:
    """Calibration pass on `model_name` by importance.criterion; scores.safetensors in `folder`."""
    depth = _depth_needs(cfg, model_name, target)
    record = make_record("importance", {"importance": asdict(cfg.importance), "data": _data(cfg),
                                        "dtype": cfg.model.dtype, "depth": depth},
                         {"model": model_identity(model_name), "corpus": _corpus(cfg)})
    if up_to_date(folder, record, "scores.safetensors"):
        return folder / "scores.safetensors"
    model, tok = load_model(model_name, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
    splits = load_splits(cfg.data.corpus, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed,
                         data_root=cfg.data.data_dir, lazy=True)  # the token store; blocks read as used
    calib = calibration_sample(splits.train, cfg.importance.calib_samples, cfg.data.seed)
    n_drop, metric, contiguous = depth["n_drop"], depth["layer_metric"], depth["contiguous"]
    lm = n_drop > 0 and metric == "lm-loss"
    imp = cfg.importance
    icfg = ImportanceConfig(imp.seq_agg, imp.batch_agg, imp.batch_size, lm_loss_layers=lm,
                            lm_loss_block_sizes=[n_drop] if lm and contiguous else [],
                            bi_block_sizes=depth["bi_block_sizes"])
    task = ((tok, metric[len("task:"):], [1, n_drop] if contiguous else [1], cfg.data.data_dir)
            if n_drop and metric.startswith("task:") else None)
    scores, meta = score_model(model, calib, selection_blocks(splits.validation, imp.heldout_samples), icfg,
                               imp.criterion, cfg.data.seed, task)
    ranks.main_only(lambda: _write_importance(folder, scores, meta, model_name, imp.criterion, record))
    return folder / "scores.safetensors"


def _write_importance(folder: Path, scores: dict, meta: dict, model_name: str, criterion: str, record: dict):
    from minitron.eval.report import plot_blocks, plot_importance

    with atomic_dir(folder) as tmp:
        save_scores(scores, tmp, {**meta, "model": model_name})
        plot_importance(scores, tmp / "importance.png", title=f"{criterion} importance of {model_name}")
        plot_blocks(scores, tmp / "blocks.png")
        write_record(tmp, record)


def stage_search(cfg: RunConfig, out: Path, teacher: str, scores_path: Path) -> Target:
    """Architecture search (optional): the best candidate's dims become the target."""
    folder, work = out / "search", out / "search_work"
    if not cfg.search.enabled:
        return cfg.target
    distill_settings, left_out = _resumable("distill", cfg.distill)
    record = make_record("search", {"search": asdict(cfg.search), "importance": asdict(cfg.importance),
                                    "distill": distill_settings, "data": _data(cfg), "dtype": cfg.model.dtype},
                         {"importance": dir_identity(scores_path.parent), "teacher": model_identity(teacher)})
    if not up_to_date(folder, record, "search.json", left_out):
        if ranks.size() > 1:
            raise ConfigError("the architecture search runs in one process: run `minitron search RECIPE` first "
                              "(no torchrun), then this torchrun command again; it reuses the finished search")
        shutil.rmtree(work, ignore_errors=True)  # candidates distilled for another search
        model, tok = load_model(teacher, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
        splits = load_splits(cfg.data.corpus, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed,
                             data_root=cfg.data.data_dir, lazy=True)  # the token store; blocks read as used
        validation = selection_blocks(splits.validation, cfg.importance.heldout_samples)
        train = _short_distiller(cfg, teacher, tok, work) if cfg.search.train_tokens > 0 else None
        rows = search(model, load_scores(scores_path)[0], validation, cfg.search, train=train,
                      batch_size=cfg.importance.batch_size)
        with atomic_dir(folder) as tmp:
            save_table(rows, tmp, cfg.search)
            write_record(tmp, record)
    best = json.loads((folder / "search.json").read_text())["rows"][0]["dims"]
    print(f"[minitron] search picked {best}")
    # MoE axes (experts, top-k, shared expert) included; per-layer widths spread as the recipe's target says
    return replace(target_of(arch.Dims(**best), cfg.search), layer_norm=cfg.target.layer_norm,
                   layer_floor=cfg.target.layer_floor, drop_parts=cfg.target.drop_parts)


def _short_distiller(cfg: RunConfig, teacher: str, tokenizer, work: Path):
    """train(model) for the search: save the candidate, distill it for search.train_tokens, reload."""
    from minitron.distill import distill

    counter = iter(range(10_000))

    def train(student):
        i = next(counter)
        cand = work / f"cand{i}"
        if not (cand / "model").is_dir():
            with atomic_dir(cand / "model") as tmp:
                save_model(student, tmp)
                tokenizer.save_pretrained(tmp)
        done = distill(_distill_config(cfg, teacher, str(cand / "model"), cand / "distill",
                                       cfg.search.train_tokens, eval_every=0, save_every=0, heldout=None))
        return load_model(str(done), cfg.model.device, cfg.model.dtype, with_tokenizer=False)[0]

    return train


def stage_prune(cfg: RunConfig, folder: Path, model_name: str, scores_path: Path, target: Target) -> Path:
    """Trim `model_name` to `target` with the saved scores (no recalibration)."""
    imp = cfg.importance
    record = make_record("prune", {"target": asdict(target), "importance": asdict(imp), "prune": asdict(cfg.prune),
                                   "data": _data(cfg),
                                   "dtype": cfg.model.dtype},
                         {"model": model_identity(model_name), "importance": dir_identity(scores_path.parent)})
    if up_to_date(folder, record, "plan.json"):
        return folder
    ranks.main_only(lambda: _prune(cfg, folder, model_name, scores_path, target, record))
    return folder


def _prune(cfg: RunConfig, folder: Path, model_name: str, scores_path: Path, target: Target, record: dict):
    imp = cfg.importance
    prune(PruneConfig(model=model_name, out=str(folder), target=target, calib_data=cfg.data.corpus,
                      calib_samples=imp.calib_samples, heldout_samples=imp.heldout_samples,
                      seq_len=cfg.data.seq_len, val_fraction=cfg.data.val_fraction, batch_size=imp.batch_size,
                      seq_agg=imp.seq_agg, batch_agg=imp.batch_agg, criterion=imp.criterion,
                      scores=str(scores_path), seed=cfg.data.seed, refit=cfg.prune.refit,
                      refit_samples=cfg.prune.refit_samples, refit_ridge=cfg.prune.refit_ridge,
                      device=cfg.model.device, dtype=cfg.model.dtype,
                      data_dir=cfg.data.data_dir, overwrite=True, trust_remote_code=cfg.model.trust_remote_code))
    write_record(folder, record)


def _distill_config(cfg: RunConfig, teacher: str, student: str, folder: Path, tokens: int, **over):
    from minitron.distill import DistillConfig, can_resume

    d = cfg.distill
    hidden = arch.dims_of(load_config(student)).hidden
    lr = auto_lr(hidden) if d.lr == "auto" else d.lr
    freeze = d.embeddings_frozen(hidden, arch.dims_of(load_config(teacher)).hidden if teacher is not None else None)
    kw = dict(student=student, teacher=teacher, out=str(folder), data=cfg.data.corpus, tokens=tokens,
              loss=d.loss, temperature=d.temperature, ce_weight=d.ce_weight, lr=lr,
              min_lr=lr / 10 if d.min_lr == "auto" else d.min_lr,
              batch_size=d.batch_size, grad_accum=d.grad_accum, seq_len=cfg.data.seq_len,
              val_fraction=cfg.data.val_fraction, eval_every=d.eval_every, save_every=d.save_every,
              topk_cache=str(Path(cfg.out) / "teacher_topk") if d.topk > 0 else None, topk=max(d.topk, 1),
              seed=cfg.data.seed, split_seed=cfg.data.seed, device=cfg.model.device, dtype=cfg.model.dtype,
              autocast=d.autocast, grad_checkpointing=d.grad_checkpointing, distributed=d.distributed,
              fsdp_reduce_every_micro=d.fsdp_reduce_every_micro,
              teacher_dtype=d.teacher_dtype, release_teacher=d.release_teacher, data_root=cfg.data.data_dir,
              heldout=d.heldout, freeze_embeddings=freeze,
              resume=can_resume(folder), progress=True)
    return DistillConfig(**{**kw, **over})


def stage_distill(cfg: RunConfig, folder: Path, teacher: str, student: Path, tokens: int,
                  plan: Callable[[], float] | None = None) -> Path:
    """Logit distillation of the pruned student (resumes an interrupted run; skips a finished one) for `tokens`,
    or, with `plan`, for the seconds of the run's budget that plan() says are left when it starts (the record
    holds the budget, not the seconds; a resumed run keeps the steps it planned). The top-k cache, when used, is
    keyed by the teacher's identity and rebuilt for another teacher."""
    from minitron.distill import FINISHED, distill

    distill_settings, left_out = _resumable("distill", cfg.distill)  # eval_every etc.: a changed one resumes
    if plan is not None:
        distill_settings.pop("tokens")  # the budget sizes it
    size = {"tokens": tokens} if plan is None else {"budget": asdict(cfg.budget)}
    record = make_record("distill", {"distill": distill_settings, **size, "data": _data(cfg),
                                     "dtype": cfg.model.dtype},
                         {"teacher": model_identity(teacher), "student": model_identity(str(student)),
                          "corpus": _corpus(cfg)})
    if up_to_date(folder, record, FINISHED, left_out):
        return folder
    ranks.main_only(lambda: write_record(folder, record))
    if plan is not None:
        return distill(_distill_config(cfg, teacher, str(student), folder, None, seconds=plan()))
    return distill(_distill_config(cfg, teacher, str(student), folder, tokens))


def stage_eval(cfg: RunConfig, folder: Path, models: dict[str, str], reuse: dict | None = None) -> dict:
    """Teacher and student(s) on the recipe's tasks; results.json / .md / .png. reuse: the teacher's cached
    scores (minitron.pipeline.evaluation.teacher_scores), so only the speed rounds run it again."""
    record = make_record("eval", {"eval": asdict(cfg.eval), "data": _data(cfg), "dtype": cfg.model.dtype},
                         {label: model_identity(name) for label, name in models.items()})
    if up_to_date(folder, record, "results.json"):
        return json.loads((folder / "results.json").read_text())
    from minitron.eval.harness import write_outputs
    from minitron.pipeline.evaluation import evaluate_recipe

    results = evaluate_recipe(cfg, list(models.values()), cfg.eval.tasks, reuse)
    e = cfg.eval
    results["config"].update(tasks=e.tasks, limit=e.limit, ppl_limit=e.ppl_limit)
    results["labels"] = {path: label for label, path in models.items()}
    with atomic_dir(folder) as tmp:
        write_outputs(results, tmp)
        write_record(tmp, record)
    return results


def stage_export(cfg: RunConfig, folder: Path, student: Path, card: dict) -> Path:
    """The final student: a plain HF dir with a model card (the card describes this run: it is redone
    whenever the student or the evaluation changed)."""
    settings = {"card": {k: v for k, v in card.items() if k not in ("plan", "results")}}
    if cfg.export.gguf or cfg.export.padded or cfg.export.nemotron_nas:
        settings["export"] = asdict(cfg.export)
    record = make_record("export", settings,
                         {"student": model_identity(str(student)), "eval": dir_identity(Path(card["eval_dir"]))})
    if up_to_date(folder, record, "config.json"):
        return folder
    from minitron.eval.report import write_model_card

    model, tok = load_model(str(student), "cpu", cfg.model.dtype, with_tokenizer=True)
    with atomic_dir(folder) as tmp:
        save_model(model, tmp)
        tok.save_pretrained(tmp)
        if cfg.export.gguf:  # export/student-<TYPE>.gguf and gguf.json (docs/export.md)
            from minitron.export.runtime import export_run_gguf

            card = {**card, "gguf": export_run_gguf(model, tok, tmp, cfg.export.gguf, cfg.model.teacher,
                                                    cfg.export.gguf_speed)}
            (tmp / "gguf.json").write_text(json.dumps(card["gguf"], indent=2))
        card = {**card, "layouts": _per_layer_layouts(cfg, model, tok, tmp)}
        write_model_card(tmp / "README.md", card)
        write_record(tmp, record)
    return folder


def _per_layer_layouts(cfg: RunConfig, model, tok, tmp: Path) -> list[str]:
    """export/padded and export/nemotron-nas of a per-layer student, as the recipe asks (minitron.export.per_layer);
    the folders written."""
    from minitron.arch import layerwise
    from minitron.export import per_layer

    if not layerwise.is_per_layer(model.config):
        if cfg.export.padded or cfg.export.nemotron_nas:
            print("[minitron] export: the student has uniform widths; export.padded / nemotron_nas apply to "
                  "per-layer students (target.layer_widths) and are skipped")
        return []
    done = []
    if cfg.export.padded:
        per_layer.write_padded(model, tok, tmp / "padded")
        done.append("padded")
    if cfg.export.nemotron_nas:
        per_layer.write_nemotron_nas(model, tok, tmp / "nemotron-nas")
        done.append("nemotron-nas")
    return done


# ---- the run -------------------------------------------------------------------------------------------

def clear_from(out: Path, stage: str) -> None:
    """Remove the folders of `stage` and every later stage, so they are redone."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    later = STAGES[STAGES.index(stage):]
    for name in later:
        shutil.rmtree(out / name, ignore_errors=True)
        for p in out.glob(f"step*/{name}"):
            shutil.rmtree(p, ignore_errors=True)
    if "search" in later:
        shutil.rmtree(out / "search_work", ignore_errors=True)
    (out / "report.md").unlink(missing_ok=True)


def remove_unused(out: Path, cfg: RunConfig) -> None:
    """Folders of stages this recipe does not run (left by an earlier recipe in the same out) are removed,
    so the report never shows them."""
    unused = [] if cfg.correction.enabled else ["correction"]
    if not cfg.search.enabled:
        unused += ["search", "search_work"]
    if cfg.iterative.budgets:
        unused += ["importance", "prune", "distill"]
    for name in unused:
        if (out / name).exists():
            print(f"[minitron] removing {out / name}: this recipe does not run that stage")
            shutil.rmtree(out / name)
    if budget_seconds(cfg) is None:
        (out / "budget.json").unlink(missing_ok=True)  # the plan of an earlier budgeted recipe
    steps = {f"step{i}" for i in range(1, len(cfg.iterative.budgets) + 1)}
    for p in out.glob("step*"):
        if p.is_dir() and p.name not in steps:
            shutil.rmtree(p)


def check_eval_inputs(cfg: RunConfig) -> None:
    """Fail at the start, not after distillation, when an evaluation file is missing."""
    from minitron.data.corpus import data_dir
    from minitron.eval import tasks as T
    from minitron.eval.harness import WIKITEXT_FILE

    for task in cfg.eval.tasks:
        if task == "wikitext2":
            base = data_dir(cfg.data.data_dir)
            if base is None or not (base / WIKITEXT_FILE).is_file():
                raise T.TaskError(f"eval task wikitext2 needs {WIKITEXT_FILE} under the data dir ({base}); set "
                                  "data.data_dir or MINITRON_DATA_DIR to a folder laid out like shared/data, "
                                  "or drop it from eval.tasks")
        elif task != "speed" and not task.startswith("loss:"):
            T.task_file(task, cfg.data.data_dir)


def check_target(cfg: RunConfig) -> None:
    """Architecture and target checked on the teacher's config, before any weight is read."""
    config = source_config(cfg.model.teacher, cfg.model.trust_remote_code)
    if cfg.iterative.budgets:
        budgets = [parse_count(b) for b in cfg.iterative.budgets]
        if budgets != sorted(budgets, reverse=True):
            raise PlanError(f"iterative.budgets must decrease, got {cfg.iterative.budgets}")
        resolve_dims(config, replace(cfg.target, params=budgets[0]))
    elif not cfg.search.enabled:
        resolve_dims(config, cfg.target)
    if cfg.export.gguf:  # a family or config llama.cpp cannot take fails now, not after distillation
        from minitron.export.gguf import check_config

        check_config(config)


def widths_for_gguf(cfg: RunConfig) -> RunConfig:
    """With a quantized export.gguf, the widths a budget or the search chooses are multiples of the type's row
    block (export_gguf.row_multiple: 32), so every matrix of the student quantizes; explicit target widths stay
    the user's, with a warning naming those llama.cpp will keep in f16. Returns the config the run records."""
    from minitron.export.gguf import row_multiple

    m = row_multiple(cfg.export.gguf) if cfg.export.gguf else 1
    if m == 1:
        return cfg
    target, search = (replace(sec, round_to=math.lcm(sec.round_to, m)) for sec in (cfg.target, cfg.search))
    if (target.round_to, search.round_to) != (cfg.target.round_to, cfg.search.round_to):
        print(f"[minitron] export.gguf={cfg.export.gguf}: hidden / MLP widths chosen in multiples of {m} "
              f"(target.round_to {cfg.target.round_to} -> {target.round_to}, search.round_to {cfg.search.round_to} "
              f"-> {search.round_to}) so that every matrix quantizes")
    odd = {k: v for k in ("hidden", "ffn", "shared_ffn") if (v := getattr(cfg.target, k)) and v % m}
    if odd:
        print(f"[minitron] warning: target {odd} not a multiple of {m}: llama.cpp keeps the matrices that read "
              f"them in f16 in the {cfg.export.gguf} file; choose multiples of {m} to quantize every matrix")
    return replace(cfg, target=target, search=search)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder; choose another out (e.g. out=runs/name)")


def run(cfg: RunConfig, from_stage: str | None = None) -> Path:
    """Teacher -> distilled, evaluated, exported student, in `cfg.out`."""
    cfg.check()
    cfg = widths_for_gguf(cfg)
    out = Path(cfg.out)
    check_out(out)
    check_eval_inputs(cfg)
    check_target(cfg)
    ranks.join(cfg.model.device)  # under torchrun: training and calibration use every rank (ranks.py)
    ranks.main_only(lambda: _prepare(cfg, out, from_stage))
    t0 = runlog.start(out, cfg.model.device)  # run_log.jsonl: code, machine, seconds per stage
    with runlog.stage(out, "correction"):
        teacher = stage_correction(cfg, out)
    if cfg.iterative.budgets:
        with runlog.stage(out, "iterative"):
            student = run_iterative(cfg, out, teacher)
    else:
        with runlog.stage(out, "importance"):
            scores = stage_importance(cfg, out / "importance", teacher, None if cfg.search.enabled else cfg.target)
        with runlog.stage(out, "search"):
            target = stage_search(cfg, out, teacher, scores)
            if target is not cfg.target and target.layers is not None:  # the pick may drop layers: block scores
                scores = _ensure_block_scores(cfg, out / "importance", teacher, target)
        with runlog.stage(out, "prune"):
            pruned = stage_prune(cfg, out / "prune", teacher, scores, target)
        with runlog.stage(out, "teacher_eval"):  # measured before distillation, which a budget plans from it
            reference = ranks.main_only(lambda: teacher_scores(cfg, teacher))
        plan = None
        if budget_seconds(cfg, ranks.size()) is not None:  # what is left of the budget, once distillation starts
            plan = lambda: ranks.main_only(lambda: plan_distill(cfg, out, t0, teacher, str(pruned), reference,  # noqa: E731
                                                                ranks.size()))
        with runlog.stage(out, "distill"):
            student = stage_distill(cfg, out / "distill", teacher, pruned, cfg.distill.tokens, plan)
    if not ranks.leave():  # rank 0 evaluates and exports alone
        return out
    with runlog.stage(out, "eval"):
        results = stage_eval(cfg, out / "eval", {"teacher": teacher, "student": str(student)},
                             None if cfg.iterative.budgets else {teacher: reference})
    with runlog.stage(out, "export"):
        stage_export(cfg, out / "export", student, _card(cfg, out, teacher, results))
    from minitron.eval.report import write_report

    finish_budget(out, t0, Path(student))
    write_report(out)
    runlog.end(out, t0)
    print(f"[minitron] done: student in {out / 'export'}, report in {out / 'report.md'}")
    return out


def _prepare(cfg: RunConfig, out: Path, from_stage: str | None) -> None:
    """The run's folder before the first stage: --from clears, unused stage folders go, recipe saved."""
    out.mkdir(parents=True, exist_ok=True)
    if from_stage:
        clear_from(out, from_stage)
    remove_unused(out, cfg)
    (out / "report.md").unlink(missing_ok=True)  # rewritten at the end: never describes another run
    save_config(cfg, out / "config.yaml")


def run_iterative(cfg: RunConfig, out: Path, teacher: str) -> Path:
    """Prune -> distill once per budget, each step re-scoring the current student; same total tokens."""
    budgets = [parse_count(b) for b in cfg.iterative.budgets]
    current = teacher
    tokens = cfg.distill.tokens // len(budgets)
    for i, budget in enumerate(budgets, 1):
        step = out / f"step{i}"
        target = replace(cfg.target, params=budget)
        scores = stage_importance(cfg, step / "importance", current, target)
        pruned = stage_prune(cfg, step / "prune", current, scores, target)
        current = str(stage_distill(cfg, step / "distill", teacher, pruned, tokens))
    return Path(current)


def run_search(cfg: RunConfig) -> Path:
    """`minitron search`: importance (cached) and the search stage alone; prints the table."""
    out = Path(cfg.out)
    check_out(out)
    source_config(cfg.model.teacher, cfg.model.trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    teacher = stage_correction(cfg, out)
    stage_search(cfg, out, teacher, stage_importance(cfg, out / "importance", teacher, None))
    print((out / "search" / "search.md").read_text())
    return out / "search"


def _ensure_block_scores(cfg: RunConfig, folder: Path, teacher: str, target: Target) -> Path:
    """Add LM-loss block scores that a depth target needs to an existing scores file (selection blocks). Under
    torchrun rank 0 alone computes them (layer_lm_loss is not split over ranks) and writes the file atomically;
    the others wait, as for the importance and prune stages, and every rank returns its path."""
    return ranks.main_only(lambda: _add_block_scores(cfg, folder, teacher, target))


def _add_block_scores(cfg: RunConfig, folder: Path, teacher: str, target: Target) -> Path:
    from minitron.prune.importance import layer_lm_loss

    path = folder / "scores.safetensors"
    scores, meta = load_scores(path)
    n_drop = arch.dims_of(source_config(teacher, cfg.model.trust_remote_code)).layers - target.layers
    if target.layer_metric != "lm-loss" or n_drop <= 0 or f"block_lm_loss.{n_drop}" in scores:
        return path
    model, tok = load_model(teacher, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
    splits = load_splits(cfg.data.corpus, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed,
                         data_root=cfg.data.data_dir, lazy=True)  # the token store; blocks read as used
    scores.update(layer_lm_loss(model, selection_blocks(splits.validation, cfg.importance.heldout_samples),
                                [1, n_drop], cfg.importance.batch_size))
    _replace_scores(scores, folder, meta)
    return path


def _replace_scores(scores: dict, folder: Path, meta: dict) -> None:
    """save_scores into a temp dir inside `folder`, then each file renamed over the old one (os.replace): a
    reader never sees, and a failed write never leaves, half a scores file."""
    tmp = Path(tempfile.mkdtemp(prefix=f".scores.tmp-{os.getpid()}-", dir=folder))
    try:
        save_scores(scores, tmp, meta)
        for name in ("scores.json", "scores.safetensors"):  # the .safetensors last: it is what readers load
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _card(cfg: RunConfig, out: Path, teacher: str, results: dict) -> dict:
    """What the model card says: provenance (the source model's hub id when it has one), recipe, data,
    tokens, scores."""
    plan_path = next(iter(sorted(out.glob("**/prune/plan.json"), reverse=True)), None)
    plan = json.loads(plan_path.read_text()) if plan_path else {}
    return {"source": cfg.model.teacher, "base_model": hub_id(cfg.model.teacher),
            "teacher": "the source model after teacher correction" if teacher != cfg.model.teacher else cfg.model.teacher,
            "recipe": str(out / "config.yaml"), "corpus": cfg.data.corpus, "distill_tokens": cfg.distill.tokens,
            "loss": cfg.distill.loss, "criterion": cfg.importance.criterion, "eval_dir": str(out / "eval"),
            "plan": plan, "results": results}
