"""Teacher -> student distillation (Minitron: forward KL on logits, no LM loss) and teacher correction.

`distill(cfg)` trains the student on packed token blocks with a chunked logit loss
(minitron.losses), AdamW with warm-up + cosine decay, gradient clipping and accumulation, optional bf16
autocast and activation checkpointing, evaluation every N steps, atomic checkpoints and resume, and
runs under torchrun with DDP or FSDP2 (the student is sharded; the teacher is frozen, in eval mode,
without gradients, replicated on every rank). `correct(...)` is the same loop with the LM loss only.

Output dir (`--out`): the trained model as a Hugging Face dir (config.json, model.safetensors,
tokenizer files), metrics.jsonl, loss.png, distill_config.json, and minitron_distill.json (written
last: its presence marks a finished run). checkpoints/ holds the latest checkpoint while training.

Data order: step s uses the global blocks [s*G, (s+1)*G) of an endless sequence of seeded
permutations of the training split (G = batch_size * grad_accum * world_size); rank r takes its slice
of each micro-batch. So the data position is the step number, and 1 process with batch 2B sees the
same global batches as 2 processes with batch B.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minitron.arch import decoder_layers, dims_of, get_arch, layer_output, lm_head
from minitron.data import DataError, load_splits, pack, read_texts, report_blocks, resolve_source
from minitron.fingerprint import content_id, corpus_identity, model_identity
from minitron.losses import (
    HIDDEN_LOSSES,
    LOSSES,
    LossConfig,
    chunked_distill_loss,
    default_layer_map,
    hidden_state_loss,
)
from minitron.models import load_model, resolve_device, resolve_model_path

FINISHED = "minitron_distill.json"


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
    data: str = "default"                 # corpus (see minitron.data.read_texts)
    tokens: int | None = None             # token budget (tokens processed); or give steps
    steps: int | None = None              # optimizer steps; wins over tokens
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
    lr: float = 1e-4                      # peak learning rate
    min_lr: float = 1e-5                  # cosine floor
    warmup_steps: int | None = None       # default: 2% of steps (at least 1)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                # max global grad norm (0: off)
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
    dtype: str = "float32"                # parameter dtype of student and teacher
    autocast: str = "none"                # none | bf16
    grad_checkpointing: bool = False      # activation checkpointing of the student
    distributed: str = "auto"             # auto (ddp under torchrun) | none | ddp | fsdp
    resume: bool = False
    max_blocks: int | None = None         # cap on corpus blocks read
    data_root: str | None = None
    keep_checkpoints: bool = False        # keep checkpoints/ after a finished run
    progress: bool = True

    def __post_init__(self):
        if self.tokens is None and self.steps is None:
            raise DistillError("give a budget: --tokens N or --steps N")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise DistillError(f"unknown hidden loss {self.hidden_loss!r}; use one of {HIDDEN_LOSSES}")
        if self.autocast not in ("none", "bf16"):
            raise DistillError(f"autocast must be 'none' or 'bf16', got {self.autocast!r}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise DistillError(f"distributed must be auto|none|ddp|fsdp, got {self.distributed!r}")
        if self.teacher is None and (self.kd_weight or self.hidden_loss != "none") and not self.topk_cache:
            raise DistillError("no teacher given but the loss needs one; pass --teacher or set kd_weight=0")

    def loss_config(self) -> LossConfig:
        return LossConfig(self.loss, self.temperature, self.jsd_beta, self.kd_weight, self.ce_weight,
                          self.chunk_size)


# ---- small helpers --------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    mode: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def init_distributed(cfg: DistillConfig) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = cfg.distributed if cfg.distributed != "auto" else ("ddp" if world > 1 else "none")
    if world == 1:
        return Dist(0, 1, "none" if mode == "ddp" else mode), resolve_device(cfg.device)
    if mode == "none":
        raise DistillError(f"launched with WORLD_SIZE={world} but distributed='none'; use ddp or fsdp")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), mode), device


def lr_at(step: int, cfg: DistillConfig, total: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.02 * total))
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
    from transformers import AutoConfig

    from minitron.models import load_tokenizer

    tc = AutoConfig.from_pretrained(resolve_model_path(teacher_name))
    sc = AutoConfig.from_pretrained(resolve_model_path(student_name))
    if tc.vocab_size != sc.vocab_size:
        raise DistillError(f"vocabulary mismatch: teacher {teacher_name!r} has {tc.vocab_size} tokens, student "
                           f"{student_name!r} has {sc.vocab_size}. Distillation on logits needs the same "
                           "tokenizer; prune the student from this teacher or pick a matching pair.")
    tt, st = load_tokenizer(teacher_name), load_tokenizer(student_name)
    if tt.get_vocab() != st.get_vocab():
        raise DistillError(f"vocabulary mismatch: teacher {teacher_name!r} and student {student_name!r} have "
                           "different tokenizers (same size, different tokens). Use the teacher's tokenizer.")


# ---- the trained module ---------------------------------------------------------------------------

class LayerTap:
    """Forward hooks keeping the outputs [B, T, C] of chosen decoder layers."""

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in sorted(set(layer_ids))]

    def _hook(self, i):
        def hook(_module, _inp, out):
            self.outputs[i] = layer_output(out)
        return hook


class Student(nn.Module):
    """The student plus the projection of the hidden-state loss; forward returns the loss.

    Wrapping both in one module lets DDP/FSDP2 see every trained parameter, and keeps the lm_head weight
    (used outside lm_head.forward by the chunked loss) inside the root module's forward.
    """

    def __init__(self, model: nn.Module, teacher_hidden: int | None, layer_map: list[int] | None,
                 hidden_loss: str):
        super().__init__()
        self.model = model
        self.hidden_loss = hidden_loss
        self.layer_map = layer_map
        self.proj = None
        width = dims_of(model.config).hidden
        if hidden_loss != "none" and teacher_hidden != width:
            self.proj = nn.Linear(width, teacher_hidden, bias=False, dtype=lm_head(model).weight.dtype)
        self.tap = LayerTap(model, list(range(len(layer_map)))) if hidden_loss != "none" else None

    def forward(self, input_ids, attention_mask, loss_cfg: LossConfig, normalizer, teacher_hidden=None,
                teacher_topk=None, teacher_layers=None, hidden_weight: float = 1.0):
        """input_ids, attention_mask [B, T]; teacher_hidden (h_t [B*(T-1), Ct], w_t [V, Ct]) or
        teacher_topk (idx, logp [B*(T-1), k]); teacher_layers {teacher layer: [B, T, Ct]}.
        Returns (total loss, logit loss, hidden loss), each a scalar divided by normalizer."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state[:, :-1]                                            # [B, T-1, C]
        h = h.reshape(-1, h.shape[-1])                                               # [B*(T-1), C]
        labels = input_ids[:, 1:].reshape(-1)                                        # [B*(T-1)]
        mask = (attention_mask[:, :-1] * attention_mask[:, 1:]).reshape(-1)          # [B*(T-1)]
        logit = chunked_distill_loss(h, lm_head(self.model).weight, mask, loss_cfg, normalizer, labels,
                                     teacher_hidden, teacher_topk)
        hid = torch.zeros((), device=h.device)
        if self.tap is not None and teacher_layers is not None:
            for s_idx, t_idx in enumerate(self.layer_map):
                s = self.tap.outputs[s_idx][:, :-1]                                  # [B, T-1, C]
                s = s.reshape(-1, s.shape[-1])                                       # [B*(T-1), C]
                if self.proj is not None:
                    s = self.proj(s)                                                 # [B*(T-1), Ct]
                t = teacher_layers[t_idx][:, :-1]
                t = t.reshape(-1, t.shape[-1])                                       # [B*(T-1), Ct]
                hid = hid + hidden_state_loss(s, t, mask, self.hidden_loss, normalizer) / len(self.layer_map)
        if self.tap is not None:
            self.tap.outputs.clear()
        return logit + hidden_weight * hid, logit.detach(), hid.detach()


@torch.no_grad()
def teacher_pass(teacher, tap: LayerTap | None, input_ids, attention_mask):
    """Teacher final hidden states [B*(T-1), Ct] and lm_head weight [V, Ct]; tapped layers if any."""
    out = teacher.base_model(input_ids=input_ids, attention_mask=attention_mask)
    h = out.last_hidden_state[:, :-1]                                                # [B, T-1, Ct]
    layers = dict(tap.outputs) if tap is not None else None
    if tap is not None:
        tap.outputs.clear()
    return (h.reshape(-1, h.shape[-1]), lm_head(teacher).weight), layers             # [B*(T-1), Ct]


def wrap(module: Student, d: Dist, device: torch.device) -> nn.Module:
    """DDP or FSDP2 (each decoder layer, then the root) around the trained module."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        for layer in decoder_layers(module.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
    return module


def unwrap(model: nn.Module) -> Student:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


# ---- checkpoints ------------------------------------------------------------------------------------

def _tied_key(student: Student) -> str | None:
    """State-dict key of the lm_head weight when it is tied to the embedding (saved once)."""
    return "model." + get_arch(student.model).lm_head + ".weight" if dims_of(student.model.config).tied else None


def full_state(model: nn.Module, optim, d: Dist) -> tuple[dict, dict | None]:
    """(model state, optimizer state or None without optim) as full CPU tensors (collective under FSDP)."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(model, optim, options=opts) if optim is not None else None
        return get_model_state_dict(model, options=opts), osd
    sd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return sd, optim.state_dict() if optim is not None else None


def save_checkpoint(out: Path, step: int, model, optim, d: Dist, extra: dict) -> None:
    """checkpoints/step-N written to a temp dir, renamed; then `latest` replaced; older ones removed."""
    from safetensors.torch import save_file

    sd, osd = full_state(model, optim, d)
    if not d.main:
        d.barrier()
        return
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=name + ".tmp-", dir=root))
    tied = _tied_key(unwrap(model))
    sd = {k: v.contiguous() for k, v in sd.items() if k != tied}
    save_file(sd, str(tmp / "model.safetensors"))
    torch.save(osd, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    _commit_checkpoint(tmp, root / name)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def _commit_checkpoint(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def can_resume(out: Path) -> bool:
    """True when `out` holds an unfinished run with a checkpoint (pass resume=True to continue it)."""
    return not (Path(out) / FINISHED).is_file() and latest_checkpoint(Path(out)) is not None


def load_checkpoint(path: Path, model, optim, d: Dist) -> dict:
    """Restore model, optimizer and RNG states; returns state.json. safetensors / weights_only only."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        sd = load_file(str(path / "model.safetensors"))
        osd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing
        raise CheckpointError(f"checkpoint {path} is missing or corrupt ({type(e).__name__}: {e}). Delete "
                              f"{path.parent} and start without --resume, or restore the files.") from e
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"checkpoint {path} holds NaN/inf weights in {', '.join(bad[:3])}{more}: training "
                              f"diverged before it was saved, and resuming would continue from broken weights. Delete "
                              f"{path.parent} and start again without --resume (a lower --lr or --grad-clip helps "
                              "a diverging run), or choose another --out.")
    student = unwrap(model)
    tied = _tied_key(student)
    if tied is not None:
        sd[tied] = sd["model." + get_arch(student.model).embed + ".weight"]
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, sd, options=opts)
        set_optimizer_state_dict(model, optim, osd, options=opts)
    else:
        missing, unexpected = student.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not fit this student (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}); was it written for another model?")
        if tied is not None:
            student.model.tie_weights()
        optim.load_state_dict(osd)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# ---- metrics and plot -------------------------------------------------------------------------------

def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def plot_metrics(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "val_lm_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6)
    ax.plot([r["tokens"] for r in evals], [r["val_lm_loss"] for r in evals], "o-", label="val LM loss")
    if any(r.get("val_kl") is not None for r in evals):
        ax.plot([r["tokens"] for r in evals], [r["val_kl"] for r in evals], "s-", label="val KL to teacher")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, teacher, val: torch.Tensor, cfg: DistillConfig, d: Dist, device, autocast) -> dict:
    """Validation LM loss of the student and forward KL (T = 1) to the teacher, per predicted token."""
    model.eval()
    n_blocks = min(val.shape[0], cfg.eval_batches * cfg.batch_size * d.world)
    mine = list(range(d.rank, n_blocks, d.world))
    sums = torch.zeros(3, dtype=torch.float64)  # ce sum, kl sum, tokens
    ce_cfg = LossConfig(kd_weight=0.0, ce_weight=1.0, chunk_size=cfg.chunk_size)
    kl_cfg = LossConfig(loss="fkl", temperature=1.0, chunk_size=cfg.chunk_size)
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    n_batches = torch.tensor([len(batches)])
    if d.world > 1:  # FSDP needs every rank in every forward: pad the short ranks with empty passes
        dist.all_reduce(n_batches, op=dist.ReduceOp.MAX)
    for b in range(int(n_batches)):
        ids = val[batches[b] if b < len(batches) else mine[:1] or [0]].to(device)      # [B, T]
        att = torch.ones_like(ids)
        count = b < len(batches)
        with autocast():
            t_hidden = teacher_pass(teacher, None, ids, att)[0] if teacher is not None else None
            ce = model(ids, att, ce_cfg, 1.0)[1]
            kl = model(ids, att, kl_cfg, 1.0, teacher_hidden=t_hidden)[1] if teacher is not None else 0.0
        if count:
            sums += torch.tensor([float(ce), float(kl), ids.shape[0] * (ids.shape[1] - 1)], dtype=torch.float64)
    d.sum(sums)
    model.train()
    return {"val_lm_loss": sums[0].item() / sums[2].item(),
            "val_kl": sums[1].item() / sums[2].item() if teacher is not None else None}


def evaluate_all(model, teacher, val: torch.Tensor, extra: dict[str, torch.Tensor], cfg: DistillConfig, d: Dist,
                 device, autocast) -> dict:
    """evaluate() on the validation split, plus the LM loss on each extra held-out corpus
    (logged as `val_lm_loss:<source>`)."""
    ev = evaluate(model, teacher, val, cfg, d, device, autocast)
    for source, blocks in extra.items():
        ev[f"val_lm_loss:{source}"] = evaluate(model, None, blocks, cfg, d, device, autocast)["val_lm_loss"]
    return ev


# ---- the loop ---------------------------------------------------------------------------------------

# fields that may change between a run and its resumption (they do not change what is trained)
RESUMABLE_CHANGES = ("resume", "progress", "keep_checkpoints", "eval_every", "eval_batches", "save_every",
                     "device", "distributed")


def run_inputs(cfg: DistillConfig) -> dict:
    """Identity of the teacher's and student's weights and of the corpus (minitron.fingerprint)."""
    return {"teacher": model_identity(cfg.teacher) if cfg.teacher is not None else None,
            "student": model_identity(cfg.student), "data": corpus_identity(cfg.data, cfg.data_root)}


def check_same_run(out: Path, cfg: DistillConfig, inputs: dict) -> None:
    """--resume must continue the same run: same models (by weights, not only by name), data, budget,
    batch and optimizer settings."""
    saved_file = out / "distill_config.json"
    if not saved_file.is_file():
        raise CheckpointError(f"{saved_file} is missing: cannot check that --resume continues the same run; "
                              "start a new run in another --out")
    saved = json.loads(saved_file.read_text())
    now = asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]}
    diff.update({f"{k} (its files)": "changed" for k, v in inputs.items()
                 if "inputs" in saved and saved["inputs"].get(k) != v})
    if diff:
        raise DistillError(f"--resume with settings that differ from the run in {out} (saved vs now: {diff}); "
                           "resume with the same settings, or start a new run in another --out")


def _autocast(cfg: DistillConfig, device: torch.device):
    if cfg.autocast == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def distill(cfg: DistillConfig) -> Path:
    """Train cfg.student against cfg.teacher (or the LM loss alone); returns the output dir."""
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
    if cfg.resume:
        check_same_run(out, cfg, inputs)
    d, device = init_distributed(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.teacher is not None:
        check_vocab(cfg.teacher, cfg.student)
    loss_cfg = cfg.loss_config()

    student_model, tokenizer = load_model(cfg.student, device, cfg.dtype)
    teacher = None
    if cfg.teacher is not None:
        teacher = load_model(cfg.teacher, device, cfg.dtype, with_tokenizer=False)[0]
        teacher.requires_grad_(False).eval()
    splits = load_splits(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.split_seed, cfg.max_blocks,
                         cfg.data_root)
    n_val = cfg.eval_batches * cfg.batch_size * d.world
    extra_val = {src: pack(read_texts(src, cfg.data_root), tokenizer, cfg.seq_len, n_val) for src in cfg.heldout or []}
    per_step = cfg.batch_size * cfg.grad_accum * d.world
    if splits.train.shape[0] < per_step:
        raise DataError(f"corpus too short for one batch: {splits.train.shape[0]} training blocks of {cfg.seq_len} "
                        f"tokens, one step needs {per_step} (batch {cfg.batch_size} x accum {cfg.grad_accum} x "
                        f"{d.world} ranks); add text or lower --batch-size/--seq-len")
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.tokens / (per_step * cfg.seq_len)))
    val = report_blocks(splits.validation)  # disjoint from the blocks that chose the pruned shape

    layer_map, t_tap = None, None
    if cfg.hidden_loss != "none":
        n_s, n_t = dims_of(student_model.config).layers, dims_of(teacher.config).layers
        layer_map = cfg.layer_map or default_layer_map(n_s, n_t)
        if len(layer_map) != n_s or not all(0 <= j < n_t for j in layer_map):
            raise DistillError(f"layer_map {layer_map} needs one teacher layer in [0, {n_t}) per student layer ({n_s})")
        t_tap = LayerTap(teacher, layer_map)
    module = Student(student_model, dims_of(teacher.config).hidden if teacher is not None else None,
                     layer_map, cfg.hidden_loss).to(device)
    if cfg.grad_checkpointing:
        student_model.activation_checkpointing_enable({"use_reentrant": False})
    module.train()
    model = wrap(module, d, device)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              weight_decay=cfg.weight_decay)

    cache = None
    if cfg.topk_cache:
        from minitron.topk_cache import open_or_build

        cache = open_or_build(cfg.topk_cache, teacher, splits.train, cfg.topk, cfg.temperature,
                              str(cfg.teacher), cfg.batch_size, device, d.main, d.barrier,
                              cfg.progress and d.main, content_id(inputs["teacher"]) if cfg.teacher else "")

    metrics_path = out / "metrics.jsonl"
    start = 0
    if cfg.resume:
        state = load_checkpoint(ckpt, model, optim, d)
        start = state["step"]
        if d.main:
            truncate_metrics(metrics_path, start)
            print(f"[minitron] resumed {out} at step {start}/{total}")
    elif d.main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
        (out / "distill_config.json").write_text(json.dumps({**asdict(cfg), "inputs": inputs}, indent=2))
    d.barrier()

    autocast = _autocast(cfg, device)
    tokens_per_step = per_step * cfg.seq_len
    if start == 0:
        ev = evaluate_all(model, teacher, val, extra_val, cfg, d, device, autocast)
        if d.main:
            append_metrics(metrics_path, {"step": 0, "tokens": 0, **ev})

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and d.main), desc="distill", unit="step")
    t0, tok0 = time.perf_counter(), 0
    for step in range(start, total):
        ids_all = global_block_ids(step, splits.train.shape[0], per_step, cfg.seed)
        lr = lr_at(step, cfg, total)
        for g in optim.param_groups:
            g["lr"] = lr
        normalizer = d.sum(torch.tensor(float(per_step // d.world * (cfg.seq_len - 1))))  # packed: all valid
        logged = torch.zeros(3, dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            off = (micro * d.world + d.rank) * cfg.batch_size
            mine = ids_all[off:off + cfg.batch_size]
            ids = splits.train[mine].to(device)                                      # [B, T]
            att = torch.ones_like(ids)
            sync = micro == cfg.grad_accum - 1 or d.mode != "ddp"
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                t_hidden, t_topk, t_layers = None, None, None
                if cache is not None:
                    idx, lp = cache.get(mine)                                        # [B, T-1, k]
                    t_topk = (idx.reshape(-1, idx.shape[-1]).to(device),            # [B*(T-1), k]
                              lp.reshape(-1, lp.shape[-1]).to(device))
                    if t_tap is not None:
                        t_layers = teacher_pass(teacher, t_tap, ids, att)[1]
                elif teacher is not None:
                    t_hidden, t_layers = teacher_pass(teacher, t_tap, ids, att)
                loss, logit, hid = model(ids, att, loss_cfg, normalizer / d.world, t_hidden, t_topk, t_layers,
                                         cfg.hidden_weight)
                loss.backward()
            logged += torch.tensor([loss.item(), logit.item(), hid.item()], dtype=torch.float64) / d.world
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                    else float("inf")))
        grad_norm = _full(grad_norm)
        optim.step()
        optim.zero_grad(set_to_none=True)
        d.sum(logged)
        tok0 += tokens_per_step
        rate = tok0 / max(time.perf_counter() - t0, 1e-9)
        done_steps = step + 1
        if d.main:
            append_metrics(metrics_path, {"step": done_steps, "tokens": done_steps * tokens_per_step, "lr": lr,
                                          "loss": logged[0].item(), "logit_loss": logged[1].item(),
                                          "hidden_loss": logged[2].item(), "grad_norm": grad_norm,
                                          "tok_per_s": rate})
        bar.update(1)
        bar.set_postfix(loss=f"{logged[0].item():.4f}", tok_s=f"{rate:.0f}")
        if done_steps == total or (cfg.eval_every and done_steps % cfg.eval_every == 0):
            ev = evaluate_all(model, teacher, val, extra_val, cfg, d, device, autocast)
            if d.main:
                append_metrics(metrics_path, {"step": done_steps, "tokens": done_steps * tokens_per_step, **ev})
        if cfg.save_every and done_steps % cfg.save_every == 0 and done_steps < total:
            save_checkpoint(out, done_steps, model, optim, d, {"tokens": done_steps * tokens_per_step,
                                                                "total_steps": total})
    bar.close()
    finish(out, model, tokenizer, d, cfg, total, total * tokens_per_step)
    for h in (module.tap.handles if module.tap else []) + (t_tap.handles if t_tap else []):
        h.remove()
    return out


def _full(norm) -> float:
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def finish(out: Path, model, tokenizer, d: Dist, cfg: DistillConfig, steps: int, tokens: int) -> None:
    """Save the student as a HF dir, the plot, then the FINISHED marker (last, atomically)."""
    sd = full_state(model, None, d)[0] if d.mode == "fsdp" else None
    if d.main:
        student = unwrap(model).model
        if sd is not None:
            sd = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
        student.save_pretrained(out, state_dict=sd)
        tokenizer.save_pretrained(out)
        metrics = read_metrics(out / "metrics.jsonl")
        plot_metrics(metrics, out / "loss.png", f"{'distill' if cfg.teacher else 'LM fine-tune'}: {cfg.student}")
        evals = [r for r in metrics if "val_lm_loss" in r]
        info = {"finished": True, "steps": steps, "tokens": tokens, "first_eval": evals[0] if evals else None,
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


# ---- CLI parts (minitron.cli dispatches here) ---------------------------------------------------------

def _common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by distill and correct; types and defaults come from DistillConfig."""
    from minitron.config import add_option

    def opt(name, help="", **kw):
        add_option(p, DistillConfig, name, help, **kw)

    opt("data", "corpus: file, folder, data-dir name or `default`")
    p.add_argument("--out", required=True, help="output dir (model, metrics.jsonl, loss.png, checkpoints)")
    opt("tokens", "token budget (tokens processed)")
    opt("steps", "optimizer steps (wins over --tokens)")
    for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip"):
        opt(name)
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
    opt("dtype", "parameter dtype: float32 | bfloat16")
    opt("autocast", choices=["none", "bf16"])
    opt("grad_checkpointing", "activation checkpointing of the student")
    opt("distributed", choices=["auto", "none", "ddp", "fsdp"])
    opt("resume", "continue the unfinished run in --out")
    opt("keep_checkpoints", "keep checkpoints/ after a finished run")
    opt("progress", "no progress bar", flag="--no-progress")


def add_distill_parsers(subparsers) -> None:
    """Add `distill` and `correct` to an argparse subparsers object."""
    from minitron.config import add_option

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
    _common_options(p)
    p.set_defaults(func=run_distill)
    c = subparsers.add_parser("correct", help="teacher correction: LM-loss fine-tune on the distillation data")
    c.add_argument("--model", required=True)
    _common_options(c)
    c.set_defaults(func=run_correct)


_SHARED = ("data", "out", "tokens", "steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
           "batch_size", "grad_accum", "seq_len", "chunk_size", "eval_every", "eval_batches", "save_every",
           "max_blocks", "data_root", "seed", "split_seed", "heldout", "device", "dtype", "autocast", "grad_checkpointing",
           "distributed", "resume", "keep_checkpoints", "progress")


def run_distill(args) -> Path:
    kw = {k: getattr(args, k) for k in _SHARED}
    cfg = DistillConfig(student=args.student, teacher=args.teacher, loss=args.loss, temperature=args.temperature,
                        jsd_beta=args.jsd_beta, ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                        hidden_loss=args.hidden_loss, hidden_weight=args.hidden_weight, layer_map=args.layer_map,
                        topk_cache=args.topk_cache, topk=args.topk, **kw)
    return distill(cfg)


def run_correct(args) -> Path:
    kw = {k: getattr(args, k) for k in _SHARED if k not in ("data", "out", "tokens", "steps")}
    return correct(args.model, args.data, args.out, args.tokens, args.steps, **kw)
