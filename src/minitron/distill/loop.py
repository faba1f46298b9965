"""The training loop: schedule, data order, `distill(cfg)`, `finish`, `correct`."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minitron.arch.adapters import dims_of, enable_checkpointing
from minitron.arch.models import (
    empty_model,
    load_config,
    load_model,
    load_tokenizer,
    save_model,
)
from minitron.data.corpus import DataError, corpus_blocks, load_splits, report_blocks, resolve_source
from minitron.data.fingerprint import content_id
from minitron.distill.checkpoint import full_state, latest_checkpoint, load_checkpoint, save_checkpoint
from minitron.distill.config import (
    FINISHED,
    CheckpointError,
    DistillConfig,
    DistillError,
    check_same_run,
    run_inputs,
)
from minitron.distill.losses import (
    default_layer_map,
)
from minitron.distill.metrics import append_metrics, plot_metrics, read_metrics, truncate_metrics
from minitron.distill.parallel import Dist, fill_shards, init_distributed, real_state, unwrap, wrap
from minitron.distill.precision import autocast_context, choose_autocast, precision
from minitron.distill.student import LayerTap, Student, evaluate_all, plan_layer_map, teacher_pass, val_topk

SAVE_BYTES_PER_S = 200e6  # what a time budget keeps for writing the student at the end (a local disk)
REPLANS = 2               # a time budget plans after the probe, then again a third and two thirds of the way
EVAL_SHARE = 0.1          # a time budget's evaluations (the first and the last included) take at most this share


def warmup_steps(cfg: DistillConfig, total: int | None) -> int:
    """The warm-up length: warmup_steps, else 2% of the steps (at least 1). With a time budget it does not depend on
    the number of steps, which is planned at its end: warmup_steps or the probe, whichever is longer."""
    if cfg.seconds is not None:
        return max(cfg.warmup_steps or 0, cfg.probe_steps)
    return cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.02 * total))


def lr_at(step: int, cfg: DistillConfig, total: int | None) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step (total: None only inside the warm-up
    of a time-budgeted run, before its plan)."""
    warm = warmup_steps(cfg, total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def global_block_ids(step: int, n_blocks: int, per_step: int, seed: int) -> list[int]:
    """Block indices of one global step, from seeded per-epoch permutations (the data position)."""
    ids, perms = [], {}
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch = pos // n_blocks
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + epoch))
        ids.append(int(perms[epoch][pos % n_blocks]))
    return ids


def check_vocab(teacher_name: str, student_name: str) -> None:
    """Fail at start, before any model is loaded, when teacher and student vocabularies differ."""
    tc, sc = load_config(teacher_name), load_config(student_name)
    if tc.vocab_size != sc.vocab_size:
        raise DistillError(f"vocabulary mismatch: teacher {teacher_name!r} has {tc.vocab_size} tokens, student "
                           f"{student_name!r} has {sc.vocab_size}. Distillation on logits needs the same "
                           "tokenizer; prune the student from this teacher or pick a matching pair.")
    tt, st = load_tokenizer(teacher_name), load_tokenizer(student_name)
    if tt.get_vocab() != st.get_vocab():
        raise DistillError(f"vocabulary mismatch: teacher {teacher_name!r} and student {student_name!r} have "
                           "different tokenizers (same size, different tokens). Use the teacher's tokenizer.")




def distill(cfg: DistillConfig) -> Path:
    """Train cfg.student against cfg.teacher (or the LM loss alone); returns the output dir."""
    t_call = time.perf_counter()  # a time budget counts from here
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} is a file, not a folder; choose another --out (the file is left as it is)")
    resolve_source(cfg.data, cfg.data_root)  # a missing corpus fails before any model is loaded
    done = out / FINISHED
    if done.is_file():
        info = json.loads(done.read_text())
        print(f"[minitron] {out} already holds a finished run ({info.get('steps')} steps, "
              f"{info.get('tokens')} tokens); nothing to do. Use another --out to train again.")
        return out
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not cfg.resume:
        raise DistillError(f"{out} holds an unfinished run (checkpoint {ckpt.name}); pass --resume to continue "
                           "it, or choose another --out")
    if cfg.resume and ckpt is None:
        raise CheckpointError(f"--resume given but {out} has no checkpoint (checkpoints/latest is missing); "
                              "start without --resume")
    inputs = run_inputs(cfg)
    d, device = init_distributed(cfg)
    saved_run = check_same_run(out, cfg, inputs, d.world) if cfg.resume else {}
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.teacher is not None:
        check_vocab(cfg.teacher, cfg.student)
    loss_cfg = cfg.loss_config()

    if d.mode == "fsdp":  # built on the meta device, sharded, then filled from rank 0's copy (fill_shards)
        student_model, tokenizer = empty_model(cfg.student, torch.float32), load_tokenizer(cfg.student)
    else:  # fp32 master weights (precision)
        student_model, tokenizer = load_model(cfg.student, device, torch.float32)
    chosen = choose_autocast(cfg, student_model, device, d, saved_run.get("autocast_chosen"))
    prec = precision(cfg, device, chosen["autocast"])
    tf32 = torch.backends.cuda.matmul.allow_tf32  # put back at the end: evaluation after training keeps its own
    if device.type == "cuda" and prec["compute"] != torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls left under bf16 autocast: TF32
    teacher = None
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, device, prec["teacher"], with_tokenizer=False)[0]
        teacher.requires_grad_(False).eval()
    # the corpus' token store (built once, one process per machine); train blocks read as each step indexes them
    splits = load_splits(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.split_seed, cfg.max_blocks,
                         cfg.data_root, lazy=True)
    n_val = cfg.eval_batches * cfg.batch_size * d.world
    extra_val = {src: corpus_blocks(src, tokenizer, cfg.seq_len, n_val, cfg.data_root) for src in cfg.heldout or []}
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    if splits.train.shape[0] < per_step:
        raise DataError(f"corpus too short for one batch: {splits.train.shape[0]} training blocks of {cfg.seq_len} "
                        f"tokens, one step needs {per_step} (batch {cfg.batch_size} x accum {cfg.grad_accum} x "
                        f"{d.world} ranks); add text or lower --batch-size/--seq-len")
    total = (None if cfg.seconds is not None else cfg.steps if cfg.steps is not None
             else max(1, math.ceil(cfg.tokens / (per_step * cfg.seq_len))))
    val = report_blocks(splits.validation)  # disjoint from the blocks that chose the pruned shape

    layer_map, t_tap = None, None
    if cfg.hidden_loss != "none":
        n_s, n_t = dims_of(student_model.config).layers, dims_of(teacher.config).layers
        # the layers the student kept when pruned, else spread evenly over depth
        layer_map = cfg.layer_map or plan_layer_map(cfg.student, n_s, n_t) or default_layer_map(n_s, n_t)
        if len(layer_map) != n_s or not all(0 <= j < n_t for j in layer_map):
            raise DistillError(f"layer_map {layer_map} needs one teacher layer in [0, {n_t}) per student layer ({n_s})")
        t_tap = LayerTap(teacher, layer_map)
    module = Student(student_model, dims_of(teacher.config).hidden if teacher is not None else None,
                     layer_map, cfg.hidden_loss)
    if cfg.grad_checkpointing:
        enable_checkpointing(student_model)
    if cfg.freeze_embeddings:  # the token embedding and the LM head (one tensor where tied): no gradient
        for emb in (student_model.get_input_embeddings(), student_model.get_output_embeddings()):
            emb.weight.requires_grad_(False)
    module.train()
    compute = prec["compute"] if prec["compute"] != torch.float32 else None  # None: no FSDP2 param cast
    if d.mode == "fsdp":
        built = real_state(module)  # the projection (seeded alike on every rank) and the buffers
        model = wrap(module, d, device, compute)
        fill_shards(model, d, device, built, lambda: {f"model.{k}": v for k, v in
                                                      load_model(cfg.student, "cpu", "auto")[0].state_dict().items()})
    else:
        model = wrap(module.to(device), d, device, compute)
    # fused on CUDA (one kernel, no per-parameter temporaries; foreach would allocate sqrt(exp_avg_sq) for
    # every parameter at once); FSDP2's sharded parameters keep the default
    fused = True if device.type == "cuda" and d.mode != "fsdp" else None  # None: torch's default (foreach)
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen embeddings get no AdamW state
    optim = torch.optim.AdamW(trained, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                              fused=fused)

    cache = None
    if cfg.topk_cache:
        from minitron.distill.topk_cache import open_or_build

        # only the blocks these steps read; each rank computes the share it reads first
        cache = open_or_build(cfg.topk_cache, teacher, splits.train, cfg.topk, cfg.temperature,
                              str(cfg.teacher), cfg.batch_size, device, steps=total, per_step=per_step,
                              seed=cfg.seed, rank=d.rank, world=d.world, barrier=d.barrier,
                              progress=cfg.progress and d.main,
                              teacher_id=content_id(inputs["teacher"]) if cfg.teacher else "")
    topk_val = None
    if cache is not None and cfg.release_teacher:  # the steps read the cache; evaluation reads topk_val
        topk_val = val_topk(teacher, val, cfg, d, device)
        teacher = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    metrics_path = out / "metrics.jsonl"
    start, eval_every = 0, cfg.eval_every  # (a time budget may space evaluations further: plan_steps)
    if cfg.resume:
        state = load_checkpoint(ckpt, model, optim, d)
        start = state["step"]
        if total is None and (out / "budget.json").is_file():  # a time-budgeted run keeps the steps it planned
            planned = json.loads((out / "budget.json").read_text())
            total, eval_every = planned["total_steps"], planned.get("eval_every", eval_every)
        if d.main:
            truncate_metrics(metrics_path, start)
            print(f"[minitron] resumed {out} at step {start}/{total}")
    elif d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
        saved = {**asdict(cfg), "global_batch": per_step, "inputs": inputs, "autocast_chosen": chosen}
        (out / "distill_config.json").write_text(json.dumps(saved, indent=2))
        if splits.blend is not None:  # a blend corpus: what was drawn from each source (report.md shows it)
            (out / "blend_drawn.json").write_text(json.dumps(splits.blend, indent=1))
    d.barrier()

    autocast = autocast_context(prec["compute"], device)
    tokens_per_step = per_step * cfg.seq_len
    eval_s = 0.0
    if start == 0:
        t_ev = time.perf_counter()
        ev = evaluate_all(model, teacher, val, extra_val, cfg, d, device, autocast, topk_val)
        eval_s = time.perf_counter() - t_ev
        if d.main:
            append_metrics(metrics_path, {"step": 0, "tokens": 0, **ev})

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and d.main), desc="distill", unit="step")
    t0, tok0 = time.perf_counter(), 0
    step = start
    probe_s, timed = 0.0, 0  # training seconds of the probe's steps after this call's first, and how many
    replan_at = None if total is None else -1  # the step of a time budget's next plan (-1: none)
    plans = 0  # a time budget's plans made in this call
    while total is None or step < total:
        t_step = time.perf_counter()
        ids_all = global_block_ids(step, splits.train.shape[0], per_step, cfg.seed)
        lr = lr_at(step, cfg, total)
        for g in optim.param_groups:
            g["lr"] = lr
        normalizer = d.sum(d.tensor(float(per_step // d.world * (cfg.seq_len - 1)), torch.float32))  # packed
        logged = d.tensor([0.0, 0.0, 0.0])
        for micro in range(cfg.grad_accum):
            off = (micro * d.world + d.rank) * cfg.batch_size
            mine = ids_all[off:off + cfg.batch_size]
            ids = splits.train[mine].to(device)                                      # [B, T]
            att = torch.ones_like(ids)
            last = micro == cfg.grad_accum - 1  # gradients are reduced across ranks after the last micro-batch only
            if d.mode == "fsdp" and cfg.grad_accum > 1:
                model.set_requires_gradient_sync(last or bool(cfg.fsdp_reduce_every_micro))
            t_hidden, t_topk, t_layers = None, None, None
            if cache is not None:  # read outside autocast: the cache's fp16 log-probs are data, not compute
                idx, lp = cache.get(mine)                                            # [B, T-1, k]
                t_topk = (idx.reshape(-1, idx.shape[-1]).to(device, non_blocking=True),  # [B*(T-1), k]
                          lp.reshape(-1, lp.shape[-1]).to(device, non_blocking=True))
            with (model.no_sync() if d.mode == "ddp" and not last else contextlib.nullcontext()), autocast():
                if cache is not None:
                    if t_tap is not None:
                        t_layers = teacher_pass(teacher, t_tap, ids, att)[1]
                elif teacher is not None:
                    t_hidden, t_layers = teacher_pass(teacher, t_tap, ids, att)
                loss, logit, hid = model(ids, att, loss_cfg, normalizer / d.world, t_hidden, t_topk, t_layers,
                                         cfg.hidden_weight)
                loss.backward()
            logged += torch.stack([loss.detach(), logit, hid]).double() / d.world
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                    else float("inf")))
        grad_norm = _full(grad_norm)
        optim.step()
        optim.zero_grad(set_to_none=True)
        d.sum(logged)
        tok0 += tokens_per_step
        rate = tok0 / max(time.perf_counter() - t0, 1e-9)
        done_steps = step + 1
        if step > start:  # the first step of a call (allocations, first kernels) is not timed
            probe_s, timed = probe_s + time.perf_counter() - t_step, timed + 1
        if d.main:
            append_metrics(metrics_path, {"step": done_steps, "tokens": done_steps * tokens_per_step, "lr": lr,
                                          "loss": logged[0].item(), "logit_loss": logged[1].item(),
                                          "hidden_loss": logged[2].item(), "grad_norm": grad_norm,
                                          "tok_per_s": rate})
        bar.update(1)
        bar.set_postfix(loss=f"{logged[0].item():.4f}", tok_s=f"{rate:.0f}")
        if (total is None and done_steps >= cfg.probe_steps or done_steps == replan_at) and timed:
            first = json.loads((out / "budget.json").read_text()) if done_steps == replan_at and d.main else None
            total, eval_every = plan_steps(out, cfg, d, t_call, probe_s / timed, eval_s, done_steps, tokens_per_step,
                                           sum(p.numel() for p in student_model.parameters()), first,
                                           sum(p.numel() for p in trained))
            # again a third and two thirds of the way, each from the steps timed since the plan before (the first
            # steps run slower than later ones)
            plans += 1
            replan_at = done_steps + (total - done_steps) // (REPLANS + 2 - plans) if plans <= REPLANS else -1
            probe_s, timed = 0.0, 0
            bar.total = total
        if done_steps == total or (eval_every and done_steps % eval_every == 0):
            ev = evaluate_all(model, teacher, val, extra_val, cfg, d, device, autocast, topk_val)
            if d.main:
                append_metrics(metrics_path, {"step": done_steps, "tokens": done_steps * tokens_per_step, **ev})
        if cfg.save_every and done_steps % cfg.save_every == 0 and (total is None or done_steps < total):
            save_checkpoint(out, done_steps, model, optim, d, {"tokens": done_steps * tokens_per_step,
                                                                "total_steps": total})
        step += 1
    bar.close()
    finish(out, model, tokenizer, d, cfg, total, total * tokens_per_step, {k: str(v) for k, v in prec.items()},
           layer_map)
    for h in (module.tap.handles if module.tap else []) + (t_tap.handles if t_tap else []):
        h.remove()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return out


def plan_steps(out: Path, cfg: DistillConfig, d: Dist, t_call: float, step_s: float, eval_s: float, done: int,
               tokens_per_step: int, n_params: int, first: dict | None = None,
               n_trained: int | None = None) -> tuple[int, int]:
    """A time-budgeted run, after its probe: (steps, eval_every). The steps are those whose training, evaluations
    (every eval_every steps and at the end, each as long as the first), checkpoints (every save_every steps: weights,
    4 bytes a parameter, and AdamW states, 8 bytes each of the n_trained that train, default all) and the final save
    (4 bytes a parameter) fit in what is left of
    cfg.seconds, writing at SAVE_BYTES_PER_S. Evaluations are spaced further than cfg.eval_every where all of them
    (the first and the last included) would take more than EVAL_SHARE of the seconds: on a short budget that is
    only the first and the last. With `first` (the plan before), a new plan from the steps timed since, which
    keeps the first's record and adds this one to its `replans`. Rank 0's plan is every rank's (budget.json
    records it; a resumed run reads it)."""
    trained = n_params if n_trained is None else n_trained
    save_s, ckpt_s = 1.0 + 4 * n_params / SAVE_BYTES_PER_S, 1.0 + (4 * n_params + 8 * trained) / SAVE_BYTES_PER_S
    left = cfg.seconds - (time.perf_counter() - t_call) - save_s - eval_s  # eval_s: the final evaluation
    every = cfg.eval_every
    if every and eval_s > 0:
        between = max(0, math.floor(EVAL_SHARE * cfg.seconds / eval_s) - 2)  # evaluations besides the first, last
        steps = done + math.floor(left / step_s)
        if steps // every > between:
            every = math.ceil(steps / (between + 1)) if between else 0
    per_step = (step_s + (eval_s / every if every else 0.0)
                + (ckpt_s / cfg.save_every if cfg.save_every else 0.0))
    more = max(0, math.floor(left / per_step))
    total, every = (int(x) for x in d.max(d.tensor([float(done + more), float(every)] if d.main else [0.0, 0.0])))
    plan = {"seconds": cfg.seconds, "probe_steps": done, "step_s": round(step_s, 4), "eval_s": round(eval_s, 3),
            "spent_before_plan_s": round(time.perf_counter() - t_call, 2), "total_steps": total,
            "tokens": total * tokens_per_step, "tok_per_s": round(tokens_per_step / step_s, 1), "eval_every": every}
    if first is not None:
        again = {"at_step": done, "step_s": round(step_s, 4), "total_steps_before": first["total_steps"]}
        plan = {**first, "total_steps": total, "tokens": total * tokens_per_step, "eval_every": every,
                "replans": [*first.get("replans", []), again]}
    if d.main:
        tmp = out / "budget.json.tmp"
        tmp.write_text(json.dumps(plan, indent=1))
        os.replace(tmp, out / "budget.json")
        print(f"[minitron] time budget {cfg.seconds:.0f} s: {step_s:.2f} s/step measured "
              f"{'in the warm-up' if first is None else f'since, at step {done}'}, "
              f"evaluation {eval_s:.1f} s (every {every or total} steps) -> {total} steps "
              f"({total * tokens_per_step:,} tokens)")
    return total, every


def _full(norm) -> float:
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def finish(out: Path, model, tokenizer, d: Dist, cfg: DistillConfig, steps: int, tokens: int,
           prec: dict | None = None, layer_map: list[int] | None = None) -> None:
    """Save the student as a HF dir, the plot, then the FINISHED marker (last, atomically; it names the precision
    used and the hidden-state loss' teacher layer per student layer)."""
    sd = full_state(model, None, d)[0] if d.mode == "fsdp" else None
    if d.main:
        student = unwrap(model).model
        if sd is not None:
            sd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
        save_model(student, out, state_dict=sd)
        tokenizer.save_pretrained(out)
        metrics = read_metrics(out / "metrics.jsonl")
        plot_metrics(metrics, out / "loss.png", f"{'distill' if cfg.teacher else 'LM fine-tune'}: {cfg.student}")
        evals = [r for r in metrics if "val_lm_loss" in r]
        info = {"finished": True, "steps": steps, "tokens": tokens, "precision": prec, "layer_map": layer_map,
                "first_eval": evals[0] if evals else None,
                "final_eval": evals[-1] if evals else None}
        tmp = out / (FINISHED + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, out / FINISHED)
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    d.barrier()


def correct(model: str, data: str, out: str, tokens: int | None = None, steps: int | None = None,
            **options) -> Path:
    """Teacher correction: LM-loss fine-tune of `model` on the distillation corpus (same loop/options)."""
    cfg = DistillConfig(student=model, out=out, teacher=None, data=data, tokens=tokens, steps=steps,
                        kd_weight=0.0, ce_weight=1.0, **options)
    return distill(cfg)


