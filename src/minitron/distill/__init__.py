"""Teacher -> student distillation (Minitron: forward KL on logits, no LM loss) and teacher correction.

`distill(cfg)` trains the student on packed token blocks with a chunked logit loss
(minitron.distill.losses), AdamW with warm-up + cosine decay, gradient clipping and accumulation, optional bf16
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

Modules: losses (chunked logit and hidden-state losses), topk_cache (the teacher's top-k log-probs on disk), config
(DistillConfig, errors, resume checks), parallel (process group, collectives, DDP / FSDP2, the sharded load),
student (the trained module, teacher pass, validation), checkpoint (sharded DCP checkpoints), metrics
(metrics.jsonl, loss.png), loop (the training loop, `distill`, `correct`). Its command-line parsers are in
minitron.cli.distill. Layer: a stage; imports minitron.data and minitron.arch (never the pipeline or the CLI).
"""

from minitron._api import make_callable
from minitron.distill.checkpoint import can_resume, latest_checkpoint
from minitron.distill.config import FINISHED, CheckpointError, DistillConfig, DistillError
from minitron.distill.loop import correct, distill, global_block_ids, lr_at
from minitron.distill.metrics import read_metrics
from minitron.distill.student import Student, teacher_pass

__all__ = ["FINISHED", "CheckpointError", "DistillConfig", "DistillError", "Student", "can_resume", "correct",
           "distill", "global_block_ids", "latest_checkpoint", "lr_at", "read_metrics", "teacher_pass"]

make_callable(__name__, "distill")  # `from minitron import distill; distill(cfg)`
