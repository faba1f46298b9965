"""Issue-2 measurements on one teacher, in one run (ratios against a baseline measured in the same run).

1. importance-pass time / plain forward time over the same calibration blocks;
2. held-out loss of the teacher, of a width-pruned student at a non-embedding budget with activation
   importance, of the same dims with random importance, and of depth-pruned students (one contiguous
   block chosen by LM loss) at equal total and at equal non-embedding parameters.

    python benchmarks/prune_bench.py --model default --calib-samples 128 --seq-len 512 --out runs/prune_bench
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from minitron import arch
from minitron.arch.models import lm_loss, load_model
from minitron.data import calibration_sample, load_splits
from minitron.prune import apply_plan
from minitron.prune.importance import ImportanceConfig, compute_importance, layer_lm_loss, random_scores
from minitron.prune.plan import Target, count_params, make_plan


@torch.no_grad()
def timed_forward(model, blocks, batch_size):
    t = time.perf_counter()
    for i in range(0, len(blocks), batch_size):
        model(input_ids=blocks[i:i + batch_size], use_cache=False)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--heldout-samples", type=int, default=32, help="validation blocks for the reported losses")
    ap.add_argument("--rank-samples", type=int, default=8, help="validation blocks for the LM-loss layer ranking")
    ap.add_argument("--fraction", type=float, default=0.5, help="non-embedding parameter fraction to keep")
    ap.add_argument("--out", default="runs/prune_bench")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher, tok = load_model(args.model)
    splits = load_splits(args.data, tok, args.seq_len)
    calib = calibration_sample(splits.train, args.calib_samples)
    heldout = splits.validation[: args.heldout_samples]
    rank = splits.validation[args.heldout_samples: args.heldout_samples + args.rank_samples]
    res = {"model": args.model, "calib": list(calib.shape), "heldout": list(heldout.shape),
           "threads": torch.get_num_threads()}

    t_fwd = timed_forward(teacher, calib, args.batch_size)
    t = time.perf_counter()
    scores = compute_importance(teacher, calib, ImportanceConfig(batch_size=args.batch_size))
    t_imp = time.perf_counter() - t
    res.update(forward_s=t_fwd, importance_s=t_imp, importance_over_forward=t_imp / t_fwd)
    print(f"importance pass {t_imp:.1f}s / plain forward {t_fwd:.1f}s = {t_imp / t_fwd:.2f}x", flush=True)

    src = count_params(teacher.config)
    width = make_plan(teacher.config, scores, Target(params=args.fraction * src["non_embedding"],
                                                     params_kind="non_embedding"))
    L = arch.dims_of(teacher.config).layers
    per_layer = (src["non_embedding"] - 0) / L  # norms outside layers are negligible
    n_equal_total = L - round((width.params_after["total"] - (src["total"] - src["non_embedding"])) / per_layer)
    n_equal_nonemb = L - round(width.params_after["non_embedding"] / per_layer)
    t = time.perf_counter()
    depth_scores = layer_lm_loss(teacher, rank, [n_equal_total, n_equal_nonemb], args.batch_size)
    res["layer_lm_loss_s"] = time.perf_counter() - t
    scores.update(depth_scores)
    plans = {
        "width_activation": width,
        "width_random": make_plan(teacher.config, random_scores(scores, 0), Target(**{
            k: width.target[k] for k in ("hidden", "ffn", "heads", "kv_heads", "layers")})),
        f"depth_lm_loss_equal_total(drop {n_equal_total})": make_plan(teacher.config, scores, Target(layers=L - n_equal_total)),
        f"depth_lm_loss_equal_non_embedding(drop {n_equal_nonemb})": make_plan(teacher.config, scores, Target(layers=L - n_equal_nonemb)),
        f"depth_bi_equal_non_embedding(drop {n_equal_nonemb})": make_plan(
            teacher.config, scores, Target(layers=L - n_equal_nonemb, layer_metric="bi")),
    }
    rows = [{"model": "teacher", "params": src, "heldout_loss": lm_loss(teacher, heldout, args.batch_size)}]
    print(json.dumps(rows[-1]), flush=True)
    for name, plan in plans.items():
        student = apply_plan(copy.deepcopy(teacher), plan)
        rows.append({"model": name, "params": plan.params_after, "dims": plan.target,
                     "dropped_layers": plan.dropped_layers, "heldout_loss": lm_loss(student, heldout, args.batch_size)})
        print(json.dumps(rows[-1]), flush=True)
        del student
    res["rows"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_bench.json").write_text(json.dumps(res, indent=1))
    print("\n| model | params (total / non-emb) | held-out loss | ppl |\n|---|---|---|---|")
    for r in rows:
        p = r["params"]
        print(f"| {r['model']} | {p['total'] / 1e6:.1f}M / {p['non_embedding'] / 1e6:.1f}M | "
              f"{r['heldout_loss']:.4f} | {torch.tensor(r['heldout_loss']).exp():.1f} |")


if __name__ == "__main__":
    main()
