"""`minitron distill` and `minitron correct` argument parsers (minitron.cli.commands dispatches here)."""

from __future__ import annotations

import argparse
from pathlib import Path

from minitron.distill.config import DistillConfig
from minitron.distill.loop import correct, distill
from minitron.distill.losses import (
    HIDDEN_LOSSES,
    LOSSES,
)

# ---- CLI parts (minitron.cli.commands dispatches here) ---------------------------------------------------------

def _common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by distill and correct; types and defaults come from DistillConfig."""
    from minitron.pipeline.config import add_option

    def opt(name, help="", **kw):
        add_option(p, DistillConfig, name, help, **kw)

    opt("data", "corpus: file, folder, data-dir name or `default`")
    p.add_argument("--out", required=True, help="output dir (model, metrics.jsonl, loss.png, checkpoints)")
    opt("tokens", "token budget (tokens processed)")
    opt("steps", "optimizer steps (wins over --tokens)")
    opt("seconds", "or a wall-time budget for the whole command: the first --probe-steps are timed and the steps "
                   "that fit are planned (budget.json)")
    opt("probe_steps", "timed steps before a --seconds plan (the warm-up is at least this long)")
    for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip"):
        opt(name)
    opt("freeze_embeddings", "do not train the token embedding nor the LM head (best where the hidden width is kept)")
    opt("batch_size", "blocks per micro-batch per rank")
    opt("grad_accum")
    opt("seq_len", "tokens per block")
    opt("chunk_size", "tokens per loss chunk")
    for name in ("eval_every", "eval_batches", "save_every", "max_blocks"):
        opt(name)
    opt("data_root", "folder laid out like shared/data", flag="--data-dir")
    opt("seed", "data order and initialization")
    opt("split_seed", "train/validation split (keep it across seeds)")
    p.add_argument("--heldout", nargs="*", help="extra held-out corpora whose LM loss is logged at each evaluation")
    opt("device")
    opt("dtype", "compute dtype: float32 | bfloat16 (fp32 master weights and optimizer states either way)")
    opt("teacher_dtype", "the frozen teacher's dtype (default: bfloat16 on CUDA, else --dtype)")
    opt("autocast", choices=["none", "bf16", "auto"])
    opt("grad_checkpointing", "activation checkpointing of the student")
    opt("distributed", choices=["auto", "none", "ddp", "fsdp"])
    p.add_argument("--fsdp-reduce-every-micro", action="store_true", default=None,
                   help="FSDP with --grad-accum: reduce-scatter gradients after every micro-batch (sharded gradients: "
                        "4 bytes x parameters less per GPU, grad_accum times the communication)")
    opt("resume", "continue the unfinished run in --out")
    opt("keep_checkpoints", "keep checkpoints/ after a finished run")
    opt("progress", "no progress bar", flag="--no-progress")


def add_distill_parsers(subparsers) -> None:
    """Add `distill` and `correct` to an argparse subparsers object."""
    from minitron.pipeline.config import add_option

    p = subparsers.add_parser("distill", help="distill a teacher into a student (forward KL on logits)")
    add_option(p, DistillConfig, "teacher")
    p.add_argument("--student", required=True)
    add_option(p, DistillConfig, "loss", choices=list(LOSSES))
    for name in ("temperature", "jsd_beta", "ce_weight", "kd_weight"):
        add_option(p, DistillConfig, name)
    add_option(p, DistillConfig, "hidden_loss", choices=list(HIDDEN_LOSSES))
    add_option(p, DistillConfig, "hidden_weight")
    p.add_argument("--layer-map", type=lambda s: [int(x) for x in s.split(",")],
                   help="teacher layer per student layer, comma separated")
    add_option(p, DistillConfig, "topk_cache", "dir of the teacher top-k log-prob cache (built once if missing; "
               "rebuilt when the teacher, data or settings differ)")
    add_option(p, DistillConfig, "topk")
    p.add_argument("--release-teacher", action="store_true", default=None,
                   help="with --topk-cache: free the teacher once the cache is built (its memory goes to the "
                        "student); the validation KL is then taken over the top-k + rest buckets (val_kl_topk)")
    _common_options(p)
    p.set_defaults(func=run_distill)
    c = subparsers.add_parser("correct", help="teacher correction: LM-loss fine-tune on the distillation data")
    c.add_argument("--model", required=True)
    _common_options(c)
    c.set_defaults(func=run_correct)


_SHARED = ("data", "out", "tokens", "steps", "seconds", "probe_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "freeze_embeddings",
           "batch_size", "grad_accum", "seq_len", "chunk_size", "eval_every", "eval_batches", "save_every",
           "max_blocks", "data_root", "seed", "split_seed", "heldout", "device", "dtype", "teacher_dtype", "autocast", "grad_checkpointing",
           "distributed", "fsdp_reduce_every_micro", "resume", "keep_checkpoints", "progress")


def run_distill(args) -> Path:
    kw = {k: getattr(args, k) for k in _SHARED}
    cfg = DistillConfig(student=args.student, teacher=args.teacher, loss=args.loss, temperature=args.temperature,
                        jsd_beta=args.jsd_beta, ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                        hidden_loss=args.hidden_loss, hidden_weight=args.hidden_weight, layer_map=args.layer_map,
                        topk_cache=args.topk_cache, topk=args.topk, release_teacher=args.release_teacher, **kw)
    return distill(cfg)


def run_correct(args) -> Path:
    kw = {k: getattr(args, k) for k in _SHARED if k not in ("data", "out", "tokens", "steps")}
    return correct(args.model, args.data, args.out, args.tokens, args.steps, **kw)
