"""Uniform vs per-layer widths at equal parameter count (issue 26), on the default teacher at the default size.

Arms, each pruned from the same importance scores (measured once on the default corpus) to the same parameter
budget (the default recipe's 70M when its search is off) and the same hidden/MLP split (chosen by held-out loss):

    uniform     every layer the same MLP width and KV groups (what minitron did until now)
    ffn         per-layer MLP widths (target.layer_widths=[ffn]); normalization chosen by held-out loss
    ffn-kv      per-layer MLP widths and KV groups (target.layer_widths=[ffn, kv_heads])
    ffn-measured  per-layer MLP widths from each layer's measured loss when narrowed alone (layer_norm=measured)

Then: WikiText-2 validation loss (the first --blocks blocks of --seq-len tokens) right after pruning; the same
distillation (--tokens tokens of the default corpus, the default recipe's LR schedule, same seed and data order)
for every arm; the same loss after it; and llama.cpp prefill / decode speed (batch 1, best of 3 interleaved rounds)
of each distilled student's f16 GGUF (uniform: arch llama; per-layer: arch deci) and the teacher's. Writes
<out>/per_layer_bench.md and .json; benchmarks/RESULTS.md quotes them.

    MINITRON_DATA_DIR=../shared/data .venv/bin/python benchmarks/per_layer_bench.py --out runs/per_layer_bench
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ARMS = {"uniform": (None, "loss"), "ffn": (["ffn"], "loss"), "ffn-kv": (["ffn", "kv_heads"], "loss"),
        "ffn-measured": (["ffn"], "measured")}
WIKITEXT = "wikitext-2-raw/wiki.valid.raw"


def wikitext_blocks(tokenizer, n: int, seq_len: int):
    """The first n blocks of seq_len tokens of WikiText-2 validation -> [n, seq_len]."""
    from minitron.data.sources import data_dir

    root = data_dir()
    if root is None:
        raise SystemExit("set MINITRON_DATA_DIR to a folder laid out like shared/data (WikiText-2)")
    text = (root / WIKITEXT).read_text()
    ids = tokenizer(text[: n * seq_len * 8], return_tensors="pt").input_ids[0]
    return ids[: n * seq_len].reshape(n, seq_len)  # [N*T] -> [N, T]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/per_layer_bench")
    ap.add_argument("--params", default="70M")
    ap.add_argument("--tokens", type=int, default=24_576)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args(argv)
    from minitron.arch.models import lm_loss, load_model
    from minitron.distill import DistillConfig, distill
    from minitron.export import runtime as R
    from minitron.export.gguf import export_gguf
    from minitron.prune import PruneConfig, prune
    from minitron.prune.plan import PrunePlan, Target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tok = load_model("default")
    blocks = wikitext_blocks(tok, args.blocks, args.seq_len)
    rows = {"teacher": {"loss_pruned": lm_loss(teacher, blocks), "params": sum(p.numel() for p in teacher.parameters())}}
    export_gguf(teacher, tok, out / "teacher-f16.gguf", "f16")
    del teacher
    scores = None
    for arm in args.arms.split(","):
        pruned, distilled = out / arm / "pruned", out / arm / "distilled"
        t0 = time.perf_counter()
        if not (pruned / "plan.json").is_file():
            prune(PruneConfig(model="default", out=str(pruned), scores=scores, overwrite=True,
                              target=Target(params=args.params, layer_widths=ARMS[arm][0], layer_norm=ARMS[arm][1])))
        scores = scores or str(pruned / "scores.safetensors")  # later arms: the same scores, no calibration
        plan = PrunePlan.load(pruned / "plan.json")
        metrics = json.loads((pruned / "prune_metrics.json").read_text())
        student = load_model(str(pruned), with_tokenizer=False)[0]
        row = {"params": plan.params_after["total"], "loss_pruned": lm_loss(student, blocks),
               "split": f"{plan.target['hidden']}/{plan.target['ffn']}", "norm": plan.per_layer.get("norm"),
               "norms": metrics.get("layer_norms"), "ffn": [w["ffn"] for w in plan.per_layer.get("widths", [])],
               "kv_heads": [w["kv_heads"] for w in plan.per_layer.get("widths", [])], "prune_s": time.perf_counter() - t0}
        if not (distilled / "minitron_distill.json").is_file():
            distill(DistillConfig(student=str(pruned), out=str(distilled), tokens=args.tokens, lr=1e-3, min_lr=1e-4,
                                  eval_every=0, save_every=0, seq_len=args.seq_len, progress=False))
        student, stok = load_model(str(distilled))
        row["loss_distilled"] = lm_loss(student, blocks)
        export_gguf(student, stok, out / f"{arm}-f16.gguf", "f16")
        rows[arm] = row
        print(f"[bench] {arm}: {row['params'] / 1e6:.2f}M, WikiText-2 loss pruned {row['loss_pruned']:.4f}, "
              f"distilled {row['loss_distilled']:.4f}", flush=True)
    speed = R.speed({k: out / f"{k}-f16.gguf" for k in rows}, prompt_tokens=128, gen_tokens=32, rounds=3)
    (out / "per_layer_bench.json").write_text(json.dumps({"args": vars(args), "rows": rows, "speed": speed}, indent=1))
    t = speed["teacher"]
    lines = [f"WikiText-2 validation loss ({args.blocks} blocks of {args.seq_len}); distillation {args.tokens:,} tokens "
             "each; llama.cpp f16, batch 1, best of 3.", "",
             "| arm | params | hidden/MLP | normalization | loss after pruning | after distillation | prefill | decode |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        s = speed[k]
        lines.append(f"| {k} | {r['params'] / 1e6:.2f}M | {r.get('split', '')} | {r.get('norm') or ''} | "
                     f"{r['loss_pruned']:.4f} | {r.get('loss_distilled', float('nan')):.4f} | "
                     f"{s['prefill_tok_s'] / t['prefill_tok_s']:.2f}x | {s['decode_tok_s'] / t['decode_tok_s']:.2f}x |")
    for k, r in rows.items():
        if r.get("ffn"):
            lines += ["", f"{k}: MLP widths {r['ffn']}; KV groups {r['kv_heads']}"]
        if r.get("norms"):
            lines += [f"{k}: loss after pruning (selection blocks) by normalization: " + ", ".join(
                f"{n['norm']} {n['loss_pruned']:.4f}" for n in r["norms"])]
    (out / "per_layer_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
