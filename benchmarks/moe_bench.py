"""A tiny MoE vs a dense model of equal active parameters: the importance pass and one distillation step.

MoE: Mixtral layout, E experts of width F, top-2. Dense: Llama layout with MLP width 2F, so one token
uses the same MLP weights (2 x 3CF) in both; attention, embeddings and depth are the same. Each
(model, phase) runs in its own fresh process, so its peak resident set (VmHWM) is its own.

  importance   minitron.prune.importance.compute_importance on random token blocks (MoE: expert outputs,
               per-expert neurons and router statistics recomputed in the hooks)
  distill      teacher forward + student forward/backward + AdamW step, full-logit forward KL (fp32); the
               teacher is a copy of the student (a step costs the same whatever the weights)

  PYTHONPATH=src python benchmarks/moe_bench.py --hidden 256 --experts 8 --expert-width 512 --tokens 4096
Prints a table (tokens/s, peak RSS) and the MoE / dense ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import torch


def vm_hwm_mib() -> float:
    """Peak resident set of this process so far (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(kind: str, a) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from minitron.arch.tiny import make_config

    common = dict(vocab=a.vocab, layers=a.layers, hidden_size=a.hidden, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=a.hidden // 4, max_position_embeddings=max(256, a.seq_len))
    if kind == "moe":
        config = make_config("mixtral", **common, intermediate_size=a.expert_width, num_local_experts=a.experts,
                             num_experts_per_tok=2)
    else:
        config = make_config("llama", **common, intermediate_size=2 * a.expert_width)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def child(kind: str, phase: str, a) -> dict:
    """One (model, phase) measurement in this process."""
    from minitron.prune.importance import ImportanceConfig, compute_importance
    from minitron.prune.plan import count_params

    torch.set_num_threads(a.threads)
    model = build(kind, a)
    params = count_params(model.config)
    gen = torch.Generator().manual_seed(0)
    n_blocks = a.tokens // a.seq_len
    blocks = torch.randint(0, a.vocab, (n_blocks, a.seq_len), generator=gen)  # [N, T]
    if phase == "importance":
        cfg = ImportanceConfig(batch_size=a.batch_size)
        compute_importance(model, blocks[: a.batch_size], cfg)  # warm-up
        t = time.perf_counter()
        compute_importance(model, blocks, cfg)
        seconds, tokens = time.perf_counter() - t, blocks.numel()
    else:
        teacher = copy.deepcopy(model).eval()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        batch = blocks[: a.batch_size]  # [B, T]

        def step():
            with torch.no_grad():
                t_logp = torch.log_softmax(teacher(batch).logits.float(), dim=-1)  # [B, T, V]
            s_logp = torch.log_softmax(model(batch).logits.float(), dim=-1)  # [B, T, V]
            loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up (AdamW states allocated)
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        seconds, tokens = time.perf_counter() - t, a.steps * batch.numel()
    return {"kind": kind, "phase": phase, "tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "peak_rss_mib": vm_hwm_mib(), "params_total": params["total"], "params_active": params["active"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192, help="importance: calibration tokens (timed)")
    p.add_argument("--steps", type=int, default=3, help="distill: timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("KIND", "PHASE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a)))
        return
    rows = []
    for phase in ("importance", "distill"):
        for kind in ("moe", "dense"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", kind, phase], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"[moe_bench] {kind} {phase}: {r['tok_s']:.0f} tok/s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"\nhidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; MoE {a.experts} experts x {a.expert_width}, "
          f"top-2; dense MLP {2 * a.expert_width}; {torch.get_num_threads()} threads available, {a.threads} used\n")
    print("| model | params total | params active | phase | tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['params_total'] / 1e6:.2f}M | {r['params_active'] / 1e6:.2f}M | {r['phase']} "
              f"| {r['tok_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    by = {(r["kind"], r["phase"]): r for r in rows}
    for phase in ("importance", "distill"):
        m, d = by["moe", phase], by["dense", phase]
        print(f"{phase}: MoE / dense speed {m['tok_s'] / d['tok_s']:.2f}x, peak RSS {m['peak_rss_mib'] / d['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
