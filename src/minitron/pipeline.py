"""`minitron run`: the whole Minitron recipe as straight-line stage calls.

    correction -> importance -> search -> prune -> distill -> eval -> export -> report

Each stage writes into its own folder of the output dir, atomically (temp dir + rename), so a folder
that exists is a finished stage and a rerun skips it; distillation resumes from its last checkpoint;
`from_stage` redoes a stage and everything after it. With `iterative.budgets`, importance -> prune ->
distill repeats once per budget on the current student (the first paper's iterative schedule).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from minitron import arch
from minitron.config import save_config
from minitron.data import calibration_sample, load_splits
from minitron.files import atomic_dir
from minitron.importance import (
    ImportanceConfig,
    compute_importance,
    config_meta,
    layer_task_accuracy,
    load_scores,
    save_scores,
)
from minitron.models import load_model
from minitron.plan import PlanError, Target, parse_count, resolve_dims
from minitron.prune import PruneConfig, prune
from minitron.search import SearchConfig, save_table, search

STAGES = ("correction", "importance", "search", "prune", "distill", "eval", "export", "report")


@dataclass
class ModelSection:
    teacher: str = "default"              # HF dir, hub id, or `default` (SmolLM2-135M-Instruct)
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class DataSection:
    corpus: str = "default"               # distillation / calibration corpus (minitron.data)
    seq_len: int = 256
    val_fraction: float = 0.05
    data_dir: str | None = None           # folder laid out like shared/data ($MINITRON_DATA_DIR)
    seed: int = 0


@dataclass
class CorrectionSection:
    enabled: bool = False                 # LM-loss fine-tune of the teacher on the corpus first
    tokens: int = 100_000
    lr: float = 1e-5


@dataclass
class ImportanceSection:
    calib_samples: int = 128
    heldout_samples: int = 16             # validation blocks for held-out loss and the LM-loss layer metric
    batch_size: int = 8
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    criterion: str = "activation"         # activation | magnitude | taylor | random


@dataclass
class DistillSection:
    tokens: int = 200_000
    loss: str = "fkl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    lr: float = 1e-4
    min_lr: float = 1e-5
    batch_size: int = 8
    grad_accum: int = 1
    eval_every: int = 25
    save_every: int = 25
    topk: int = 0                         # > 0: cache the teacher's top-k log-probs once and reuse them
    autocast: str = "none"                # none | bf16


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=lambda: ["wikitext2", "loss:default", "piqa", "arc_easy", "speed"])
    limit: int | None = 200               # items per zero-shot task
    ppl_limit: int | None = 20            # windows (wikitext2) / blocks (loss:...) per perplexity task
    batch_size: int = 8
    window: int = 2048


@dataclass
class IterativeSection:
    budgets: list[str] = field(default_factory=list)  # e.g. [100M, 70M]: one prune -> distill per budget


@dataclass
class RunConfig:
    """One recipe. The pruning target is `target` (or the search's pick, or the iterative budgets)."""

    out: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    correction: CorrectionSection = field(default_factory=CorrectionSection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    target: Target = field(default_factory=Target)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)
    iterative: IterativeSection = field(default_factory=IterativeSection)

    def check(self) -> None:
        if not (self.target.params or self.target.hidden or self.target.ffn or self.target.heads
                or self.target.kv_heads or self.target.layers or self.target.drop_layers
                or self.search.enabled or self.iterative.budgets):
            raise PlanError("the recipe prunes nothing: set target.params (e.g. 70M) or target dims, "
                            "or enable search / iterative")


# ---- stages ------------------------------------------------------------------------------------------

def stage_correction(cfg: RunConfig, out: Path) -> str:
    """Teacher correction (optional): returns the teacher to use from here on."""
    if not cfg.correction.enabled:
        return cfg.model.teacher
    from minitron.distill import DistillConfig, can_resume, distill

    folder = out / "correction"
    distill(DistillConfig(student=cfg.model.teacher, teacher=None, out=str(folder), data=cfg.data.corpus,
                          tokens=cfg.correction.tokens, lr=cfg.correction.lr, min_lr=cfg.correction.lr / 10,
                          kd_weight=0.0, ce_weight=1.0, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                          split_seed=cfg.data.seed,
                          device=cfg.model.device, dtype=cfg.model.dtype, data_root=cfg.data.data_dir,
                          resume=can_resume(folder)))
    return str(folder)


def stage_importance(cfg: RunConfig, folder: Path, model_name: str, target: Target | None) -> Path:
    """Calibration pass on `model_name`; scores.safetensors in `folder` (skipped when present)."""
    if (folder / "scores.safetensors").is_file():
        return folder / "scores.safetensors"
    model, tok = load_model(model_name, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
    splits = load_splits(cfg.data.corpus, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed,
                         data_root=cfg.data.data_dir)
    calib = calibration_sample(splits.train, cfg.importance.calib_samples, cfg.data.seed)
    src_layers = arch.dims_of(model.config).layers
    n_drop = src_layers - resolve_dims(model.config, target).layers if target is not None else 0
    lm_sizes = [n_drop] if n_drop and target.layer_metric == "lm-loss" and target.contiguous else []
    icfg = ImportanceConfig(cfg.importance.seq_agg, cfg.importance.batch_agg, cfg.importance.batch_size,
                            lm_loss_layers=n_drop > 0 and target.layer_metric == "lm-loss",
                            lm_loss_block_sizes=lm_sizes)
    scores = compute_importance(model, calib, icfg, heldout=splits.validation[: cfg.importance.heldout_samples])
    if n_drop and target.layer_metric.startswith("task:"):
        scores.update(layer_task_accuracy(model, tok, target.layer_metric[len("task:"):],
                                          [1, n_drop] if target.contiguous else [1],
                                          batch_size=cfg.importance.batch_size, data_root=cfg.data.data_dir))
    from minitron.report import plot_blocks, plot_importance

    with atomic_dir(folder) as tmp:
        save_scores(scores, tmp, {**config_meta(icfg, calib, arch.dims_of(model.config)), "model": model_name})
        plot_importance(scores, tmp / "importance.png", title=f"importance of {model_name}")
        plot_blocks(scores, tmp / "blocks.png")
    return folder / "scores.safetensors"


def stage_search(cfg: RunConfig, out: Path, teacher: str, scores_path: Path) -> Target:
    """Architecture search (optional): the best candidate's dims become the target."""
    if not cfg.search.enabled:
        return cfg.target
    folder = out / "search"
    if not (folder / "search.json").is_file():
        model, tok = load_model(teacher, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
        splits = load_splits(cfg.data.corpus, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed,
                             data_root=cfg.data.data_dir)
        validation = splits.validation[: cfg.importance.heldout_samples]
        train = _short_distiller(cfg, teacher, tok, folder) if cfg.search.train_tokens > 0 else None
        rows = search(model, load_scores(scores_path)[0], validation, cfg.search, train=train,
                      batch_size=cfg.importance.batch_size)
        with atomic_dir(folder) as tmp:
            save_table(rows, tmp, cfg.search)
    best = json.loads((folder / "search.json").read_text())["rows"][0]["dims"]
    print(f"[minitron] search picked {best}")
    return Target(hidden=best["hidden"], ffn=best["ffn"], heads=best["heads"], kv_heads=best["kv_heads"],
                  layers=best["layers"], layer_metric=cfg.search.layer_metric)


def _short_distiller(cfg: RunConfig, teacher: str, tokenizer, folder: Path):
    """train(model) for the search: save the candidate, distill it for search.train_tokens, reload."""
    from minitron.distill import distill

    work = folder.parent / "search_work"
    counter = iter(range(10_000))

    def train(student):
        i = next(counter)
        cand = work / f"cand{i}"
        if not (cand / "model").is_dir():
            with atomic_dir(cand / "model") as tmp:
                student.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        done = distill(_distill_config(cfg, teacher, str(cand / "model"), cand / "distill",
                                       cfg.search.train_tokens, eval_every=0, save_every=0))
        return load_model(str(done), cfg.model.device, cfg.model.dtype, with_tokenizer=False)[0]

    return train


def stage_prune(cfg: RunConfig, folder: Path, model_name: str, scores_path: Path, target: Target) -> Path:
    """Trim `model_name` to `target` with the saved scores (no recalibration)."""
    if (folder / "plan.json").is_file():
        return folder
    imp = cfg.importance
    return prune(PruneConfig(model=model_name, out=str(folder), target=target, calib_data=cfg.data.corpus,
                             calib_samples=imp.calib_samples, heldout_samples=imp.heldout_samples,
                             seq_len=cfg.data.seq_len, batch_size=imp.batch_size, seq_agg=imp.seq_agg,
                             batch_agg=imp.batch_agg, criterion=imp.criterion, scores=str(scores_path),
                             seed=cfg.data.seed, device=cfg.model.device, dtype=cfg.model.dtype,
                             data_dir=cfg.data.data_dir, overwrite=True,
                             trust_remote_code=cfg.model.trust_remote_code))


def _distill_config(cfg: RunConfig, teacher: str, student: str, folder: Path, tokens: int, **over):
    from minitron.distill import DistillConfig, can_resume

    d = cfg.distill
    kw = dict(student=student, teacher=teacher, out=str(folder), data=cfg.data.corpus, tokens=tokens,
              loss=d.loss, temperature=d.temperature, ce_weight=d.ce_weight, lr=d.lr, min_lr=d.min_lr,
              batch_size=d.batch_size, grad_accum=d.grad_accum, seq_len=cfg.data.seq_len,
              val_fraction=cfg.data.val_fraction, eval_every=d.eval_every, save_every=d.save_every,
              topk_cache=str(Path(cfg.out) / "teacher_topk") if d.topk > 0 else None, topk=max(d.topk, 1),
              seed=cfg.data.seed, split_seed=cfg.data.seed, device=cfg.model.device, dtype=cfg.model.dtype,
              autocast=d.autocast,
              data_root=cfg.data.data_dir, resume=can_resume(folder), progress=True)
    return DistillConfig(**{**kw, **over})


def stage_distill(cfg: RunConfig, folder: Path, teacher: str, student: Path, tokens: int) -> Path:
    """Logit distillation of the pruned student (resumes an interrupted run; skips a finished one)."""
    from minitron.distill import distill

    return distill(_distill_config(cfg, teacher, str(student), folder, tokens))


def stage_eval(cfg: RunConfig, folder: Path, models: dict[str, str]) -> dict:
    """Teacher and student(s) on the recipe's tasks; results.json / .md / .png."""
    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())
    from minitron.evaluate import evaluate, write_outputs

    e = cfg.eval
    ppl = [t for t in e.tasks if t == "wikitext2" or t.startswith("loss:")]
    results: dict = {}
    for tasks, limit in ((ppl, e.ppl_limit), ([t for t in e.tasks if t not in ppl], e.limit)):
        if not tasks:
            continue
        part = evaluate(list(models.values()), tasks, limit=limit, batch_size=e.batch_size, device=cfg.model.device,
                        dtype=cfg.model.dtype, data_root=cfg.data.data_dir, window=e.window, seq_len=cfg.data.seq_len)
        if not results:
            results = part
            continue
        for name, entry in part["models"].items():  # merge the two passes model by model
            mine = results["models"][name]
            mine["tasks"].update(entry["tasks"])
            mine["wall_s"].update(entry["wall_s"])
            if "average" in entry:
                mine["average"] = entry["average"]
    results["config"].update(tasks=e.tasks, limit=e.limit, ppl_limit=e.ppl_limit)
    results["labels"] = {path: label for label, path in models.items()}
    with atomic_dir(folder) as tmp:
        write_outputs(results, tmp)
    return results


def stage_export(cfg: RunConfig, folder: Path, student: Path, card: dict) -> Path:
    """The final student: a plain HF dir with a model card."""
    if (folder / "config.json").is_file():
        return folder
    from minitron.report import write_model_card

    model, tok = load_model(str(student), "cpu", cfg.model.dtype, with_tokenizer=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_model_card(tmp / "README.md", card)
    return folder


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


def check_eval_inputs(cfg: RunConfig) -> None:
    """Fail at the start, not after distillation, when an evaluation file is missing."""
    from minitron import tasks as T
    from minitron.data import data_dir
    from minitron.evaluate import WIKITEXT_FILE

    for task in cfg.eval.tasks:
        if task == "wikitext2":
            base = data_dir(cfg.data.data_dir)
            if base is None or not (base / WIKITEXT_FILE).is_file():
                raise T.TaskError(f"eval task wikitext2 needs {WIKITEXT_FILE} under the data dir ({base}); set "
                                  "data.data_dir or MINITRON_DATA_DIR to a folder laid out like shared/data, "
                                  "or drop it from eval.tasks")
        elif task != "speed" and not task.startswith("loss:"):
            T.task_file(task, cfg.data.data_dir)


def run(cfg: RunConfig, from_stage: str | None = None) -> Path:
    """Teacher -> distilled, evaluated, exported student, in `cfg.out`."""
    cfg.check()
    check_eval_inputs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if from_stage:
        clear_from(out, from_stage)
    save_config(cfg, out / "config.yaml")
    teacher = stage_correction(cfg, out)
    if cfg.iterative.budgets:
        student = run_iterative(cfg, out, teacher)
    else:
        scores = stage_importance(cfg, out / "importance", teacher, None if cfg.search.enabled else cfg.target)
        target = stage_search(cfg, out, teacher, scores)
        if target is not cfg.target and target.layers is not None:  # the pick may drop layers: LM-loss block scores
            scores = _ensure_block_scores(cfg, out / "importance", teacher, target)
        pruned = stage_prune(cfg, out / "prune", teacher, scores, target)
        student = stage_distill(cfg, out / "distill", teacher, pruned, cfg.distill.tokens)
    results = stage_eval(cfg, out / "eval", {"teacher": teacher, "student": str(student)})
    stage_export(cfg, out / "export", student, _card(cfg, out, teacher, results))
    from minitron.report import write_report

    write_report(out)
    print(f"[minitron] done: student in {out / 'export'}, report in {out / 'report.md'}")
    return out


def run_iterative(cfg: RunConfig, out: Path, teacher: str) -> Path:
    """Prune -> distill once per budget, each step re-scoring the current student; same total tokens."""
    budgets = [parse_count(b) for b in cfg.iterative.budgets]
    if budgets != sorted(budgets, reverse=True):
        raise PlanError(f"iterative.budgets must decrease, got {cfg.iterative.budgets}")
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
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    teacher = stage_correction(cfg, out)
    stage_search(cfg, out, teacher, stage_importance(cfg, out / "importance", teacher, None))
    print((out / "search" / "search.md").read_text())
    return out / "search"


def _ensure_block_scores(cfg: RunConfig, folder: Path, teacher: str, target: Target) -> Path:
    """Add LM-loss block scores that a depth target needs to an existing scores file."""
    from minitron.importance import layer_lm_loss

    path = folder / "scores.safetensors"
    scores, meta = load_scores(path)
    model, tok = load_model(teacher, cfg.model.device, cfg.model.dtype, cfg.model.trust_remote_code)
    n_drop = arch.dims_of(model.config).layers - target.layers
    if target.layer_metric != "lm-loss" or n_drop <= 0 or f"block_lm_loss.{n_drop}" in scores:
        return path
    splits = load_splits(cfg.data.corpus, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed,
                         data_root=cfg.data.data_dir)
    scores.update(layer_lm_loss(model, splits.validation[: cfg.importance.heldout_samples], [1, n_drop],
                                cfg.importance.batch_size))
    save_scores(scores, folder, meta)
    return path


def _card(cfg: RunConfig, out: Path, teacher: str, results: dict) -> dict:
    """What the model card says: provenance, recipe, data, tokens, scores."""
    plan_path = next(iter(sorted(out.glob("**/prune/plan.json"), reverse=True)), None)
    plan = json.loads(plan_path.read_text()) if plan_path else {}
    return {"teacher": teacher, "recipe": str(out / "config.yaml"), "corpus": cfg.data.corpus,
            "distill_tokens": cfg.distill.tokens, "loss": cfg.distill.loss, "plan": plan, "results": results}
