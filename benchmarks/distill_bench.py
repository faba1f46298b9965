"""Distillation step: this trainer vs a naive full-logit KD step vs the top-k cache mode.

Each mode runs in its own fresh process (so peak memory is its own) on the same teacher, student and
batch: warm-up step(s), then timed steps (teacher forward + student forward/backward + AdamW step;
the top-k mode reads precomputed teacher top-k instead of running the teacher).

  (a) ours    chunked loss (minitron.distill.losses): logits projected chunk by chunk, never [B, T, V]
  (a+ckpt)    the same with activation checkpointing of the student
  (b) naive   teacher and student full-vocab fp32 logits [B, T, V], log_softmax, KL, backward
  (c) top-k   ours with the teacher's top-k log-probs (k = --k) read from memory, no teacher forward

Peak memory: CUDA max_memory_allocated; on CPU the peak resident set sampled every 1 ms during the
timed steps, minus the resident set before them (models, optimizer state and batch already loaded).
The CPU children run with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072), so every large
tensor is its own mapping, returned to the OS when freed: the resident set then follows live tensors
instead of the allocator's cache.

  PYTHONPATH=src python benchmarks/distill_bench.py --teacher default --student slice:15 \
      --batch-size 16 --seq-len 256 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch
from torch import nn

MODES = ("ours", "ours+ckpt", "naive", "topk")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples the resident set every 2 ms in a thread; .peak is the max seen."""

    def __init__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def slice_student(teacher: nn.Module, n_layers: int) -> nn.Module:
    """A depth-pruned student: a copy of the teacher keeping its first n_layers decoder layers."""
    from minitron.arch import decoder_layers, set_decoder_layers

    student = copy.deepcopy(teacher)
    set_decoder_layers(student, nn.ModuleList(list(decoder_layers(student))[:n_layers]))
    student.config.num_hidden_layers = n_layers
    if getattr(student.config, "layer_types", None) is not None:
        student.config.layer_types = student.config.layer_types[:n_layers]
    return student


def load_pair(args, device):
    from minitron.arch.models import load_model

    teacher = load_model(args.teacher, device, args.dtype, with_tokenizer=False)[0].requires_grad_(False).eval()
    if args.student.startswith("slice:"):
        student = slice_student(teacher, int(args.student.split(":")[1])).requires_grad_(True)
    else:
        student = load_model(args.student, device, args.dtype, with_tokenizer=False)[0]
    return teacher, student.train()


def run_mode(args) -> dict:
    from minitron.distill import Student, teacher_pass
    from minitron.distill.losses import LossConfig
    from minitron.distill.topk_cache import teacher_topk

    torch.manual_seed(0)
    device = torch.device(args.device)
    teacher, student = load_pair(args, device)
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)    # [B, T]
    att = torch.ones_like(ids)
    n_tok = ids.numel()
    cfg = LossConfig(chunk_size=args.chunk_size)
    module = Student(student, None, None, "none")
    if args.mode == "ours+ckpt":
        student.activation_checkpointing_enable({"use_reentrant": False})
    optim = torch.optim.AdamW(module.parameters(), lr=1e-5, betas=(0.9, 0.95))
    topk = None
    if args.mode == "topk":
        idx, lp = teacher_topk(teacher, ids, args.k, 1.0, args.chunk_size)          # [B, T-1, k]
        topk = (idx.reshape(-1, args.k).to(device), lp.reshape(-1, args.k).to(device))  # [B*(T-1), k]
        del teacher
        teacher = None

    def step():
        if args.mode == "naive":
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits[:, :-1].float()            # [B, T-1, V]
            s_logits = student(input_ids=ids).logits[:, :-1].float()                # [B, T-1, V]
            t_logp = torch.log_softmax(t_logits, dim=-1)
            s_logp = torch.log_softmax(s_logits, dim=-1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)                          # [B, T-1]
            loss = kl.sum() / kl.numel()
        else:
            t_hidden = teacher_pass(teacher, None, ids, att)[0] if teacher is not None else None
            loss = module(ids, att, cfg, float(args.batch_size * (args.seq_len - 1)), t_hidden, topk)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return float(loss)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    gc.collect()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    with PeakSampler() as sampler:
        t0 = time.perf_counter()
        losses = [step() for _ in range(args.steps)]
        sync()
        elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else sampler.peak - base
    return {"mode": args.mode, "tok_per_s": args.steps * n_tok / elapsed, "peak_extra_bytes": peak,
            "baseline_bytes": base, "loss": losses[-1], "tokens_per_step": n_tok,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="default")
    p.add_argument("--student", default="slice:15", help="HF dir / hub id, or slice:N (first N teacher layers)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=1, help="repeat the modes, interleaved; keep the best speed")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return
    results = {}
    base_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for rnd in range(args.rounds):  # modes interleaved; the best speed of each is kept (shared machines)
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, *base_argv, "--mode", mode], capture_output=True,
                                  text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{mode}: failed\n{proc.stderr[-3000:]}")
                continue
            r = json.loads(line[0][7:])
            print(f"round {rnd} {mode:10s} {r['tok_per_s']:9.1f} tok/s   peak extra "
                  f"{r['peak_extra_bytes'] / 2**20:9.1f} MiB   (baseline {r['baseline_bytes'] / 2**20:.0f} MiB, "
                  f"loss {r['loss']:.4f})", flush=True)
            if mode not in results or r["tok_per_s"] > results[mode]["tok_per_s"]:
                results[mode] = {**r, "peak_extra_bytes": max(r["peak_extra_bytes"],
                                                              results.get(mode, r)["peak_extra_bytes"])}
            else:
                results[mode]["peak_extra_bytes"] = max(r["peak_extra_bytes"], results[mode]["peak_extra_bytes"])
    if "naive" in results:
        nv = results["naive"]
        print(f"\n{args.batch_size} x {args.seq_len} = {args.batch_size * args.seq_len} tokens, teacher "
              f"{args.teacher}, student {args.student}, device {args.device}, dtype {args.dtype}")
        for mode, r in results.items():
            if mode != "naive":
                print(f"{mode:10s} vs naive: speed {r['tok_per_s'] / nv['tok_per_s']:.2f}x, peak memory "
                      f"{r['peak_extra_bytes'] / nv['peak_extra_bytes']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
