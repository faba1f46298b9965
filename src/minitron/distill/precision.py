"""The training's precision: fp32 master weights and AdamW states; forward and backward in the compute dtype
(fp32, or bf16 through autocast); `autocast: auto` picks bf16 or fp32 by what this machine computes faster."""

from __future__ import annotations

import contextlib
import time

import torch

from minitron.arch.models import parse_dtype
from minitron.distill.config import DistillConfig

TIMED_PASSES = 2  # timed forward+backward passes per mode (after one untimed), the best kept


def precision(cfg: DistillConfig, device: torch.device, autocast: str | None = None) -> dict[str, torch.dtype]:
    """Mixed precision done right: the student's master weights and AdamW states stay fp32; forward and
    backward run in the compute dtype (cfg.dtype, or bf16 with autocast "bf16": cfg.autocast, or what
    choose_autocast made of "auto") through autocast (and FSDP2's MixedPrecisionPolicy when sharded); the frozen
    teacher runs in its own dtype (teacher_dtype; default bf16 on CUDA, else the compute dtype)."""
    mode = autocast or cfg.autocast
    compute = torch.bfloat16 if mode == "bf16" else parse_dtype(cfg.dtype)
    default_teacher = torch.bfloat16 if device.type == "cuda" else compute
    teacher = parse_dtype(cfg.teacher_dtype) if cfg.teacher_dtype else default_teacher
    return {"master": torch.float32, "compute": compute, "teacher": teacher}


def autocast_context(compute: torch.dtype, device: torch.device):
    """A factory of the training's autocast context (a no-op one for fp32 compute)."""
    if compute != torch.float32:
        return lambda: torch.autocast(device.type, dtype=compute)
    return contextlib.nullcontext


def _pass_seconds(model, ids: torch.Tensor, bf16: bool) -> float:
    """Seconds of one forward + backward of `model` on ids [B, T], under bf16 autocast or in fp32."""
    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    t0 = time.perf_counter()
    with ctx:
        logits = model(input_ids=ids).logits                                   # [B, T, V]
    logits.float().mean().backward()
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - t0


def measure_autocast(model, seq_len: int, device: torch.device) -> dict:
    """The best of TIMED_PASSES forward+backward passes of `model` (fp32 weights) over one random [1, seq_len]
    block in fp32 and under bf16 autocast, each mode warmed up by one untimed pass and the modes interleaved so
    that a slower stretch of a shared machine hits both. Gradients are cleared after. Returns
    {"fp32_s", "bf16_s"}."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen).to(device)  # [1, T]
    best = {False: float("inf"), True: float("inf")}
    for i in range(TIMED_PASSES + 1):
        for bf16 in (False, True):
            s = _pass_seconds(model, ids, bf16)
            if i:  # the first pass of each mode (allocations, kernel choice) is not timed
                best[bf16] = min(best[bf16], s)
    model.zero_grad(set_to_none=True)
    return {"fp32_s": round(best[False], 4), "bf16_s": round(best[True], 4)}


def choose_autocast(cfg: DistillConfig, model, device: torch.device, d, saved: dict | None = None) -> dict:
    """What `autocast` means for this run: cfg.autocast unless it is "auto", which becomes "bf16" on a GPU that
    computes bf16 (torch.cuda.is_bf16_supported), and elsewhere the faster of fp32 and bf16 autocast measured on
    the student itself (measure_autocast): bf16 runs a step ~1.5x faster on CPUs with native bf16 (AVX512-BF16,
    AMX) and ~3x slower where it is emulated (benchmarks/RESULTS.md). A resumed run keeps the choice it saved
    (`saved`: distill_config.json's "autocast_chosen"); rank 0's measurement is every rank's.
    Returns {"autocast": "bf16" | "none", "how": ..., and the seconds measured}."""
    if cfg.autocast != "auto":
        return {"autocast": cfg.autocast, "how": "given"}
    if saved is not None:
        return {**saved, "how": f"{saved['how']} (kept on resume)"}
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return {"autocast": "bf16" if ok else "none", "how": f"cuda bf16 {'supported' if ok else 'unsupported'}"}
    if next(model.parameters()).device.type == "meta":  # FSDP builds the student on meta: nothing to time
        return {"autocast": "none", "how": "not measured (sharded student on the CPU)"}
    timed = measure_autocast(model, cfg.seq_len, device)
    faster = timed["bf16_s"] < timed["fp32_s"] if d.main else False
    faster = bool(d.max(d.tensor([1.0 if faster else 0.0]))[0])  # rank 0's choice
    choice = {"autocast": "bf16" if faster else "none", "how": "measured", **timed}
    if d.main:
        print(f"[minitron] autocast auto: {'bf16' if faster else 'fp32'} (one forward+backward of the student: "
              f"{timed['fp32_s']:.2f} s fp32, {timed['bf16_s']:.2f} s bf16 autocast)")
    return choice
