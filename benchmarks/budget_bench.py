"""The old default against the new one at the same compute budget, scored by one held-out protocol (issue 23).

Every arm is one `minitron run` with the same `budget.minutes` (so each spends the same wall time on this machine,
its distillation sized by what it measured), into <out>/<arm>:

    old           recipes/legacy.yaml: the default until 2026-12-06 (70M width-only, Debian's Python docs, lr 1e-4)
    new           recipes/default.yaml: the default now (since 2026-12-07 night: 89M, 26 layers, per-layer MLP
                  widths by measured loss, 832 on average; embedding and LM head frozen since the sixth pass)
    speed-search  the default of 2026-12-06: the shape with the lowest held-out loss among those measured >= 1.5x
                  faster to prefill (search.enabled=true), uniform widths
    new-70m       the 70M default of 2026-12-07 with uniform widths (target.params=70M, target.layer_widths=null)
    new-80m       that default at 80M (target.params=80M): what the speed target's margin buys
    new-106m      that default at a 21% cut: target.params=106M
    pl-70m        the default until 2026-12-07 evening: 70M, per-layer MLP widths (30 layers, hidden 504)
    new-l24       the default of 2026-12-07 evening, its shape given as overrides: ~89M by depth and width, 24 of
                  30 layers (the contiguous block of 6 with the lowest Block Importance dropped) and MLP 960 on
                  average, per layer by measured loss
    new-refit     the default with the prune stage's least-squares refit (prune.refit=attn+mlp; off by default)
    new-1207      the default as committed on 2026-12-07 (fe6092d: per-layer probes on 4 blocks, evaluations every 20
                  steps): a kept run folder, not rerun (the changes since are in code, not in the recipe)

Each run also logs the WikiText-2 validation loss at every distillation evaluation (distill.heldout), so the
curves of all arms share one y axis. Then every student and the teacher are scored alike: WikiText-2 test
perplexity over all its non-overlapping 2048-token windows, PIQA on all its items (scored as lm-eval scores it),
and prefill / decode speed at batch 1 and 8 (best of 15 rounds interleaved over all models, each round's prefill
the fastest of 3 calls). Scores are cached per
model in <out>/scores/, so arms can be run one invocation at a time. Writes <out>/budget_bench.md and .json and
<out>/curves.png; benchmarks/RESULTS.md quotes them.

    MINITRON_DATA_DIR=../shared/data .venv/bin/python benchmarks/budget_bench.py --minutes 18 --arms old,new
    MINITRON_DATA_DIR=../shared/data .venv/bin/python benchmarks/budget_bench.py --minutes 18 --arms speed-search
    MINITRON_DATA_DIR=../shared/data .venv/bin/python benchmarks/budget_bench.py --minutes 18 --arms pl-70m,new-l24
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = "wikitext-2-raw/wiki.valid.raw"
SPEED_ROUNDS = 15  # 5 until 2026-12-07: the same 89M student read 1.50x in 5 rounds and 1.62x / 1.63x in two runs of 15
# the 70M-era arms start from the default recipe's settings with its shape undone (layers and MLP kept, LM-loss blocks)
BY_PARAMS = ["target.layers=null", "target.ffn=null", "target.layer_metric=lm-loss"]
ARMS = {"old": ("recipes/legacy.yaml", []),
        "new": ("recipes/default.yaml", []),
        "speed-search": ("recipes/default.yaml", ["search.enabled=true", "target.layer_widths=null"]),
        "new-70m": ("recipes/default.yaml", [*BY_PARAMS, "target.params=70M", "target.layer_widths=null"]),
        "new-80m": ("recipes/default.yaml", [*BY_PARAMS, "target.params=80M"]),
        "new-106m": ("recipes/default.yaml", [*BY_PARAMS, "target.params=106M"]),
        "pl-70m": ("recipes/default.yaml", [*BY_PARAMS, "target.params=70M"]),
        "new-l24": ("recipes/default.yaml", ["target.params=null", "target.layers=24", "target.ffn=960",
                                             "target.layer_metric=bi"]),
        "new-refit": ("recipes/default.yaml", ["prune.refit=attn+mlp"]),
        "new-1207": None}


def run_arm(arm: str, out: Path, minutes: float, extra: list[str]) -> float:
    """`minitron run` of the arm's recipe with the budget (a finished run is skipped by the pipeline itself), with
    the teacher's cached scores removed first."""
    import shutil

    from minitron.arch.models import cache_dir

    if ARMS[arm] is None:
        raise SystemExit(f"{arm} is a kept run (the budget_bench docstring says which commit): put its folder in "
                         f"{out / arm} or leave it out of --arms")
    recipe, over = ARMS[arm]
    # every arm pays the teacher's evaluation, as a user's first run does (a later run reuses the cached scores)
    shutil.rmtree(cache_dir() / "teacher_scores", ignore_errors=True)
    cmd = [sys.executable, "-m", "minitron.cli", "run", str(ROOT / recipe), f"out={out / arm}",
           f"budget.minutes={minutes}", f"distill.heldout=[{HELDOUT}]", *over, *extra]
    print("[bench]", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def score(name: str, model: str, out: Path, limit: int | None) -> dict:
    """WikiText-2 (all windows) and PIQA (all items) of one model, cached in out/scores/<name>.json."""
    from minitron.eval.harness import evaluate

    path = out / "scores" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    r = evaluate([model], ["wikitext2", "piqa"], limit=limit, batch_size=8, device="cpu", window=2048)
    entry = r["models"][model]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry, indent=1))
    return entry


def speeds(models: dict[str, str]) -> dict:
    """Prefill / decode tok/s at batch 1 and 8 of every model, best of SPEED_ROUNDS rounds interleaved over them."""
    from minitron.arch.models import resolve_device
    from minitron.eval.harness import speed_phase

    res = speed_phase(list(models.values()), resolve_device("cpu"), "float32", SPEED_ROUNDS, 128, 32, (1, 8))
    return {name: res[path] for name, path in models.items()}


def curves(out: Path, arms: list[str]) -> Path:
    """WikiText-2 validation loss against distillation tokens, every arm on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    key = f"val_lm_loss:{HELDOUT}"
    for arm in arms:
        rows = [json.loads(x) for x in (out / arm / "distill" / "metrics.jsonl").read_text().splitlines()]
        pts = [(r["tokens"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts, strict=True), "o-", label=arm)
    ax.set(xlabel="distillation tokens", ylabel="WikiText-2 validation loss", title="loss against tokens, same budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return out / "curves.png"


def table(out: Path, arms: list[str], scores: dict, speed: dict, walls: dict) -> str:
    lines = ["| model | params | shape (layers / hidden / MLP / heads) | corpus | distill tokens | run wall | "
             "WikiText-2 ppl (all windows) | PIQA acc | prefill b1 | decode b1 | prefill b8 | decode b8 |",
             "|---" * 12 + "|"]
    t = speed["teacher"]
    for name in ["teacher", *arms]:
        s, sp = scores[name]["tasks"], speed[name]
        if name == "teacher":
            desc = "134.5M | 30 / 576 / 1536 / 9 | — | — | —"
        else:
            plan = json.loads((out / name / "prune" / "plan.json").read_text())
            d, cfg = plan["target"], (out / name / "config.yaml").read_text()
            corpus = next(line.split(":", 1)[1].strip() for line in cfg.splitlines() if line.strip().startswith("corpus:"))
            done = json.loads((out / name / "distill" / "minitron_distill.json").read_text())
            widths = [w["ffn"] for w in plan.get("per_layer", {}).get("widths", [])]
            mlp = f"per layer {min(widths)}-{max(widths)}" if widths and min(widths) != max(widths) else d["ffn"]
            desc = (f"{plan['params_after']['total'] / 1e6:.1f}M | {d['layers']} / {d['hidden']} / {mlp} / "
                    f"{d['heads']} | {corpus} | {done['tokens']:,} | {walls.get(name, '—')}")
        ratio = {k: {b: sp[k][b] / t[k][b] for b in sp[k]} for k in ("prefill_tok_s", "decode_tok_s")}
        lines.append(f"| {name} | {desc} | {s['wikitext2']['perplexity']:.2f} ({s['wikitext2']['windows']}) | "
                     f"{s['piqa']['acc']:.4f} ± {s['piqa']['acc_stderr']:.4f} | "
                     + " | ".join(f"{ratio[k][b]:.2f}x" for k, b in (("prefill_tok_s", 1), ("decode_tok_s", 1),
                                                                     ("prefill_tok_s", 8), ("decode_tok_s", 8))) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="budget.minutes of every arm")
    ap.add_argument("--arms", default="old,new", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--out", default="runs/budget_bench")
    ap.add_argument("--limit", type=int, default=None, help="items / windows per score (default: all)")
    ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for every arm (tests)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arms {bad}; choose from {', '.join(ARMS)}")
    walls_path = out / "walls.json"
    walls = json.loads(walls_path.read_text()) if walls_path.is_file() else {}
    for arm in arms:
        if not (out / arm / "export" / "config.json").is_file():
            wall = run_arm(arm, out, args.minutes, args.set)
            walls[arm] = f"{wall / 60:.1f} min"
            out.mkdir(parents=True, exist_ok=True)
            walls_path.write_text(json.dumps(walls, indent=1))
    done = [a for a in ARMS if (out / a / "export" / "config.json").is_file()]
    teacher = json.loads((out / done[0] / "eval" / "results.json").read_text())["config"]["models"][0]
    models = {"teacher": teacher, **{a: str(out / a / "export") for a in done}}
    scores = {name: score(name, path, out, args.limit) for name, path in models.items()}
    speed = speeds(models)
    text = table(out, done, scores, speed, walls)
    (out / "budget_bench.json").write_text(json.dumps({"minutes": args.minutes, "scores": scores, "speed": speed,
                                                       "walls": walls}, indent=1))
    (out / "budget_bench.md").write_text(text)
    curves(out, done)
    print(text)


if __name__ == "__main__":
    main()
