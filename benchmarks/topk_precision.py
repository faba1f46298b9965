"""Which 16-bit float stores the teacher top-k cache's log-probs: fp16 vs bf16 against fp32 on real logits.

Teacher: the default model (SmolLM2-135M); student: the default run's distilled student (runs/default/distill)
when it exists, else the teacher with Gaussian noise on its final hidden states. Blocks: the default corpus'
token store. For each storage dtype: the log-probs' rounding error, the teacher mass the k entries hold, and the
distillation loss (forward KL with the rest bucket, minitron.distill.losses) and its gradient, relative to fp32.

    .venv/bin/python benchmarks/topk_precision.py [--blocks 8] [--seq-len 256] [--k 64] [--temperature 1.0]

Prints a markdown table (the one in docs/data.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Final logits of blocks [B, T] at the T-1 predicting positions -> [B*(T-1), V] fp32."""
    from minitron.arch import final_logits, lm_head

    with torch.no_grad():
        h = model.base_model(input_ids=ids).last_hidden_state[:, :-1]                # [B, T-1, C]
        h = h.reshape(-1, h.shape[-1])                                               # [B*(T-1), C]
        return final_logits(model, (h @ lm_head(model).weight.T).float())            # [B*(T-1), V]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--student", default="runs/default/distill")
    args = p.parse_args()

    from minitron.arch.models import load_model
    from minitron.data.blocks import stream_blocks
    from minitron.data.store import ensure_store
    from minitron.distill.losses import LossConfig, naive_distill_loss, topk_logprobs

    torch.manual_seed(0)
    teacher, tok = load_model("default", "cpu", torch.float32)
    ids = stream_blocks(ensure_store("default", tok, progress=False), args.seq_len, 0, 0, args.blocks)  # [B, T]
    t_logits = logits_of(teacher, ids)                                               # [N, V]
    if Path(args.student).is_dir():
        student, what = load_model(args.student, "cpu", torch.float32, with_tokenizer=False)[0], args.student
        s_logits = logits_of(student, ids)
    else:
        s_logits, what = t_logits + torch.randn_like(t_logits), "teacher logits + N(0, 1) noise"
    idx, lp32 = topk_logprobs(t_logits, args.k, args.temperature)                  # [N, k]
    cfg = LossConfig(temperature=args.temperature)
    n = lp32.shape[0]

    def loss_and_grad(lp: torch.Tensor) -> tuple[float, torch.Tensor]:
        s = s_logits.clone().requires_grad_(True)
        loss = naive_distill_loss(s, torch.ones(n), cfg, n, t_topk=(idx, lp))
        loss.backward()
        return loss.item(), s.grad

    ref_loss, ref_grad = loss_and_grad(lp32)
    mass32 = lp32.exp().sum(-1)                                                      # [N]
    print(f"teacher default, student {what}; {n} positions ({args.blocks} x {args.seq_len - 1}), k={args.k}, "
          f"T={args.temperature}; top-k mass: mean {mass32.mean():.4f}, log-probs in [{lp32.min():.1f}, "
          f"{lp32.max():.4f}]; fp32 loss {ref_loss:.5f}\n")
    print("| log-probs stored as | max abs error | mean abs error | max error of the top-k mass | "
          "loss relative error | gradient relative error (L2) |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float16, torch.bfloat16):
        lp = lp32.to(dtype)
        err = (lp.float() - lp32).abs()
        mass = (lp.float().exp().sum(-1) - mass32).abs().max()
        loss, grad = loss_and_grad(lp)
        rel = abs(loss - ref_loss) / abs(ref_loss)
        g_rel = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        print(f"| {str(dtype).removeprefix('torch.')} | {err.max():.2e} | {err.mean():.2e} | {mass:.2e} | "
              f"{rel:.2e} | {g_rel:.2e} |")
    on_disk(teacher, ids, args.k, args.temperature)


def on_disk(teacher, ids: torch.Tensor, k: int, temperature: float) -> None:
    """Build the cache of blocks [B, T] (one step reads them all) and compare its bytes on disk per token with
    topk_cache.bytes_per_token."""
    import tempfile

    from minitron.distill.topk_cache import open_or_build

    with tempfile.TemporaryDirectory() as tmp:
        B, T = ids.shape
        cache = open_or_build(Path(tmp) / "c", teacher, ids, k, temperature, "default", 4, "cpu", steps=1,
                              per_step=B, seed=0)
        files = sum(f.stat().st_size for f in cache.path.iterdir())
        print(f"\ncache of {B} x {T} tokens, k={k}: {files:,} bytes on disk ({files / (B * T):.1f} per token, "
              f"all files); formula {cache.meta['bytes_per_token']:.1f} per token "
              f"({cache.meta['index_dtype']} indices, {cache.meta['logp_dtype']} log-probs)")


if __name__ == "__main__":
    main()
