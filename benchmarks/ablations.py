"""The Minitron papers' ablations and the peers' criteria, every arm at one parameter target (issue 7).

    python benchmarks/ablations.py --preset smoke --out runs/ablations-smoke     # tiny random model, minutes
    python benchmarks/ablations.py --preset cpu --out runs/ablations              # default teacher, hours
    python benchmarks/ablations.py --preset cpu --out runs/ablations --arms minitron,magnitude --seeds 1

Every arm goes through the product's code: `minitron.prune.prune` (same plan JSON, same trimming),
`minitron.distill.distill` (same data blocks, tokens, learning rate, seed, and one teacher top-k cache
built once), `minitron.eval.harness.evaluate`. Arms (names for --arms):

  minitron            activation importance, width (the budget's default: heads and depth kept, the hidden/MLP
                      split with the lowest held-out loss after pruning), forward KL; the other width arms
                      (random, magnitude, taylor, corrected, aggregation) prune to these same dims
  random_init         minitron's architecture from random init, same distillation
  random              seeded random scores, same trimming and distillation
  magnitude, taylor   the peers' width criteria (weight L2 norm; first-order |w * dL/dw|)
  lm_only             minitron's pruned model retrained with the LM loss alone (no teacher)
  depth_lm_block      the same parameters by dropping one contiguous block chosen by LM loss
  depth_bi_scattered  the same parameters by dropping scattered layers chosen by Block Importance (ShortGPT)
  corrected           minitron after teacher correction (teacher first fine-tuned on the corpus)
  iterative           minitron in two prune -> distill steps (halfway dims, then minitron's), same total tokens
  full_logits         minitron distilled from the teacher's full logits, computed online (no top-k cache)
  kd_plus_lm          minitron distilled with forward KL plus the LM loss (ce_weight 1; the papers use KL alone)
  aggregation         no training: held-out loss right after pruning for each seq x batch aggregation
  depth_curves        no training: LM loss and BI for every removed contiguous block, task accuracy per block

Each (arm, seed) caches its result in OUT/arms/<arm>/s<seed>/result.json and is skipped on a rerun, so
a long preset runs in parts; an interrupted distillation resumes from its checkpoint. Outputs in OUT:
results.jsonl, results.md, loss_vs_tokens.png (the papers' Fig. 6), depth_curves.png (Figs. 8-9),
aggregation.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minitron import arch
from minitron.arch.files import atomic_dir
from minitron.arch.models import load_model, resolve_model_path
from minitron.data import load_splits
from minitron.distill import DistillConfig, can_resume, distill, read_metrics
from minitron.eval.harness import evaluate
from minitron.prune import PruneConfig, prune
from minitron.prune.importance import layer_task_accuracy
from minitron.prune.plan import Target, config_with_dims, count_params

TRAINED_ARMS = ("minitron", "random_init", "random", "magnitude", "taylor", "lm_only", "depth_lm_block",
                "depth_bi_scattered", "corrected", "iterative", "full_logits", "kd_plus_lm")
ARMS = TRAINED_ARMS + ("aggregation", "depth_curves")
WIKITEXT_VALID = "wikitext-2-raw/wiki.valid.raw"


@dataclass
class Preset:
    """Sizes of one ablation run. Every arm gets the same data, tokens and settings."""

    teacher: str = "default"
    corpus: str = "default"
    data_dir: str | None = None           # folder laid out like shared/data (else $MINITRON_DATA_DIR)
    seq_len: int = 256
    max_blocks: int = 1200                # corpus blocks read for distillation (train + validation)
    val_fraction: float = 0.1             # validation blocks: the held-out slice every arm is judged on
    calib_samples: int = 128
    heldout_samples: int = 16             # blocks for the LM-loss layer metric
    params: str = "70M"                   # the target of every arm (total parameters)
    tokens: int = 131_072                 # distillation tokens per arm
    batch_size: int = 8
    lr: float = 3e-4
    min_lr: float = 3e-5
    eval_every: int = 16                  # steps between held-out evaluations (the curves' points)
    eval_batches: int = 4                 # validation micro-batches per evaluation (32 blocks, 8k tokens)
    topk: int = 64                        # teacher top-k cache
    autocast: str = "none"                # fp32: bf16 autocast is 3x slower on a CPU without native bf16 (docs/distill.md)
    correction_tokens: int = 65_536
    correction_lr: float = 1e-4            # 32 steps at 1e-5 would hardly move the teacher (not tuned)
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy", "lambada"])  # signal at 135M
    task_limit: int | None = 300
    wikitext: bool = True                 # WikiText-2 validation loss at checkpoints, test ppl at the end
    ppl_windows: int | None = 20
    window: int = 2048
    aggregations: list[str] = field(default_factory=lambda: ["mean", "l2", "var"])
    depth_task: str = "piqa"
    depth_task_limit: int | None = 200
    device: str = "auto"


PRESETS = {
    "cpu": Preset(),
    # documented, not run here: Llama-3.2-1B (1.24B) -> 620M on one 80 GB GPU, 50M tokens per arm (~30 min each
    # on an H100), about 8 hours for the preset. corpus: a local folder of parquet shards (e.g. fineweb-edu's
    # sample-10BT, downloaded beforehand); the top-k cache (k 32) of 26k blocks x 2048 tokens is ~10 GB.
    "gpu": Preset(teacher="meta-llama/Llama-3.2-1B", corpus="data/fineweb-edu-sample-10BT", params="620M",
                  seq_len=2048, max_blocks=26_000, val_fraction=0.02, calib_samples=1024, heldout_samples=64,
                  tokens=50_000_000, batch_size=16, lr=1e-4, min_lr=1e-5, eval_every=100, eval_batches=8,
                  topk=32, autocast="bf16", correction_tokens=20_000_000, correction_lr=1e-5, task_limit=None,
                  ppl_windows=None, tasks=["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande",
                                           "lambada", "mmlu"], depth_task="winogrande", depth_task_limit=None),
    "smoke": Preset(teacher="", corpus="", seq_len=32, max_blocks=200, calib_samples=16, heldout_samples=4,
                    params="", tokens=2048, batch_size=4, lr=3e-3, min_lr=3e-4, eval_every=4,
                    eval_batches=2, topk=16, correction_tokens=1024, correction_lr=1e-3,
                    tasks=[], task_limit=8, wikitext=False, ppl_windows=2, window=64, depth_task="",
                    depth_task_limit=8),
}


def make_smoke_inputs(p: Preset, out: Path) -> Preset:
    """A tiny random Llama teacher (4 layers, hidden 64), a pseudo-text corpus, targets at half size."""
    from minitron.arch.tiny import make_model, make_text, make_tokenizer

    teacher, corpus = out / "smoke_teacher", out / "smoke_corpus"
    if not (teacher / "config.json").is_file():
        model = make_model("llama")
        with torch.no_grad():  # peaked teacher distributions (a random model is near uniform)
            model.lm_head.weight.mul_(8.0)
        with atomic_dir(teacher) as tmp:
            model.save_pretrained(tmp)
            make_tokenizer().save_pretrained(tmp)
    if not corpus.is_dir():
        with atomic_dir(corpus) as tmp:
            for i in range(4):
                (tmp / f"doc{i}.txt").write_text(make_text(400, seed=10 + i))
    total = count_params(model_config(str(teacher)))["total"]
    return replace(p, teacher=str(teacher), corpus=str(corpus), params=str(int(total * 0.5)))


# ---- the steps every arm shares --------------------------------------------------------------------------

def model_config(name: str):
    """A model's config without loading its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(name))


def depth_layers(config, params: float) -> int:
    """The most layers whose model (all widths kept) fits `params` total parameters."""
    d = arch.dims_of(config)
    fits = [n for n in range(1, d.layers) if count_params(config_with_dims(config, arch.Dims(
        **{**d.to_dict(), "layers": n}), list(range(n))))["total"] <= params]
    if not fits:
        raise ValueError(f"no depth reaches {params / 1e6:.3g}M parameters; raise the preset's params")
    return max(fits)


def prune_arm(p: Preset, model: str, out: Path, target: Target, criterion: str = "activation",
              scores: Path | None = None, seed: int = 0, **over) -> Path:
    """minitron.prune.prune with the preset's data settings (skipped when `out` holds a plan)."""
    if (out / "plan.json").is_file():
        return out
    return prune(PruneConfig(model=model, out=str(out), target=target, calib_data=p.corpus,
                             calib_samples=p.calib_samples, heldout_samples=p.heldout_samples, seq_len=p.seq_len,
                             batch_size=p.batch_size, criterion=criterion,
                             scores=str(scores) if scores else None, seed=seed, device=p.device,
                             data_dir=p.data_dir, overwrite=True, **over))


def distill_arm(p: Preset, student: Path | str, out: Path, teacher: str | None, seed: int, tokens: int | None = None,
                cache: Path | None = None, **over) -> Path:
    """minitron.distill.distill with the preset's settings; resumes an interrupted run."""
    kw = dict(student=str(student), out=str(out), teacher=teacher, data=p.corpus, tokens=tokens or p.tokens,
              lr=p.lr, min_lr=p.min_lr, batch_size=p.batch_size, seq_len=p.seq_len, val_fraction=p.val_fraction,
              eval_every=p.eval_every, eval_batches=p.eval_batches, save_every=p.eval_every,
              topk_cache=str(cache) if cache else None, topk=p.topk, seed=seed, split_seed=0,
              heldout=[WIKITEXT_VALID] if p.wikitext else [], device=p.device, autocast=p.autocast,
              max_blocks=p.max_blocks, data_root=p.data_dir, resume=can_resume(out))
    return distill(DistillConfig(**{**kw, **over}))


def final_eval(p: Preset, model: Path | str) -> dict:
    """WikiText-2 test perplexity (windowed) and the zero-shot tasks of the preset."""
    res: dict = {}
    for tasks, limit in ((["wikitext2"] if p.wikitext else [], p.ppl_windows), (p.tasks, p.task_limit)):
        if tasks:
            r = evaluate([str(model)], tasks, limit=limit, batch_size=p.batch_size, device=p.device,
                         data_root=p.data_dir, window=p.window, seq_len=p.seq_len, progress=False)
            res.update(r["models"][str(model)]["tasks"])
    return res


def curve(metrics_dir: Path, offset: int = 0) -> list[dict]:
    """Held-out points of a distillation: tokens, corpus validation loss, WikiText-2 validation loss."""
    return [{"tokens": r["tokens"] + offset, "val_loss": r["val_lm_loss"],
             "wikitext_val_loss": r.get(f"val_lm_loss:{WIKITEXT_VALID}")}
            for r in read_metrics(metrics_dir / "metrics.jsonl") if "val_lm_loss" in r]


def val_loss(p: Preset, model_dir: Path | str) -> float:
    """LM loss on the validation blocks that every distillation evaluates on (the report half of the same
    split, same count: minitron.data.report_blocks)."""
    from minitron.arch.models import lm_loss
    from minitron.data import report_blocks

    model, tok = load_model(str(model_dir), p.device)
    val = load_splits(p.corpus, tok, p.seq_len, p.val_fraction, 0, p.max_blocks, p.data_dir).validation
    return lm_loss(model, report_blocks(val, p.eval_batches * p.batch_size), p.batch_size)


def random_init(pruned: Path, out: Path, seed: int) -> Path:
    """The pruned architecture with fresh weights (the model family's own initialization)."""
    from transformers import AutoModelForCausalLM

    if not (out / "config.json").is_file():
        model, tok = load_model(str(pruned), "cpu")
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        with atomic_dir(out) as tmp:
            fresh.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


# ---- the arms --------------------------------------------------------------------------------------------

def depth_target(p: Preset, metric: str, contiguous: bool) -> Target:
    config = model_config(p.teacher)
    return Target(layers=depth_layers(config, float(Target(params=p.params).params)), layer_metric=metric,
                  contiguous=contiguous)


def shared_scores(p: Preset, out: Path) -> Path:
    """Teacher scores once for every arm: activation widths, BI, and LM loss per layer and per block of
    the depth arm's size (computed by pruning the depth_lm_block arm, whose student they also give)."""
    return prune_arm(p, p.teacher, out / "pruned" / "depth_lm_block", depth_target(p, "lm-loss", True)) \
        / "scores.safetensors"


def corrected_teacher(p: Preset, out: Path) -> Path:
    """Teacher correction: the teacher fine-tuned with the LM loss on the distillation blocks."""
    return distill_arm(p, p.teacher, out / "corrected_teacher",
                       None, 0, tokens=p.correction_tokens, kd_weight=0.0, ce_weight=1.0, lr=p.correction_lr,
                       min_lr=p.correction_lr / 10)


def minitron_pruned(p: Preset, out: Path) -> Path:
    """Arm 1's pruned student: activation scores, the parameter target, the product's default split."""
    return prune_arm(p, p.teacher, out / "pruned" / "activation", Target(params=p.params), "activation",
                     shared_scores(p, out))


def width_target(p: Preset, out: Path) -> Target:
    """Arm 1's hidden and MLP widths, so that every width arm compares criteria on one architecture."""
    dims = json.loads((minitron_pruned(p, out) / "plan.json").read_text())["target"]
    return Target(hidden=dims["hidden"], ffn=dims["ffn"])


def midway_target(p: Preset, out: Path) -> Target:
    """The iterative arm's first step: hidden and MLP halfway between the teacher's and minitron's, so that
    its second step ends at exactly minitron's dims."""
    plan = json.loads((minitron_pruned(p, out) / "plan.json").read_text())
    src, dst = plan["source"], plan["target"]
    config = model_config(p.teacher)
    step = arch.hidden_step(config, src["heads"], 8)
    return Target(hidden=(src["hidden"] + dst["hidden"]) // 2 // step * step,
                  ffn=(src["ffn"] + dst["ffn"]) // 2 // 8 * 8)


def run_arm(p: Preset, out: Path, arm: str, seed: int) -> dict:
    """Prune -> distill one arm; returns its points (held-out loss vs tokens) and the final student."""
    cache, work = out / "teacher_topk", out / "arms" / arm / f"s{seed}"
    teacher = p.teacher
    if arm in ("minitron", "random_init", "lm_only", "random", "magnitude", "taylor", "full_logits", "kd_plus_lm"):
        criterion = arm if arm in ("random", "magnitude", "taylor") else "activation"
        name = f"random_s{seed}" if arm == "random" else criterion
        pruned = minitron_pruned(p, out) if name == "activation" else prune_arm(
            p, teacher, out / "pruned" / name, width_target(p, out), criterion,
            None if arm == "taylor" else shared_scores(p, out), seed)
        if arm == "random_init":
            pruned = random_init(pruned, work / "init", seed)
        if arm == "lm_only":
            student = distill_arm(p, pruned, work / "distill", None, seed, kd_weight=0.0, ce_weight=1.0)
        elif arm == "full_logits":  # the teacher runs beside the student: exact KL over the whole vocabulary
            student = distill_arm(p, pruned, work / "distill", teacher, seed)
        elif arm == "kd_plus_lm":
            student = distill_arm(p, pruned, work / "distill", teacher, seed, cache=cache, ce_weight=1.0)
        else:
            student = distill_arm(p, pruned, work / "distill", teacher, seed, cache=cache)
        points = curve(student)
    elif arm in ("depth_lm_block", "depth_bi_scattered"):
        scores = shared_scores(p, out)
        pruned = scores.parent if arm == "depth_lm_block" else prune_arm(
            p, teacher, out / "pruned" / arm, depth_target(p, "bi", False), scores=scores)
        student = distill_arm(p, pruned, work / "distill", teacher, seed, cache=cache)
        points = curve(student)
    elif arm == "corrected":
        teacher = str(corrected_teacher(p, out))
        pruned = prune_arm(p, teacher, out / "pruned" / "corrected", width_target(p, out))
        student = distill_arm(p, pruned, work / "distill", teacher, seed, cache=out / "corrected_topk")
        points = curve(student)
    elif arm == "iterative":
        half = p.tokens // 2
        pruned = prune_arm(p, teacher, out / "pruned" / "iterative_step1", midway_target(p, out),
                           scores=shared_scores(p, out))
        step1 = distill_arm(p, pruned, work / "distill_step1", teacher, seed, tokens=half, cache=cache)
        final = json.loads((out / "pruned" / "activation" / "plan.json").read_text())["target"]
        pruned = prune_arm(p, str(step1), work / "prune_step2",  # re-scored on the current student
                           Target(hidden=final["hidden"], ffn=final["ffn"]))
        student = distill_arm(p, pruned, work / "distill", teacher, seed, tokens=p.tokens - half, cache=cache)
        points = curve(step1) + curve(student, offset=half)
    else:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    plan = json.loads((pruned / "plan.json").read_text()) if (pruned / "plan.json").is_file() else \
        json.loads((out / "pruned" / "activation" / "plan.json").read_text())  # random_init: minitron's dims
    return {"arm": arm, "seed": seed, "params": plan["params_after"]["total"], "dims": plan["target"],
            "dropped_layers": plan["dropped_layers"], "after_prune": points[0]["val_loss"],
            "final": points[-1]["val_loss"], "curve": points, "tokens": points[-1]["tokens"],
            "student": str(student), "eval": final_eval(p, student)}


def run_aggregation(p: Preset, out: Path) -> dict:
    """No training: validation loss right after pruning to arm 1's widths, per seq x batch aggregation."""
    grid = {}
    for seq in p.aggregations:
        for batch in p.aggregations:
            pruned = prune_arm(p, p.teacher, out / "pruned" / f"agg_{seq}_{batch}", width_target(p, out),
                               seq_agg=seq, batch_agg=batch)
            grid[f"{seq}/{batch}"] = val_loss(p, pruned)
    return {"arm": "aggregation", "seed": 0, "grid": grid}


def run_depth_curves(p: Preset, out: Path) -> dict:
    """Per removed contiguous block (1 layer and the depth arm's size): LM-loss increase and BI; the task drop
    for blocks of the depth arm's size only (the second paper's Fig. 9; single layers would cost L more task
    evaluations of the teacher, ~25 minutes on the cpu preset)."""
    from minitron.prune.importance import load_scores

    scores = load_scores(shared_scores(p, out))[0]
    n = arch.dims_of(model_config(p.teacher)).layers - depth_target(p, "lm-loss", True).layers
    res = {"arm": "depth_curves", "seed": 0, "block": n,
           "lm_loss": {k: scores[f"block_lm_loss.{k}"].tolist() for k in (1, n)},
           "bi": {k: scores[f"block_bi.{k}"].tolist() for k in (1, n)}}
    if p.depth_task:
        model, tok = load_model(p.teacher, p.device)
        acc = layer_task_accuracy(model, tok, p.depth_task, [n], p.depth_task_limit, p.batch_size, p.data_dir)
        res.update(task=p.depth_task, task_base=float(acc["task_base"]),
                   task_drop={n: acc[f"block_task.{n}"].tolist()})
    return res


def teacher_row(p: Preset, out: Path) -> dict:
    return {"arm": "teacher", "seed": 0, "params": count_params(model_config(p.teacher))["total"],
            "final": val_loss(p, p.teacher), "eval": final_eval(p, p.teacher)}


# ---- caching, table, plots ---------------------------------------------------------------------------------

def cached(out: Path, arm: str, seed: int, fn) -> dict:
    """fn() once per (arm, seed): its result is kept in arms/<arm>/s<seed>/result.json."""
    path = out / "arms" / arm / f"s{seed}" / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    res = fn()
    res["wall_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)
    return res


def _fmt(x, digits=3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _task_cell(r: dict, task: str) -> str:
    t = r.get("eval", {}).get(task)
    if not t:
        return ""
    key = "acc_norm" if task in ("hellaswag", "arc_challenge", "openbookqa") else "acc"
    return f"{t[key]:.3f} ± {t[key + '_stderr']:.3f}"


def markdown(rows: list[dict], p: Preset) -> str:
    """The arms table (trained arms and the teacher), then the aggregation grid."""
    trained = [r for r in rows if r["arm"] in TRAINED_ARMS + ("teacher",)]
    head = ["arm", "seed", "params", "dims (h/ffn/heads/kv/layers)", "val loss after prune", "val loss final",
            "WikiText-2 val loss final", "WikiText-2 ppl"] + p.tasks + ["tokens", "wall min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(trained, key=lambda r: r.get("final", math.inf)):
        d = r.get("dims", {})
        dims = "/".join(str(d.get(k, "")) for k in ("hidden", "ffn", "heads", "kv_heads", "layers")) if d else ""
        wt = r.get("eval", {}).get("wikitext2", {}).get("perplexity")
        wv = r["curve"][-1].get("wikitext_val_loss") if r.get("curve") else None
        cells = [r["arm"], str(r["seed"]), f"{r['params'] / 1e6:.2f}M", dims, _fmt(r.get("after_prune")),
                 _fmt(r.get("final")), _fmt(wv), _fmt(wt, 2)] + [_task_cell(r, t) for t in p.tasks] + \
                [str(r.get("tokens", "")), _fmt((r.get("wall_s") or 0) / 60, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = {a: [r["final"] for r in trained if r["arm"] == a] for a in TRAINED_ARMS}
    spread = [f"- {a}: {sum(v) / len(v):.3f} (min {min(v):.3f}, max {max(v):.3f}, {len(v)} seeds)"
              for a, v in seeds.items() if len(v) > 1]
    if spread:
        lines += ["", "Final validation loss over seeds:", ""] + spread
    for r in rows:
        if r["arm"] == "aggregation":
            lines += ["", "Validation loss right after pruning, by aggregation (rows: over sequence; "
                      "columns: over batch):", "", "| seq \\ batch | " + " | ".join(p.aggregations) + " |",
                      "|---|" + "---|" * len(p.aggregations)]
            for seq in p.aggregations:
                lines.append(f"| {seq} | " + " | ".join(_fmt(r["grid"].get(f"{seq}/{b}")) for b in p.aggregations)
                             + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    """loss_vs_tokens.png (all arms), depth_curves.png, aggregation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    trained = [r for r in rows if r["arm"] in TRAINED_ARMS]
    for i, r in enumerate(trained):  # tab20 and two line styles: the default 10-colour cycle repeats
        pts = r["curve"]
        style = dict(marker=".", label=f"{r['arm']} (s{r['seed']})", color=plt.cm.tab20(i % 20),
                     linestyle="-" if i % 2 == 0 else "--")
        axes[0].plot([q["tokens"] for q in pts], [q["val_loss"] for q in pts], **style)
        if pts[0].get("wikitext_val_loss") is not None:
            axes[1].plot([q["tokens"] for q in pts], [q["wikitext_val_loss"] for q in pts], **style)
    for ax, title in zip(axes, ("held-out slice of the corpus", "WikiText-2 validation"), strict=True):
        ax.set(xlabel="distillation tokens", ylabel="LM loss", title=title, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_tokens.png", dpi=110)
    plt.close(fig)
    for r in rows:
        if r["arm"] == "depth_curves":
            panels = [("lm_loss", "LM-loss increase"), ("bi", "Block Importance")] + \
                ([("task_drop", f"{r['task']} accuracy drop")] if "task_drop" in r else [])
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
            for ax, (key, title) in zip(axes, panels, strict=True):
                for n, v in r[key].items():
                    ax.plot(range(len(v)), v, marker=".", label=f"block of {n}")
                ax.set(xlabel="first removed layer", title=title)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "depth_curves.png", dpi=110)
            plt.close(fig)
        if r["arm"] == "aggregation":
            aggs = list(dict.fromkeys(k.split("/")[0] for k in r["grid"]))  # seq aggregations, in order
            grid = [[r["grid"][f"{s}/{b}"] for b in aggs] for s in aggs]
            fig, ax = plt.subplots(figsize=(4.5, 4))
            im = ax.imshow(grid, cmap="viridis_r")
            ax.set(xticks=range(len(aggs)), xticklabels=aggs, yticks=range(len(aggs)), yticklabels=aggs,
                   xlabel="over batch", ylabel="over sequence", title="loss right after pruning")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im)
            fig.tight_layout()
            fig.savefig(out / "aggregation.png", dpi=110)
            plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="comma-separated subset of the arms; `none` only rebuilds the tables and plots from the "
                         "arms finished so far")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds for the trained arms")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override preset fields, e.g. tokens=65536 tasks=piqa,arc_easy data_dir=../shared/data")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS[args.preset]
    if args.preset == "smoke":
        p = make_smoke_inputs(p, out)
    p = override(p, args.set)
    arms = [a.strip() for a in args.arms.split(",") if a.strip() and a.strip() != "none"]  # none: tables only
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a!r}; arms: {', '.join(ARMS)}")
    (out / "preset.json").write_text(json.dumps({"preset": args.preset, **asdict(p)}, indent=1))
    cached(out, "teacher", 0, lambda: teacher_row(p, out))
    for arm in arms:
        seeds = [int(s) for s in args.seeds.split(",")] if arm in TRAINED_ARMS else [0]
        for seed in seeds:
            print(f"[ablations] {arm} seed {seed}")
            fn = {"aggregation": lambda: run_aggregation(p, out), "depth_curves": lambda: run_depth_curves(p, out)
                  }.get(arm, lambda arm=arm, seed=seed: run_arm(p, out, arm, seed))
            cached(out, arm, seed, fn)
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("arms/*/s*/result.json"))]
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "results.md").write_text(markdown(rows, p))
    plot(rows, out)
    print((out / "results.md").read_text())
    return rows


def override(p: Preset, items: list[str]) -> Preset:
    """KEY=VALUE strings -> a new Preset (values parsed by the field's type; lists comma-separated)."""
    kw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in Preset.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(Preset.__dataclass_fields__)}")
        kind = str(Preset.__dataclass_fields__[key].type)
        if value.lower() == "none" and "None" in kind:
            kw[key] = None
        elif kind.startswith("list"):
            kw[key] = [v for v in value.split(",") if v]
        elif kind == "bool":
            kw[key] = value.lower() in ("1", "true", "yes")
        elif kind.startswith("int"):
            kw[key] = int(value)
        elif kind == "float":
            kw[key] = float(value)
        else:
            kw[key] = value
    return replace(p, **kw)


if __name__ == "__main__":
    main()
