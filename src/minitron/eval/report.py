"""Plots (matplotlib, Agg backend) of what a stage measured."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has(scores: dict[str, torch.Tensor], key: str) -> bool:
    """The scores hold a non-empty `key` (attention-free models have heads [L, 0], no MLP neurons [L, 0])."""
    return key in scores and scores[key].numel() > 0


def _heatmap(fig, ax, scores: torch.Tensor, title: str, ylabel: str, log: bool = False) -> None:
    """Per-layer scores [L, N] as an N x L heatmap (log colour scale: a floor of 1e-6 x the maximum)."""
    from matplotlib.colors import LogNorm

    values = scores.T  # [L, N] -> [N, L]: layers along x
    norm = None
    if log:
        values, norm = values.clamp_min(1e-6 * float(values.max().clamp_min(1e-12))), LogNorm()
    im = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", norm=norm)
    ax.set(title=title, xlabel="layer", ylabel=ylabel)
    fig.colorbar(im, ax=ax)


def _layer_curves(ax, scores: dict[str, torch.Tensor]) -> None:
    """Block Importance per layer [L], with the LM-loss increase [L] on a twin axis when measured."""
    layers = range(scores["layer_bi"].numel())
    ax.plot(layers, scores["layer_bi"].numpy(), "o-", label="Block Importance (1 - cos)")
    ax.set(title="layer importance", xlabel="layer", ylabel="BI")
    if "layer_lm_loss" in scores:
        twin = ax.twinx()
        twin.plot(layers, scores["layer_lm_loss"].numpy(), "s-", color="tab:red", label="LM-loss increase")
        twin.set_ylabel("LM-loss increase when removed", color="tab:red")
        twin.legend(loc="upper center")
    ax.legend(loc="upper right")


def _channels(ax, channels: torch.Tensor) -> None:
    """Hidden-channel scores [C], sorted, on a log axis."""
    ax.plot(channels.sort(descending=True).values.numpy())
    ax.set(title="embedding channel importance (sorted)", xlabel="rank", ylabel="score", yscale="log")


def importance_panels(scores: dict[str, torch.Tensor]) -> list[str]:
    """The panels plot_importance draws for these scores, in order: each only where the scores hold its axis
    (heads: attention; neurons: MLP; mamba_heads: Mamba layers; experts / router_tokens: MoE)."""
    return [key for key in ("heads", "neurons", "mamba_heads", "channels", "layer_bi", "experts", "router_tokens")
            if _has(scores, key)]


def plot_importance(scores: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """One figure, two panels a row, each drawn only where the scores hold its axis (importance_panels):
    attention head, MLP neuron and Mamba head heatmaps per layer, sorted channel scores, layer-importance
    curves; for an MoE model also expert importance and the router statistics (share of tokens routed to each
    expert). Layers without a part (hybrid models) show a zero column in that part's heatmap."""
    plt = _plt()
    panels = importance_panels(scores)
    if not panels:
        raise ValueError("the scores hold none of the axes plot_importance draws (heads, neurons, mamba_heads, "
                         "channels, layer_bi); pass the scores of an importance pass")
    moe = "router_tokens" in scores
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        if key == "heads":
            _heatmap(fig, ax, scores["heads"], "attention head importance", "head")
        elif key == "neurons":
            _heatmap(fig, ax, scores["neurons"], "MLP neuron importance (log scale)",
                     "expert x neuron (expert-major)" if moe else "neuron", log=True)
        elif key == "mamba_heads":
            _heatmap(fig, ax, scores["mamba_heads"], "Mamba head importance (x segment of in_proj)", "Mamba head")
        elif key == "channels":
            _channels(ax, scores["channels"])
        elif key == "layer_bi":
            _layer_curves(ax, scores)
        elif key == "experts":
            _heatmap(fig, ax, scores["experts"], "expert importance (output norm)", "expert")
        else:
            _heatmap(fig, ax, scores["router_tokens"], "router: share of tokens routed to each expert", "expert")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_blocks(scores: dict[str, torch.Tensor], path: Path) -> Path | None:
    """The second paper's Figs. 8-9: each metric per removed contiguous block, against its first layer."""
    sizes = sorted({int(k.split(".")[1]) for k in scores if k.startswith(("block_lm_loss.", "block_task."))})
    if not sizes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        other = scores.get(f"block_lm_loss.{n}", scores.get(f"block_task.{n}"))
        start = range(other.numel())
        if f"block_bi.{n}" in scores:  # BI is measured only for the block sizes a run needs
            ax.plot(start, scores[f"block_bi.{n}"].numpy(), "o-", label="Block Importance (1 - cos)")
        ax.set(title=f"removing {n} contiguous layer(s)", xlabel="first removed layer", ylabel="BI")
        twin = ax.twinx()
        if f"block_lm_loss.{n}" in scores:
            twin.plot(start, scores[f"block_lm_loss.{n}"].numpy(), "s-", color="tab:red", label="LM-loss increase")
        if f"block_task.{n}" in scores:
            twin.plot(start, scores[f"block_task.{n}"].numpy(), "^-", color="tab:green", label="task accuracy drop")
        twin.set_ylabel("LM-loss increase / accuracy drop")
        ax.legend(loc="upper left")
        twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_layer_widths(per_layer: dict, uniform: dict, path: Path) -> Path:
    """Per-layer widths (PrunePlan.per_layer) against the uniform target's: MLP neurons and KV groups per kept
    layer, source layer numbers on x; a zero bar is a layer without that part."""
    plt = _plt()
    widths = per_layer["widths"]
    x = [w["layer"] for w in widths]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, name in ((axes[0], "ffn", "MLP neurons"), (axes[1], "kv_heads", "KV groups")):
        ax.bar(x, [w[key] for w in widths], color="tab:blue", label="per-layer")
        ax.axhline(uniform[key], color="tab:red", linestyle="--", label=f"uniform ({uniform[key]})")
        ax.set(title=f"{name} per layer ({per_layer['norm']} normalization)", xlabel="source layer", ylabel=name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_search(rows: list[dict], path: Path) -> Path:
    """Candidates: parameters against validation loss after pruning and after short training; where their speed was
    measured (search.speedup), a second panel of prefill speed-up against loss with the Pareto front and the pick."""
    plt = _plt()
    rows = [r for r in rows if "skipped" not in r]  # candidates the planner refused have no loss
    speed = bool(rows) and "prefill_speedup" in rows[0]
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(14 if speed else 8, 5), squeeze=False)
    ax = axes[0][0]
    params = [r["params"]["total"] / 1e6 for r in rows]
    ax.scatter(params, [r["loss_pruned"] for r in rows], label="after pruning", marker="o")
    trained = [(p, r["loss_trained"]) for p, r in zip(params, rows, strict=True) if "loss_trained" in r]
    if trained:
        ax.scatter(*zip(*trained, strict=True), label="after short distillation", marker="s")
    for p, r in zip(params, rows, strict=True):
        d = r["dims"]
        ax.annotate(f"L{d['layers']} h{d['hidden']} f{d['ffn']} H{d['heads']}", (p, r["loss_pruned"]),
                    fontsize=7, alpha=0.7)
    ax.set(xlabel="parameters (M)", ylabel="validation loss", title="architecture search candidates")
    ax.legend()
    if speed:
        ax = axes[0][1]
        loss = [r.get("loss_trained", r["loss_pruned"]) for r in rows]
        sp = [r["prefill_speedup"] for r in rows]
        ax.scatter(sp, loss, c="lightgray", label="candidates")
        front = sorted((s, v) for s, v, r in zip(sp, loss, rows, strict=True) if r.get("pareto"))
        if front:
            ax.plot(*zip(*front, strict=True), "o-", color="tab:blue", label="Pareto front")
        ax.scatter([sp[0]], [loss[0]], marker="*", s=250, color="tab:red", zorder=3, label="chosen")
        for s_, v, r in zip(sp, loss, rows, strict=True):
            d = r["dims"]
            ax.annotate(f"L{d['layers']} h{d['hidden']} f{d['ffn']}", (s_, v), fontsize=7, alpha=0.7)
        ax.set(xlabel="prefill speed-up at batch 1 (measured)", ylabel="validation loss (trained where trained)",
               title="quality against speed")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _params_line(p: dict) -> str:
    line = f"{p['total'] / 1e6:.2f}M total, {p['non_embedding'] / 1e6:.2f}M non-embedding"
    if p.get("active", p["total"]) != p["total"]:  # MoE: what one token uses
        line += f", {p['active'] / 1e6:.2f}M active per token"
    return line


def _eval_table(results: dict) -> str:
    """Markdown table of an evaluate() result, columns = tasks, rows = models (labelled)."""
    return markdown_table_of(results)


def gguf_lines(g: dict) -> list[str]:
    """Markdown of a GGUF export (gguf.json): file, type, size, and the llama.cpp speed-up when measured."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(g["tensor_types"].items()))
    lines = ["## GGUF for llama.cpp", "",
             f"`{g['file']}`: type {g['type']}, llama.cpp architecture `{g['architecture']}`, "
             f"{g['bytes'] / 2**20:.1f} MiB (tensors: {types}). Run it with `llama-cli -m {g['file']}` or "
             "llama-cpp-python.", ""]
    if g.get("unquantized_rows"):
        lines += [f"Matrices with rows of {', '.join(map(str, g['unquantized_rows']))} values are not a whole number of "
                  f"{g['type']} blocks and stay f16 (docs/export.md: prune to multiples of 32 to quantize them).", ""]
    s = g.get("llama_cpp")
    if s:
        t, st = s["teacher"], s["student"]
        lines += [f"Measured under llama.cpp ({t['threads']} threads, {t['prompt_tokens']}-token prompt, "
                  f"{t['gen_tokens']} generated tokens, best of {t['rounds']} interleaved rounds, both in {g['type']}):", "",
                  "| model | file | prompt tok/s | generation tok/s |", "|---|---|---|---|",
                  f"| teacher | {s['teacher_bytes'] / 2**20:.1f} MiB | {t['prefill_tok_s']:.0f} | {t['decode_tok_s']:.1f} |",
                  f"| student | {g['bytes'] / 2**20:.1f} MiB | {st['prefill_tok_s']:.0f} ({s['prefill_speedup']:.2f}x) | "
                  f"{st['decode_tok_s']:.1f} ({s['decode_speedup']:.2f}x) |", ""]
    return lines


def blend_lines(drawn: dict, title: str) -> list[str]:
    """Markdown of a blend drawn (store_blends.blend_summary's json): per source the weight asked and what was drawn."""
    lines = [f"## {title}", "", f"{drawn['blocks']:,} blocks of {drawn['seq_len']} tokens drawn (train + validation):",
             "", "| source | weight asked | blocks drawn | share drawn | tokens drawn |", "|---|---:|---:|---:|---:|"]
    for d in drawn["sources"]:
        lines.append(f"| `{d['source']}` | {d['weight']:.1%} | {d['blocks']:,} | {d['share']:.1%} | {d['tokens']:,} |")
    return [*lines, ""]


def _architecture_table(plan: dict) -> list[str]:
    """Markdown rows of teacher vs student dims (a plan.json); Mamba heads / head dim columns where the model
    has Mamba layers."""
    src, tgt = plan["source"], plan["target"]
    cols = [("layers", "layers"), ("hidden", "hidden"), ("ffn", "MLP"), ("heads", "heads"), ("kv_heads", "KV heads")]
    if src.get("mamba_heads"):
        cols += [("mamba_heads", "Mamba heads"), ("mamba_head_dim", "Mamba head dim")]
    lines = ["## Architecture", "", "| | " + " | ".join(name for _, name in cols) + " | parameters |",
             "|---" * (len(cols) + 2) + "|"]
    for label, d, params in (("teacher", src, plan["params_before"]), ("student", tgt, plan["params_after"])):
        lines.append(f"| {label} | " + " | ".join(str(d[k]) for k, _ in cols) + f" | {_params_line(params)} |")
    return [*lines, ""]


def per_layer_lines(per_layer: dict) -> list[str]:
    """The per-layer widths of a plan (PrunePlan.per_layer) as a table, one row per kept layer."""
    lines = ["## Per-layer widths", "",
             f"Each layer keeps its own {' and '.join(per_layer['axes'])} (scores compared across layers by the "
             f"`{per_layer['norm']}` normalization, floor {per_layer['floor']:g} of the uniform width"
             + (", whole attention / MLP may be dropped" if per_layer["drop_parts"] else "") + "); 0 = no such part.",
             "", "| layer (source) | query heads | KV heads | MLP neurons |", "|---|---|---|---|"]
    lines += [f"| {w['layer']} | {w['heads']} | {w['kv_heads']} | {w['ffn']} |" for w in per_layer["widths"]]
    return [*lines, ""]


def per_layer_use_lines(layouts: list[str]) -> list[str]:
    """How to load a per-layer student (transformers' modeling builds every layer from the global config)."""
    lines = ["## Use", "", "Its config.json holds transformers' `per_layer_config`; transformers 5.25's Llama / Qwen2 / "
             "Mistral modeling does not build per-layer widths yet, so load it with minitron:", "", "```python",
             "from minitron.arch.models import load_model", "model, tokenizer = load_model(PATH)", "```", ""]
    if "padded" in layouts:
        lines += ["`padded/`: the same model zero-padded to the widest layer, for stock "
                  "`AutoModelForCausalLM.from_pretrained` (the same logits; no memory or speed saved).", ""]
    if "nemotron-nas" in layouts:
        lines += ["`nemotron-nas/`: NVIDIA's DeciLM layout, which vLLM loads (`vllm serve nemotron-nas/ "
                  "--trust-remote-code`; the config names NVIDIA's DeciLM code in auto_map).", ""]
    lines += ["A GGUF export (`minitron export --gguf TYPE`) is llama.cpp's `deci` architecture, with the widths per "
              "layer.", ""]
    return lines


def write_model_card(path: Path, card: dict) -> Path:
    """README.md of an exported student: front matter, provenance, recipe, data, tokens, scores."""
    plan = card.get("plan") or {}
    base = [f"base_model: {card['base_model']}"] if card.get("base_model") else []
    lines = ["---", "library_name: transformers", *base, "tags: [minitron, pruning, distillation]", "---", "",
             "# Minitron student", "",
             f"Made with minitron (Minitron pruning + distillation for Hugging Face models) from `{card['source']}` "
             f"by structured pruning ({card.get('criterion', 'activation')} importance, Minitron recipe) followed by "
             f"logit distillation ({card['loss']}) from {card['teacher'] if card['teacher'] != card['source'] else 'it'} "
             f"on `{card['corpus']}` for {card['distill_tokens']:,} tokens.", ""]
    if plan:
        lines += _architecture_table(plan)
        if plan.get("dropped_layers"):
            lines += [f"Dropped layers: {plan['dropped_layers']} ({plan['layer_choice'].get('how', '')}).", ""]
    if plan.get("per_layer"):
        lines += per_layer_lines(plan["per_layer"])
    if card.get("results"):
        lines += ["## Evaluation (zero-shot, scored as lm-evaluation-harness 0.4 scores them)", "",
                  _eval_table(card["results"]), ""]
    if card.get("gguf"):
        lines += gguf_lines(card["gguf"])
    if plan.get("per_layer"):
        lines += per_layer_use_lines(card.get("layouts") or [])
    else:
        lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)  # no custom code", "```", ""]
    lines += [f"Recipe: `{card['recipe']}`.", ""]
    Path(path).write_text("\n".join(lines))
    return Path(path)


def write_report(out: Path) -> Path:
    """report.md of a `minitron run` output dir, from the artifacts its stages wrote."""
    out = Path(out)
    lines = [f"# minitron run: {out.name}", "", "## Recipe", "", "```yaml", (out / "config.yaml").read_text().rstrip(),
             "```", ""]
    budget = _json(out / "budget.json")
    if budget:
        lines += budget_lines(budget)
    for plan_path in sorted(out.glob("**/prune/plan.json")):
        plan = json.loads(plan_path.read_text())
        rel = plan_path.parent.relative_to(out)
        lines += [f"## Pruning ({rel})", "", f"- before: {plan['source']} — {_params_line(plan['params_before'])}",
                  f"- after: {plan['target']} — {_params_line(plan['params_after'])}",
                  f"- dropped layers: {plan['dropped_layers'] or 'none'}"]
        metrics = plan_path.parent / "prune_metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            lines.append(f"- held-out loss right after pruning: {m['heldout_loss_before']:.4f} -> "
                         f"{m['heldout_loss_after']:.4f}")
            if m.get("layer_norms"):
                lines.append("- per-layer widths, held-out loss right after pruning by normalization: " + ", ".join(
                    f"{r['norm']} {r['loss_pruned']:.4f}" for r in m["layer_norms"]))
        lines.append("")
        if plan.get("per_layer"):
            lines += per_layer_lines(plan["per_layer"])
            if (plan_path.parent / "layer_widths.png").is_file():
                lines += [f"![layer widths]({(plan_path.parent / 'layer_widths.png').relative_to(out)})", ""]
    for img in sorted(out.glob("**/importance/*.png")):
        lines += [f"![{img.stem}]({img.relative_to(out)})", ""]
    if (out / "search" / "search.md").is_file():
        lines += ["## Architecture search", "", (out / "search" / "search.md").read_text(),
                  "![search](search/search.png)", ""]
    for curve in sorted(out.glob("**/distill/loss.png")):
        lines += [f"## Distillation ({curve.parent.relative_to(out)})", ""]
        chosen = (_json(curve.parent / "distill_config.json") or {}).get("autocast_chosen")
        if chosen:
            lines += [precision_line(chosen), ""]
        lines += [f"![loss]({curve.relative_to(out)})", ""]
    for drawn in sorted(out.glob("**/distill/blend_drawn.json")):
        lines += blend_lines(json.loads(drawn.read_text()), f"Data blend drawn ({drawn.parent.relative_to(out)})")
    results = out / "eval" / "results.json"
    if results.is_file():
        lines += ["## Evaluation", "", _eval_table(json.loads(results.read_text())), "", "![eval](eval/results.png)", ""]
    if (out / "export" / "config.json").is_file():
        lines += ["## Export", "", "`export/` is a plain Hugging Face model dir with a model card "
                  "(`AutoModelForCausalLM.from_pretrained('export')`).", ""]
        if (out / "export" / "gguf.json").is_file():
            lines += [line.replace("## GGUF", "### GGUF") for line in
                      gguf_lines(json.loads((out / "export" / "gguf.json").read_text()))]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def precision_line(chosen: dict) -> str:
    """What the distillation computed in (distill_config.json's autocast_chosen: minitron.distill.precision)."""
    mode = "bf16 autocast (fp32 master weights)" if chosen["autocast"] == "bf16" else "fp32"
    if "fp32_s" in chosen:
        return (f"Computed in {mode}, the faster here (autocast: auto; one forward+backward of the student took "
                f"{chosen['fp32_s']:.3f} s in fp32 and {chosen['bf16_s']:.3f} s under bf16 autocast).")
    return f"Computed in {mode} (autocast: {chosen['how']})."


def budget_lines(b: dict) -> list[str]:
    """How the run's budget (budget.json: minitron.pipeline.budget) was planned and spent."""
    r = b["reserved"]
    lines = ["## Budget", "", f"{b['budget_s'] / 60:.1f} minutes for the whole run:", "",
             "| | seconds |", "|---|---|",
             f"| stages before distillation (importance, search, prune, the teacher's evaluation) | "
             f"{b['spent_before_distill_s']:.0f} |",
             f"| reserved: the student's evaluation ({b['student_share']:.0%} of the teacher's "
             f"{b['teacher_eval_s']:.0f} s) | {r['student_eval_s']:.0f} |",
             f"| reserved: speed rounds, export | {r['speed_s'] + r['export_s']:.0f} |",
             f"| distillation | {b['distill_s']:.0f} |"]
    d = b.get("distill")
    if d:
        # `replans`: every later plan; runs before 2026-12-07 night recorded one, as `replanned`
        again = d.get("replans") or ([d["replanned"]] if d.get("replanned") else [])
        after = [a["total_steps_before"] for a in again[1:]] + [d["total_steps"]] if again else []  # their steps
        planned = f"planned {again[0]['total_steps_before'] if again else d['total_steps']} steps" + "".join(
            f", then {n} at step {a['at_step']} from the steps since ({a['step_s']:.2f} s each)"
            for a, n in zip(again, after, strict=True))
        lines += ["", f"Distillation timed its first {d['probe_steps']} steps ({d['step_s']:.2f} s each, "
                  f"{d['tok_per_s']:,.0f} tokens/s) and {planned}: {d['tokens']:,} tokens."]
    if "spent_s" in b:
        lines.append(f"The run took {b['spent_s']:.0f} s ({b['over_s']:+.0f} s against the budget).")
    return lines + [""]


# ---- the README's measured section, from a run's artifacts ---------------------------------------------------

BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"


def readme_section(run: Path) -> str:
    """The README's "Measured on this machine" section from a `minitron run` output dir: the invocation that made it
    (run_log.jsonl: date, commit, machine, seconds per stage), the plan, the held-out losses, the distillation and
    the evaluation table. Raises FileNotFoundError naming what is missing."""
    from minitron.arch.runlog import last_invocation

    run = Path(run)
    log = last_invocation(run)
    plan, results = _json(run / "prune" / "plan.json"), _json(run / "eval" / "results.json")
    if not log or plan is None or results is None:
        raise FileNotFoundError(f"{run} holds no finished `minitron run` (run_log.jsonl with an end record, "
                                "prune/plan.json, eval/results.json); run the recipe first")
    start, stages = log[0], {r["stage"]: r["seconds"] for r in log if r["event"] == "stage"}
    date = start["at"][:10]
    # a stage that did nothing (off, or found up to date) takes ~0 s and is left out
    times = ", ".join(f"{k} {v:.0f} s" if v >= 10 else f"{k} {v:.1f} s" for k, v in stages.items() if v >= 0.05)
    lines = [f"### Measured on this machine ({start['cpus']} CPU cores, {date}, commit {start['commit']})", "",
             f"Written by `python -m minitron.eval.report --readme {run}` from that run's files; rerun it after the "
             "defaults change.", "",
             f"`minitron run` ({(run / 'config.yaml').name} in `{run}`): {_minutes(log[-1]['seconds'])} wall on "
             f"{start['device']} ({times}), minitron {start['minitron']}, torch {start['torch']}."]
    src, dst = plan["source"], plan["target"]
    widths = [w["ffn"] for w in (plan.get("per_layer") or {}).get("widths", [])]
    mlp = (f"per layer {min(widths)}-{max(widths)} (in all as {dst['ffn']} in every layer)"
           if widths and min(widths) != max(widths) else dst["ffn"])
    lines.append(f"The student has {plan['params_after']['total'] / 1e6:.1f}M parameters (teacher "
                 f"{plan['params_before']['total'] / 1e6:.1f}M; hidden {src['hidden']} -> {dst['hidden']}, MLP "
                 f"{src['ffn']} -> {mlp}, {dst['heads']} heads / {dst['kv_heads']} KV heads, {dst['layers']} of "
                 f"{src['layers']} layers).")
    metrics, distilled = _json(run / "prune" / "prune_metrics.json"), _json(run / "distill" / "minitron_distill.json")
    if metrics and distilled and distilled.get("final_eval"):
        lines.append(f"Held-out loss (the corpus' validation split): {metrics['heldout_loss_before']:.2f} teacher, "
                     f"{metrics['heldout_loss_after']:.2f} right after pruning, "
                     f"{distilled['final_eval']['val_lm_loss']:.2f} after distilling {distilled['tokens']:,} tokens.")
    budget = _json(run / "budget.json")
    if budget and "spent_s" in budget:
        lines.append(f"Budget: {budget['budget_s'] / 60:.1f} min, of which distillation was given "
                     f"{budget['distill_s']:.0f} s; the run took {_minutes(budget['spent_s'])}.")
    lines += ["", markdown_table_of(results).rstrip()]
    return "\n".join(lines) + "\n"


def markdown_table_of(results: dict) -> str:
    from minitron.eval.harness import markdown_table

    return markdown_table(results)


def write_readme_section(run: Path, readme: Path) -> Path:
    """Replace what stands between README's measured markers with readme_section(run)."""
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} markers around its measured section")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    Path(readme).write_text(f"{head}{BEGIN}\n{readme_section(run)}{END}{tail}")
    return Path(readme)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m minitron.eval.report",
                                description="write README's measured section from a `minitron run` output dir")
    p.add_argument("--readme", metavar="RUN", required=True, help="the run's output dir, e.g. runs/default")
    p.add_argument("--file", default="README.md", help="the README to rewrite between its measured markers")
    args = p.parse_args()
    print(f"[minitron] {write_readme_section(Path(args.readme), Path(args.file))}: measured section from {args.readme}")
