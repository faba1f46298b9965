"""The distillation run's settings (DistillConfig), its errors, and the check that --resume continues the
same run (same settings, same teacher / student / corpus files)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from minitron.data.fingerprint import corpus_identity, model_identity
from minitron.distill.losses import (
    HIDDEN_LOSSES,
    LossConfig,
)

FINISHED = "minitron_distill.json"
AUTOCAST_MODES = ("none", "bf16", "auto")  # auto: bf16 on a GPU that has it, else the faster of the two, measured
LR_PER_WIDTH = 0.2  # a recipe's `distill.lr: auto`: this over the student's hidden width (auto_lr)


def auto_lr(hidden: int) -> float:
    """The peak learning rate of `distill.lr: auto` for a student of this hidden width: LR_PER_WIDTH / hidden (the
    best AdamW rate falls as 1 / width, as muP predicts). Anchors (benchmarks/RESULTS.md): at hidden 576, the
    24-layer student of 2026-12-07, 3.5e-4 beat 6.9e-4 and 2.5e-4 at 20, 40 and 60 steps (WikiText-2 validation
    4.217 against 4.292 and 4.229 after 60);
    at hidden 504, the 30-layer 70M student, 5e-4 and 1e-3 were equally good and 2e-3 / 3e-3 worse over 20 steps.
    0.4 / hidden until 2026-12-07. At hidden 4096 it gives 4.9e-5; the Minitron papers distil 8B students at 1e-4
    (the GPU recipes give theirs explicitly)."""
    return LR_PER_WIDTH / hidden


class DistillError(ValueError):
    """Bad distillation input (vocabulary mismatch, unfinished out dir, ...); the message says the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing or corrupt."""


@dataclass
class DistillConfig:
    """One distillation (or, with teacher=None and kd_weight=0, teacher-correction) run."""

    student: str                          # HF dir / hub id / `default` of the model to train
    out: str                              # output dir (model, metrics, plot, checkpoints)
    teacher: str | None = "default"       # None: no teacher (LM-loss fine-tune, e.g. teacher correction)
    data: str = "default"                 # corpus (see minitron.data.corpus.read_texts)
    tokens: int | None = None             # token budget (tokens processed); or give steps
    steps: int | None = None              # optimizer steps; wins over tokens
    # or a wall-time budget for the whole call (loading, evaluations and saving included): the first probe_steps
    # (the warm-up) are timed, then the number of steps that fits is fixed (budget.json) and the schedule set by it
    seconds: float | None = None
    probe_steps: int = 4
    loss: str = "fkl"                     # fkl | rkl | jsd
    temperature: float = 1.0              # KD temperature (loss scaled by T^2)
    jsd_beta: float = 0.5                 # teacher weight in the jsd mixture
    kd_weight: float = 1.0                # logit-divergence weight
    ce_weight: float = 0.0                # next-token cross-entropy weight (paper: 0)
    hidden_loss: str = "none"             # none | cosine | mse: intermediate-state loss
    hidden_weight: float = 1.0            # its weight (averaged over mapped layer pairs)
    layer_map: list[int] | None = None    # teacher layer per student layer (default: spread evenly)
    topk_cache: str | None = None         # dir of the teacher top-k cache (built once if missing)
    topk: int = 64                        # k of the cache
    # with a cache: free the teacher once the cache (and the validation blocks' top-k) is built, and log the
    # validation KL over the cache's k + 1 buckets (val_kl_topk) instead of the full KL; None / False: keep it
    release_teacher: bool | None = None
    lr: float = 1e-4                      # peak learning rate
    min_lr: float = 1e-5                  # cosine floor
    warmup_steps: int | None = None       # default: 2% of steps (at least 1)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                # max global grad norm (0: off)
    # train neither the token embedding nor the LM head: no gradient, no optimizer state for them. Where the
    # student keeps the teacher's hidden width they are the teacher's own; on the default 89M student this
    # trained 15% more tokens per second at the same loss per token (benchmarks/RESULTS.md)
    freeze_embeddings: bool = False
    batch_size: int = 8                   # blocks per micro-batch per rank
    grad_accum: int = 1                   # micro-batches per optimizer step
    seq_len: int = 256                    # tokens per block
    chunk_size: int = 512                 # tokens per loss chunk
    val_fraction: float = 0.05
    eval_every: int = 50                  # steps between evaluations (0: only at start and end)
    eval_batches: int = 4                 # validation micro-batches per evaluation
    save_every: int = 50                  # steps between checkpoints (0: none)
    seed: int = 0                         # data order and initialization
    split_seed: int = 0                   # train/validation split: fixed across seeds, so runs share held-out blocks
    heldout: list[str] | None = None      # extra held-out corpora whose LM loss is logged at every evaluation
    device: str = "auto"
    dtype: str = "float32"                # compute dtype: float32, or bfloat16 (fp32 master weights + bf16 compute)
    teacher_dtype: str | None = None      # the frozen teacher's dtype (default: bfloat16 on CUDA, else dtype)
    autocast: str = "none"                # none | bf16 | auto (bf16 on a GPU that has it, else the faster, measured)
    grad_checkpointing: bool = False      # activation checkpointing of the student
    distributed: str = "auto"             # auto (ddp under torchrun) | none | ddp | fsdp
    # FSDP with grad_accum > 1: reduce-scatter gradients after every micro-batch (None / False: after the last
    # only, which keeps an unsharded fp32 gradient per rank, 4 bytes x parameters, and saves grad_accum - 1
    # reductions per step; True: sharded gradients, grad_accum reductions per step)
    fsdp_reduce_every_micro: bool | None = None
    resume: bool = False
    max_blocks: int | None = None         # cap on corpus blocks read
    data_root: str | None = None
    keep_checkpoints: bool = False        # keep checkpoints/ after a finished run
    progress: bool = True

    def __post_init__(self):
        if sum(x is not None for x in (self.tokens, self.steps, self.seconds)) == 0:
            raise DistillError("give a budget: --tokens N, --steps N or --seconds S")
        if self.seconds is not None and (self.tokens is not None or self.steps is not None):
            raise DistillError("give one budget: --seconds, or --tokens / --steps (not both)")
        if self.seconds is not None and (self.seconds <= 0 or self.probe_steps < 2):
            raise DistillError(f"--seconds must be > 0 and probe_steps >= 2 (the first step is not timed), got "
                               f"{self.seconds} and {self.probe_steps}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise DistillError(f"unknown hidden loss {self.hidden_loss!r}; use one of {HIDDEN_LOSSES}")
        if self.autocast not in AUTOCAST_MODES:
            raise DistillError(f"autocast must be none, bf16 or auto (the faster of the two on this machine, "
                               f"measured), got {self.autocast!r}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise DistillError(f"distributed must be auto|none|ddp|fsdp, got {self.distributed!r}")
        if self.release_teacher and not (self.topk_cache and self.teacher is not None and self.hidden_loss == "none"):
            raise DistillError("release_teacher frees the teacher after building the top-k cache: it needs a teacher, "
                               "a topk_cache and hidden_loss none (a hidden-state loss runs the teacher every step)")
        if self.teacher is None and (self.kd_weight or self.hidden_loss != "none") and not self.topk_cache:
            raise DistillError("no teacher given but the loss needs one; pass --teacher or set kd_weight=0")

    def loss_config(self) -> LossConfig:
        return LossConfig(self.loss, self.temperature, self.jsd_beta, self.kd_weight, self.ce_weight,
                          self.chunk_size)




# fields that may change between a run and its resumption (they do not change what is trained)
# (seconds: a resumed time-budgeted run keeps the plan it made, budget.json; heldout: only what is logged)
RESUMABLE_CHANGES = ("resume", "progress", "keep_checkpoints", "eval_every", "eval_batches", "save_every",
                     "device", "distributed", "fsdp_reduce_every_micro", "seconds", "heldout")


def run_inputs(cfg: DistillConfig) -> dict:
    """Identity of the teacher's and student's weights and of the corpus (minitron.data.fingerprint)."""
    return {"teacher": model_identity(cfg.teacher) if cfg.teacher is not None else None,
            "student": model_identity(cfg.student), "data": corpus_identity(cfg.data, cfg.data_root)}


def check_same_run(out: Path, cfg: DistillConfig, inputs: dict, world: int = 1) -> dict:
    """--resume must continue the same run: same models (by weights, not only by name), data, budget,
    optimizer settings and global batch. The world size may change (checkpoints are resharded) when
    batch_size x grad_accum x world stays the same, so every step sees the same blocks. Returns the saved
    distill_config.json (what the run chose at its start, e.g. autocast_chosen)."""
    saved_file = out / "distill_config.json"
    if not saved_file.is_file():
        raise CheckpointError(f"{saved_file} is missing: cannot check that --resume continues the same run; "
                              "start a new run in another --out")
    saved = json.loads(saved_file.read_text())
    now = asdict(cfg)
    skip = set(RESUMABLE_CHANGES)
    if saved.get("global_batch") == cfg.batch_size * cfg.grad_accum * world:
        skip |= {"batch_size", "grad_accum"}
    diff = {k: (saved.get(k), now[k]) for k in now if k not in skip and saved.get(k) != now[k]}
    if "global_batch" in saved and saved["global_batch"] != cfg.batch_size * cfg.grad_accum * world:
        diff["global batch (batch_size x grad_accum x world size)"] = (saved["global_batch"],
                                                                      cfg.batch_size * cfg.grad_accum * world)
    diff.update({f"{k} (its files)": "changed" for k, v in inputs.items()
                 if "inputs" in saved and saved["inputs"].get(k) != v})
    if diff:
        raise DistillError(f"--resume with settings that differ from the run in {out} (saved vs now: {diff}); "
                           "resume with the same settings, or start a new run in another --out")
    return saved
