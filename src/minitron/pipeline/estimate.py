"""Peak memory per GPU of every pipeline stage, from the recipe alone: no weight is read.

    stages = estimate_run(cfg, world_size=8)                 # RunConfig -> [StageEstimate]
    print(format_table(stages, gpu_bytes=parse_memory("80GB")))
    warnings = dry_run(cfg, "distill")                       # what the pipeline calls before a stage

Shapes come from the teacher's config (AutoConfig) and a model built on the meta device (exact parameter
counts, as minitron.prune.plan.count_params); the student's dims from minitron.prune.plan.resolve_dims (target dims or a
parameter budget), the search budget, or the first iterative budget. Every formula is one function in
minitron.pipeline.memory_terms, with its bytes named in its docstring. Notation: P parameters, C hidden, A = heads x head_dim, K = KV heads
x head_dim, F MLP width, H heads, L layers, V vocabulary, N tokens of one micro-batch on one rank
(batch_size x seq_len), n tokens of one loss chunk, W world size.

What is modelled (the design in minitron.distill, minitron.prune.importance, minitron.arch.models):
- training (distill, correction): the student keeps fp32 master weights, fp32 gradients and two fp32 AdamW
  states; compute is bf16 when `autocast: bf16` or `model.dtype: bfloat16` (torch.autocast on one device
  and under DDP, FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) under FSDP), else fp32.
  FSDP2 shards master weights, gradients and optimizer states over W; DDP replicates them and adds its
  gradient buckets. The frozen teacher is replicated on every rank in its dtype (distill.teacher_dtype;
  default bf16 on CUDA, the compute dtype on CPU). Activations are those a Llama-style decoder layer saves
  for backward (measured per op: see `layer_activations`), or with activation checkpointing each layer's
  input plus one layer recomputed. The logit loss is chunked over tokens (minitron.distill.losses): a few
  [n, V] fp32 buffers and the [V, C] fp32 gradient of the LM head, never [B, T, V].
- forward-only stages (importance, prune, search, eval) hold the model in model.dtype, one layer's
  temporaries at a time, fp32 statistics, and the chunked LM loss of minitron.arch.models.token_nll_sum.
- the steady state of training (AdamW states allocated); the first step peaks lower. Under FSDP with
  grad_accum > 1 the unsharded fp32 gradients accumulate between reduce-scatters (unless
  fsdp_reduce_every_micro).
- loading (CUDA): each stage's peak per GPU while its models load and the host RAM per node (load_estimate).
Not modelled: the taylor criterion's backward pass, hidden-state distillation losses, memory held by other
processes, and allocator fragmentation beyond the margin (`MARGIN`) that the fit check keeps free.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace

from minitron.arch import adapters as arch
from minitron.arch import ranks
from minitron.pipeline.memory_terms import (
    GiB,
    Shape,
    autocast_cache,
    backward_working,
    dtype_bytes,
    forward_working,
    frozen_embedding_params,
    fsdp_accumulated_grads,
    fsdp_gathered,
    fsdp_reduce,
    importance_working,
    kv_cache,
    lm_scoring,
    logit_loss,
    master_states,
    optimizer_transient,
    parse_memory,
    refit_working,
    saved_activations,
    shape_of,
    sharded_load,
    student_shape,
    weights,
)

MARGIN = 0.9                  # a stage fits when its estimate is at most this share of the GPU memory
CUDA_OVERHEAD = 1 * GiB       # CUDA context, cuBLAS / NCCL workspaces (0 on CPU)
MC_TOKENS = 512               # tokens per zero-shot request assumed for eval's multiple-choice tasks
MC_KEPT = 64                  # positions per request whose logits it keeps (continuations and length spread)
SPEED_PROMPT, SPEED_DECODE, SPEED_BATCH = 128, 32, 8   # minitron.eval.harness.measure_speed as the pipeline calls it
STAGES = ("correction", "importance", "search", "prune", "distill", "eval")


# ---- stages ------------------------------------------------------------------------------------------

@dataclass
class StageEstimate:
    """One stage's estimated peak on one GPU, by term (bytes)."""

    stage: str
    terms: dict[str, int] = field(default_factory=dict)
    note: str = ""
    skipped: bool = False
    kind: str = ""            # "train" for correction/distill (what the suggestions change)
    load: int = 0             # peak on one GPU while the stage loads its models (load_estimate)
    host: int = 0             # host RAM per node while loading, beyond the page cache
    load_note: str = ""

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass
class TrainSettings:
    """What a training stage's memory depends on (from the recipe's distill or correction section)."""

    batch_size: int
    grad_accum: int
    seq_len: int
    mode: str                 # fp32 | autocast | bf16 (see layer_activations)
    checkpointing: bool
    world: int
    parallel: str             # none | ddp | fsdp
    chunk: int
    teacher: str              # full | topk | none
    release_teacher: bool = False  # topk: the teacher is freed once the cache is built
    reduce_every_micro: bool = False  # fsdp: reduce-scatter after every micro-batch (no unsharded accumulation)
    frozen: int = 0           # parameters without gradient or AdamW state (distill.freeze_embeddings)


def _peak(parts: dict[str, dict[str, int]]) -> tuple[dict[str, int], str]:
    """The phase with the largest sum, its terms and name."""
    name = max(parts, key=lambda k: sum(parts[k].values()))
    return parts[name], name


def train_estimate(stage: str, s: Shape, t: Shape | None, teacher_bytes: int, ts: TrainSettings,
                   cuda: bool) -> StageEstimate:
    """Steady-state peak of one rank of a training stage: the states that live through the step plus the
    largest of five phases (the teacher's forward, the end of the student's forward, the start of its
    backward, the end of backward, the optimizer step). Gradients live through every phase when
    grad_accum > 1; with one micro-batch they appear during backward while the activations go."""
    tokens = ts.batch_size * ts.seq_len
    states = master_states(s, ts.world, ts.parallel, ts.frozen)
    grads = states.pop("grads")
    terms = dict(states)
    # FSDP accumulating without a reduce-scatter per micro-batch holds every unsharded fp32 gradient
    accumulated = ts.parallel == "fsdp" and ts.grad_accum > 1 and not ts.reduce_every_micro
    if t is not None and not ts.release_teacher:
        terms["teacher weights"] = weights(t.params, teacher_bytes)
    if cuda:
        terms["CUDA context"] = CUDA_OVERHEAD
    held_grads = {"grads": grads} if ts.grad_accum > 1 else {}
    if accumulated:
        held_grads = {"grads (unsharded fp32, accumulated)": fsdp_accumulated_grads(s, ts.frozen)}
    common: dict[str, int] = {}
    if ts.mode == "autocast":
        common["autocast bf16 weights"] = autocast_cache(s)
    pbytes = 2 if ts.mode == "bf16" else 4
    if ts.parallel == "fsdp":
        common["FSDP gathered params"] = fsdp_gathered(s, pbytes)
    if t is not None and ts.teacher == "full":
        common["teacher hidden states"] = tokens * t.hidden * teacher_bytes
    acts = saved_activations(s, tokens, ts.mode, ts.checkpointing)
    loss = logit_loss(s, tokens, ts.chunk, ts.teacher, ts.mode)
    phases = {
        "end of forward": {**held_grads, **common, "activations": acts, "logit loss (held + chunk)":
                           loss["held"] + loss["chunk"]},
        "start of backward": {**held_grads, **common, "activations": acts, "logit loss (held)": loss["held"],
                              "backward buffers": backward_working(s, tokens, ts.mode)},
        "end of backward": {"grads": grads, **common,
                            "backward buffers": (fsdp_reduce(s, pbytes) if ts.parallel == "fsdp" else 0)
                            + (4 * s.vocab * s.hidden if s.tied and not ts.frozen else 0)},
        "optimizer step": {"grads": grads, "optimizer temporaries": optimizer_transient(s, ts.world, ts.parallel,
                                                                                         cuda)},
    }
    if t is not None and ts.teacher == "full":
        phases["teacher forward"] = {**held_grads, "teacher layer temporaries": forward_working(t, tokens,
                                                                                                teacher_bytes),
                                     "teacher hidden states": tokens * t.hidden * teacher_bytes}
    if t is not None and ts.release_teacher:  # before the first step: the teacher builds the cache, then goes
        phases["top-k cache build"] = {"teacher weights": weights(t.params, teacher_bytes),
                                       "teacher layer temporaries": forward_working(t, tokens, teacher_bytes)}
    phase, name = _peak(phases)
    terms.update({k: v for k, v in phase.items() if v})
    note = (f"peak at {name}; {ts.batch_size} x {ts.seq_len} tokens/rank, {ts.mode} compute"
            f"{', checkpointing' if ts.checkpointing else ''}, {ts.parallel if ts.world > 1 else 'one device'}"
            f"{f' x {ts.world}' if ts.world > 1 else ''}")
    return StageEstimate(stage, terms, note, kind="train")


def load_estimate(est: StageEstimate, trained: Shape | None, file_bytes: int, frozen: int, ts: TrainSettings | None,
                  cuda: bool) -> StageEstimate:
    """Fill est.load (peak on one GPU while the stage loads its models) and est.host (host RAM per node beyond the
    page cache). On a GPU every model loads straight from its memory-mapped safetensors to the device (models.
    load_model's device_map): `frozen` bytes of frozen / forward-only weights, the trained model in fp32. Under FSDP
    the trained model is built on the meta device and rank 0 alone reads its checkpoint on the CPU, in the file's
    dtype, broadcasting it tensor by tensor into every rank's shards (distill.parallel.fill_shards)."""
    if not cuda or est.skipped:
        return est
    if ts is None:
        est.load, est.load_note = frozen, "straight to the GPU"
    elif ts.parallel == "fsdp":
        est.load = frozen + sharded_load(trained, file_bytes, ts.world)
        est.host = trained.params * file_bytes
        est.load_note = "FSDP: meta-device build; rank 0 reads the checkpoint on the CPU and broadcasts the shards"
    else:
        est.load = frozen + 4 * trained.params
        est.load_note = "straight to the GPU, the trained model in fp32" + (" on every rank" if ts.world > 1 else "")
    return est


def checkpoint_bytes(config) -> int:
    """Bytes per parameter of a model's safetensors as its config says (config.dtype; bf16 when unsaid)."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return dtype_bytes(name.removeprefix("torch."))


def forward_estimate(stage: str, resident: dict[str, int], transient: dict[str, int], cuda: bool,
                     note: str = "") -> StageEstimate:
    terms = {**resident, **{k: v for k, v in transient.items() if v}}
    if cuda:
        terms["CUDA context"] = CUDA_OVERHEAD
    return StageEstimate(stage, terms, note)


# ---- from a recipe -------------------------------------------------------------------------------------

def _device_is_cuda(cfg, gpu_bytes: int | None) -> bool:
    device = str(cfg.model.device)
    if device == "auto":
        if gpu_bytes is not None:
            return True
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def _parallel(section, world: int, torchrun: bool) -> str:
    """none | ddp | fsdp, as distill.parallel.init_distributed decides: one process is unsharded, except
    `distributed: fsdp` under torchrun, which runs FSDP2 over a world of 1."""
    mode = getattr(section, "distributed", "auto")
    if world <= 1:
        return "fsdp" if torchrun and mode == "fsdp" else "none"
    if mode == "auto":
        return "ddp"
    if mode == "none":
        from minitron.pipeline.config import ConfigError

        raise ConfigError(f"{world} GPUs but distributed: none; set distributed: fsdp (or ddp) in the recipe")
    return mode


def _bf16_compute(autocast: str, cuda: bool) -> bool:
    """Whether training computes in bf16: autocast bf16, or auto on a GPU (auto on a CPU is measured at run time:
    the estimate counts it as fp32)."""
    return autocast == "bf16" or autocast == "auto" and cuda


def _train_settings(section, cfg, world: int, teacher: str, cuda: bool, torchrun: bool = False) -> TrainSettings:
    from minitron.distill import DistillConfig
    from minitron.pipeline.config import default_of

    def get(name):
        return getattr(section, name, default_of(DistillConfig, name))

    bf16 = _bf16_compute(get("autocast"), cuda) or cfg.model.dtype in ("bfloat16", "bf16")
    parallel = _parallel(section, world, torchrun)
    mode = ("bf16" if parallel == "fsdp" else "autocast") if bf16 else "fp32"
    return TrainSettings(batch_size=get("batch_size"), grad_accum=get("grad_accum"), seq_len=cfg.data.seq_len,
                         mode=mode, checkpointing=bool(get("grad_checkpointing")), world=world, parallel=parallel,
                         chunk=default_of(DistillConfig, "chunk_size"), teacher=teacher,
                         release_teacher=teacher == "topk" and bool(get("release_teacher")),
                         reduce_every_micro=bool(get("fsdp_reduce_every_micro")))


def _teacher_bytes(cfg, cuda: bool) -> int:
    """distill.teacher_dtype, else bf16 on CUDA, else the compute dtype (distill.precision.precision)."""
    name = getattr(cfg.distill, "teacher_dtype", None)
    if name:
        return dtype_bytes(name)
    if cuda or _bf16_compute(cfg.distill.autocast, cuda):
        return 2
    return dtype_bytes(cfg.model.dtype)


def resolve_shapes(cfg) -> dict:
    """The teacher's config and Shape, and the student's dims and Shape, from the recipe (no weights):
    target dims or budget, else the search budget (its largest candidates: budget x (1 + tolerance)), else
    the first iterative budget."""
    from minitron.prune.plan import Target, parse_count, resolve_dims, source_config

    config = source_config(cfg.model.teacher, cfg.model.trust_remote_code)
    if cfg.iterative.budgets:
        target = replace(cfg.target, params=parse_count(cfg.iterative.budgets[0]), split="ratio")
        how = f"first iterative budget {cfg.iterative.budgets[0]}"
    elif cfg.search.enabled:
        target = Target(params=float(cfg.search.params) * (1 + cfg.search.tolerance), split="ratio")
        how = f"search budget {float(cfg.search.params) / 1e6:.4g}M + {cfg.search.tolerance:.0%}"
    else:
        target = replace(cfg.target, split="ratio") if cfg.target.params else cfg.target
        how = "target"
    dims = resolve_dims(config, target)
    teacher = shape_of(config)
    student = student_shape(config, dims)
    axes = cfg.search.layer_widths if cfg.search.enabled else cfg.target.layer_widths
    if axes:  # per-layer widths: the parameter count is the uniform target's; a layer may be as wide as the source's
        src = arch.dims_of(config)
        widest = student_shape(config, replace(dims, ffn=src.ffn if "ffn" in axes else dims.ffn,
                                               kv_heads=src.kv_heads if "kv_heads" in axes else dims.kv_heads,
                                               heads=dims.heads // dims.kv_heads * src.kv_heads if "kv_heads" in axes
                                               else dims.heads))
        # activations sum over the layers (as uniform); one layer's temporaries and tensors: the widest possible
        student = replace(student, layer_params=widest.layer_params,
                          largest_tensor=max(student.largest_tensor, widest.largest_tensor))
        how += (f", per-layer {'/'.join(axes)}: the uniform widths' totals; a single layer taken as wide as the "
                "source's")
    return {"config": config, "teacher": teacher, "dims": dims, "student": student,
            "student_from": how, "n_drop": teacher.layers - dims.layers}


def estimate_run(cfg, world_size: int = 1, gpu_bytes: int | None = None, shapes: dict | None = None,
                 torchrun: bool | None = None) -> list[StageEstimate]:
    """Every stage of `cfg` (a pipeline.RunConfig) on one of `world_size` GPUs, in pipeline order. torchrun: the
    run is launched by torchrun (None: this process is), which matters for `distributed: fsdp` on one GPU."""
    torchrun = ranks.launched() if torchrun is None else torchrun
    shapes = shapes or resolve_shapes(cfg)
    T, S = shapes["teacher"], shapes["student"]
    cuda = _device_is_cuda(cfg, gpu_bytes)
    b = dtype_bytes(cfg.model.dtype)
    seq = cfg.data.seq_len
    out: list[StageEstimate] = []

    if cfg.correction.enabled:
        ts = _train_settings(cfg.correction, cfg, world_size, "none", cuda, torchrun)
        out.append(load_estimate(train_estimate("correction", T, None, 0, ts, cuda), T,
                                 checkpoint_bytes(shapes["config"]), 0, ts, cuda))
    else:
        out.append(StageEstimate("correction", note="off (correction.enabled: false)", skipped=True))

    imp = cfg.importance
    tokens = imp.batch_size * seq
    n_drop = shapes["n_drop"]
    contiguous = n_drop > 0 and cfg.target.contiguous and not cfg.target.drop_layers
    bi_states = max(1, n_drop if contiguous else 1) + 1
    work = importance_working(T, tokens, b, bi_states)
    if n_drop > 0 and cfg.target.layer_metric == "lm-loss":
        work["layer temporaries"] = max(work["layer temporaries"], lm_scoring(T, tokens, b))
    note = f"{imp.batch_size} x {seq} tokens per forward, {cfg.model.dtype}"
    if imp.criterion == "taylor":
        note += "; the taylor criterion's backward pass is not modelled"
    out.append(load_estimate(forward_estimate("importance", {"weights": weights(T.params, b)}, work, cuda, note),
                             None, b, weights(T.params, b), None, cuda))

    if cfg.search.enabled:
        resident = {"teacher weights": weights(T.params, b), "candidate (pruned in place)": weights(S.params, b)}
        trans = {"LM-loss scoring": max(lm_scoring(S, tokens, b), lm_scoring(T, tokens, b) if n_drop else 0)}
        note = f"largest candidate {S.params / 1e6:.4g}M"
        if cfg.search.train_tokens > 0:
            d = train_estimate("search", S, T, _teacher_bytes(cfg, cuda),
                               _train_settings(cfg.distill, cfg, world_size, "topk" if cfg.distill.topk else "full",
                                               cuda, torchrun),
                               cuda)
            d.terms = {"search's teacher + candidate": resident["teacher weights"]
                       + resident["candidate (pruned in place)"], **d.terms}
            d.note = f"{note}; short distillation of each candidate ({d.note})"
            out.append(load_estimate(d, None, b, sum(resident.values()), None, cuda))
        else:
            out.append(load_estimate(forward_estimate("search", resident, trans, cuda, note), None, b,
                                     sum(resident.values()), None, cuda))
    elif cfg.target.params and cfg.target.split == "loss" and not (cfg.target.hidden or cfg.target.ffn):
        out.append(StageEstimate("search", note="split choice runs inside prune", skipped=True))
    else:
        out.append(StageEstimate("search", note="off", skipped=True))

    split = (not cfg.search.enabled and not cfg.iterative.budgets and cfg.target.params
             and cfg.target.split == "loss" and not (cfg.target.hidden or cfg.target.ffn))
    h_tokens = imp.batch_size * seq
    trans = {"LM-loss scoring": lm_scoring(T, h_tokens, b)}
    resident = {"weights": weights(T.params, b)}
    note = "held-out loss before/after"
    if split:
        resident["candidate split (pruned in place)"] = weights(S.params, b)
        note = "hidden/MLP split chosen by held-out loss (each candidate pruned in place)"
    if cfg.prune.refit != "none":  # the refit's terms replace the scoring's: they come after it
        work = refit_working(T, S, min(cfg.prune.refit_samples, imp.calib_samples) * seq, h_tokens, b)
        resident["refit: student copy"] = work.pop("refit: student copy")
        if sum(work.values()) > sum(trans.values()):
            trans = work
        note += f"; refit of {cfg.prune.refit} on {min(cfg.prune.refit_samples, imp.calib_samples)} blocks"
    out.append(load_estimate(forward_estimate("prune", resident, trans, cuda, note), None, b,
                             sum(resident.values()), None, cuda))

    ts = _train_settings(cfg.distill, cfg, world_size, "topk" if cfg.distill.topk else "full", cuda, torchrun)
    if cfg.distill.embeddings_frozen(S.hidden, T.hidden):
        ts = replace(ts, frozen=frozen_embedding_params(S))
    teacher_bytes = _teacher_bytes(cfg, cuda)
    out.append(load_estimate(train_estimate("distill", S, T, teacher_bytes, ts, cuda), S, b,
                             weights(T.params, teacher_bytes), ts, cuda))

    both = "speed" in cfg.eval.tasks  # the speed task holds teacher and student at once
    out.append(load_estimate(eval_estimate(cfg, T, S, b, cuda), None, b,
                             weights(T.params + (S.params if both else 0), b), None, cuda))
    return out


def eval_estimate(cfg, T: Shape, S: Shape, b: int, cuda: bool) -> StageEstimate:
    """Evaluation: each model alone on the perplexity and zero-shot tasks (weights + one forward of the
    largest task batch: wikitext2 max(1, batch x 256 / window) windows, loss:* batch x seq_len, zero-shot
    batch x 512 tokens whose last 64 positions per row keep logits, plus one row's fp32 log-softmax), then
    every model resident together for the speed task (KV cache of 8 x 160 positions, prefill logits of
    8 x 128 tokens). Models load in model.dtype."""
    e = cfg.eval
    phases: dict[str, dict[str, int]] = {}
    for label, s in (("teacher", T), ("student", S)):
        best = 0
        for task in e.tasks:
            if task == "speed":
                continue
            if task == "wikitext2":
                tokens = max(1, e.batch_size * 256 // e.window) * e.window
            elif task.startswith("loss:"):
                tokens = e.batch_size * cfg.data.seq_len
            else:
                tokens = e.batch_size * MC_TOKENS
            work = lm_scoring(s, tokens, b)
            if not (task == "wikitext2" or task.startswith("loss:")):  # logits_to_keep: continuation positions
                work = forward_working(s, tokens, b) + e.batch_size * MC_KEPT * s.vocab * b + MC_KEPT * s.vocab * 8
            best = max(best, work)
        phases[f"{label} tasks"] = {f"{label} weights": weights(s.params, b), "task forward": best}
    if "speed" in e.tasks:
        phases["speed (both models)"] = {
            "teacher + student weights": weights(T.params + S.params, b),
            "KV cache + prefill": max(kv_cache(s, SPEED_BATCH, SPEED_PROMPT + SPEED_DECODE, b)
                                      + SPEED_BATCH * SPEED_PROMPT * s.vocab * b
                                      + forward_working(s, SPEED_BATCH * SPEED_PROMPT, b) for s in (T, S))}
    phase, name = _peak(phases)
    return forward_estimate("eval", {}, phase, cuda, f"peak at {name}")


# ---- fitting, advice, output ---------------------------------------------------------------------------

def fits(est: StageEstimate, gpu_bytes: int) -> bool:
    return est.skipped or est.total <= MARGIN * gpu_bytes


def _with(cfg, **sections):
    """A copy of cfg with section fields replaced: _with(cfg, distill={"batch_size": 1})."""
    changes = {name: replace(getattr(cfg, name), **kw) for name, kw in sections.items()}
    return replace(cfg, **changes)


def suggestions(cfg, stage: str, world_size: int, gpu_bytes: int, shapes: dict) -> list[str]:
    """Up to three changes that make `stage` fit, cheapest first: activation checkpointing, bf16 compute, a
    smaller micro-batch with more accumulation (the same global batch), then the fewest GPUs with FSDP."""
    found: list[str] = []

    def works(new_cfg, new_world=world_size) -> bool:
        est = {e.stage: e for e in estimate_run(new_cfg, new_world, gpu_bytes, shapes)}[stage]
        return fits(est, gpu_bytes)

    if stage in ("distill", "correction", "search"):
        name = "correction" if stage == "correction" else "distill"
        sec = getattr(cfg, name)
        bs, acc = getattr(sec, "batch_size", 8), getattr(sec, "grad_accum", 1)
        ckpt = {"grad_checkpointing": True} if hasattr(sec, "grad_checkpointing") else {}
        opts: list[tuple[str, dict]] = []
        if ckpt and not sec.grad_checkpointing:
            opts.append((f"{name}.grad_checkpointing=true", ckpt))
        if getattr(sec, "autocast", "bf16") == "none" and cfg.model.dtype not in ("bfloat16", "bf16"):
            opts.append((f"{name}.autocast=bf16", {"autocast": "bf16"}))
        if (world_size > 1 and getattr(sec, "distributed", "") == "fsdp" and acc > 1
                and not getattr(sec, "fsdp_reduce_every_micro", None)):
            opts.append((f"{name}.fsdp_reduce_every_micro=true (sharded gradients; more communication)",
                         {"fsdp_reduce_every_micro": True}))
        b = bs
        while b > 1:
            b //= 2
            kw = {"batch_size": b, "grad_accum": acc * (bs // b)}
            text = f"{name}.batch_size={b} {name}.grad_accum={acc * (bs // b)}"
            opts.append((text + " (same global batch)", kw))
            if ckpt and not sec.grad_checkpointing:
                opts.append((text + f" {name}.grad_checkpointing=true", {**kw, **ckpt}))
        for text, kw in opts:
            if len(found) < 2 and works(_with(cfg, **{name: kw})):
                found.append(text)
        if hasattr(sec, "distributed"):
            for extra, label in (({}, ""), (ckpt, f" and {name}.grad_checkpointing=true")):
                w = next((w for w in (2, 4, 8, 16, 32, 64) if w > world_size
                          and works(_with(cfg, **{name: {"distributed": "fsdp", **extra}}), w)), None)
                if w is not None:
                    found.append(f"{w} GPUs with FSDP{label} (torchrun --nproc_per_node {w}, "
                                 f"{name}.distributed=fsdp)")
                    break
    elif stage in ("importance", "prune"):
        bs = cfg.importance.batch_size
        while bs > 1 and not found:
            bs //= 2
            if works(_with(cfg, importance={"batch_size": bs})):
                found.append(f"importance.batch_size={bs}")
    elif stage == "eval":
        bs = cfg.eval.batch_size
        while bs > 1 and not found:
            bs //= 2
            if works(_with(cfg, eval={"batch_size": bs})):
                found.append(f"eval.batch_size={bs}")
    if not found and stage not in ("distill", "correction") and cfg.model.dtype in ("float32", "fp32"):
        if works(_with(cfg, model={"dtype": "bfloat16"})):
            found.append("model.dtype=bfloat16")
    return found[:3]


def warnings_for(cfg, stages: list[StageEstimate], world_size: int, gpu_bytes: int, shapes: dict) -> list[str]:
    """One warning per stage that does not fit: what it needs, the main terms, and what to change."""
    out = []
    per = "per GPU" if _device_is_cuda(cfg, gpu_bytes) else "(CPU)"
    for est in stages:
        if fits(est, gpu_bytes):
            continue
        top = sorted(est.terms.items(), key=lambda kv: -kv[1])[:3]
        fixes = suggestions(cfg, est.stage, world_size, gpu_bytes, shapes)
        advice = ("; fits with: " + " | or: ".join(fixes)) if fixes else (
            "; no single change tried fits: use more GPUs with FSDP, a smaller batch with grad_accum, "
            "activation checkpointing, or a smaller model")
        out.append(f"WARNING: stage {est.stage} needs ~{est.total / GiB:.1f} GiB {per}, more than "
                   f"{MARGIN:.0%} of {gpu_bytes / GiB:.0f} GiB (largest: "
                   + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in top) + f"){advice}")
    return out


def format_table(stages: list[StageEstimate], gpu_bytes: int | None = None) -> str:
    """A markdown table: stage, peak per GPU, fit, the main terms."""
    head = "| stage | peak per GPU | " + (f"fits {gpu_bytes / GiB:.0f} GiB | " if gpu_bytes else "") + "main terms |"
    lines = [head, "|---|---|" + ("---|" if gpu_bytes else "") + "---|"]
    for e in stages:
        if e.skipped:
            lines.append(f"| {e.stage} | — | " + ("— | " if gpu_bytes else "") + f"{e.note} |")
            continue
        terms = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(e.terms.items(), key=lambda kv: -kv[1]) if v)
        fit = ""
        if gpu_bytes:
            fit = ("yes" if fits(e, gpu_bytes) else "**NO**") + " | "
        lines.append(f"| {e.stage} | {e.total / GiB:.2f} GiB | {fit}{terms} ({e.note}) |")
    return "\n".join(lines)


def format_loading(stages: list[StageEstimate]) -> str:
    """A markdown table of the loading peaks (CUDA only; empty on CPU): per GPU, host RAM per node, how."""
    rows = [e for e in stages if not e.skipped and e.load]
    if not rows:
        return ""
    lines = ["| stage | load peak per GPU | host RAM per node | how the weights load |", "|---|---|---|---|"]
    lines += [f"| {e.stage} | {e.load / GiB:.2f} GiB | {e.host / GiB:.2f} GiB | {e.load_note} |" for e in rows]
    return "\n".join(lines)


def report(cfg, world_size: int = 1, gpu_bytes: int | None = None, recipe: str | None = None,
           tflops: float | None = None) -> str:
    """The text `minitron plan --estimate` prints: shapes, the table, warnings, and with a budget how it would be
    spent (minitron.pipeline.budget.estimate_lines, at `tflops` achieved per device)."""
    shapes = resolve_shapes(cfg)
    stages = estimate_run(cfg, world_size, gpu_bytes, shapes)
    cuda = _device_is_cuda(cfg, gpu_bytes)
    lines = [f"Memory estimate per {'GPU' if cuda else 'process (CPU)'}: {recipe or 'recipe'}, world size "
             f"{world_size}, model.dtype {cfg.model.dtype}, seq_len {cfg.data.seq_len} (GiB = 2^30 bytes)",
             f"teacher: {shapes['teacher'].describe()}",
             f"student ({shapes['student_from']}): {shapes['student'].describe()}", "",
             format_table(stages, gpu_bytes)]
    loading = format_loading(stages)
    if loading:
        lines += ["", loading]
    if gpu_bytes:
        warns = warnings_for(cfg, stages, world_size, gpu_bytes, shapes)
        lines += [""] + (warns or [f"Every stage fits {gpu_bytes / GiB:.0f} GiB (with {1 - MARGIN:.0%} kept free)."])
    from minitron.pipeline.budget import estimate_lines

    spend = estimate_lines(cfg, shapes, world_size, cuda, tflops)
    return "\n".join(lines + ([""] + spend if spend else []))


def available_memory(cfg) -> int | None:
    """The memory a stage may use here: the CUDA device's total memory, or MemAvailable on CPU."""
    if _device_is_cuda(cfg, None):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dry_run(cfg, stage: str | None = None, world_size: int | None = None, memory: int | str | None = None,
            file=None) -> list[str]:
    """Before a stage runs: estimate it (or every stage when stage is None) for this world size (default:
    $WORLD_SIZE) and this device's memory (default: the CUDA device's total, or available RAM on CPU), print
    a warning naming the stage, what it needs and what to change when it would not fit, and return the
    warnings (empty when it fits). Never raises: a recipe it cannot estimate prints one note instead."""
    file = file or sys.stderr
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        gpu = parse_memory(memory) if memory is not None else available_memory(cfg)
        if gpu is None:
            return []
        shapes = resolve_shapes(cfg)
        stages = [e for e in estimate_run(cfg, world, gpu if memory is not None or _device_is_cuda(cfg, None)
                                          else None, shapes) if stage is None or e.stage == stage]
        warns = warnings_for(cfg, stages, world, gpu, shapes)
    except Exception as e:  # noqa: BLE001 - advice only: never stop a run
        print(f"[minitron] memory estimate unavailable ({type(e).__name__}: {e})", file=file)
        return []
    for w in warns:
        print(f"[minitron] {w}", file=file)
    return warns
