"""A `minitron run` recipe: RunConfig and its sections (typed; YAML and dotted overrides through
minitron.pipeline.config), each section's defaults taken from the stage's own config dataclass so that the
command line, the recipe and the stage can never disagree."""

from __future__ import annotations

from dataclasses import dataclass, field

from minitron.data.blends import BlendEntry, inline_blend
from minitron.pipeline.config import ConfigError, default_of
from minitron.prune.plan import PlanError, Target
from minitron.prune.search import SearchConfig
from minitron.prune.trim import PruneConfig

STAGES = ("correction", "importance", "search", "prune", "distill", "eval", "export", "report")


def _d(cls, name):
    return default_of(cls, name)


def _dc(name):
    from minitron.distill import DistillConfig

    return default_of(DistillConfig, name)


@dataclass
class ModelSection:
    teacher: str = "default"              # HF dir, hub id, or `default` (SmolLM2-135M-Instruct)
    device: str = _d(PruneConfig, "device")
    dtype: str = _d(PruneConfig, "dtype")
    trust_remote_code: bool = False


@dataclass
class DataSection:
    corpus: str = "default"               # distillation / calibration corpus (minitron.data.corpus)
    seq_len: int = _d(PruneConfig, "seq_len")
    val_fraction: float = _d(PruneConfig, "val_fraction")
    data_dir: str | None = None           # folder laid out like shared/data ($MINITRON_DATA_DIR)
    seed: int = _d(PruneConfig, "seed")
    blend: list[BlendEntry] = field(default_factory=list)  # inline {corpus, weight, ...} sources instead of corpus

    def __post_init__(self):  # an inline blend becomes a blend file (store.inline_blend): one code path
        if self.blend:
            self.corpus = inline_blend(self.blend, self.corpus)


@dataclass
class CorrectionSection:
    enabled: bool = False                 # LM-loss fine-tune of the teacher on the corpus first
    tokens: int = 100_000
    lr: float = 1e-5
    batch_size: int = _dc("batch_size")
    grad_accum: int = _dc("grad_accum")
    autocast: str = _dc("autocast")       # none | bf16 (fp32 master weights, bf16 compute) | auto (measured)
    grad_checkpointing: bool = _dc("grad_checkpointing")  # activation checkpointing
    distributed: str = _dc("distributed")  # auto (ddp under torchrun) | none | ddp | fsdp
    fsdp_reduce_every_micro: bool | None = _dc("fsdp_reduce_every_micro")  # fsdp: a reduction per micro-batch


@dataclass
class ImportanceSection:
    calib_samples: int = _d(PruneConfig, "calib_samples")
    heldout_samples: int = _d(PruneConfig, "heldout_samples")  # validation blocks that choose (as many report)
    batch_size: int = _d(PruneConfig, "batch_size")
    seq_agg: str = _d(PruneConfig, "seq_agg")
    batch_agg: str = _d(PruneConfig, "batch_agg")
    criterion: str = _d(PruneConfig, "criterion")  # activation | magnitude | taylor | random


@dataclass
class PruneSection:
    """The prune stage's least-squares refit (minitron.prune.refit) of the trimmed output projections."""

    refit: str = _d(PruneConfig, "refit")                  # none | mlp | attn+mlp
    refit_samples: int = _d(PruneConfig, "refit_samples")  # calibration blocks it reads
    refit_ridge: float = _d(PruneConfig, "refit_ridge")    # pull toward the trimmed weights


@dataclass
class DistillSection:
    tokens: int = 200_000
    loss: str = _dc("loss")
    temperature: float = _dc("temperature")
    ce_weight: float = _dc("ce_weight")
    lr: float | str = _dc("lr")           # or auto: distill.config.auto_lr (0.2 / the student's hidden width)
    min_lr: float | str = _dc("min_lr")   # or auto: lr / 10
    batch_size: int = _dc("batch_size")
    grad_accum: int = _dc("grad_accum")
    eval_every: int = _dc("eval_every")
    save_every: int = _dc("save_every")
    topk: int = 0                         # > 0: cache the teacher's top-k log-probs once and reuse them
    release_teacher: bool | None = _dc("release_teacher")  # with topk: free the teacher once the cache is built
    autocast: str = _dc("autocast")       # none | bf16 (fp32 master weights, bf16 compute) | auto (measured)
    grad_checkpointing: bool = _dc("grad_checkpointing")  # activation checkpointing of the student
    distributed: str = _dc("distributed")  # auto (ddp under torchrun) | none | ddp | fsdp
    fsdp_reduce_every_micro: bool | None = _dc("fsdp_reduce_every_micro")  # fsdp: a reduction per micro-batch
    teacher_dtype: str | None = _dc("teacher_dtype")  # None: bfloat16 on CUDA, else model.dtype
    heldout: list[str] | None = None     # other corpora whose LM loss every evaluation logs
    # train neither the token embedding nor the LM head; auto (the default recipe's): freeze them where the
    # student keeps the teacher's hidden width (they are then the teacher's own), train them where it was cut
    freeze_embeddings: bool | str = _dc("freeze_embeddings")

    def __post_init__(self):
        if self.freeze_embeddings not in (True, False, "auto"):
            raise ConfigError(f"distill.freeze_embeddings: {self.freeze_embeddings!r} is none of true, false, auto; "
                              f"give e.g. distill.freeze_embeddings=auto")
        for name in ("lr", "min_lr"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "auto" or not isinstance(value, str) and value <= 0:
                raise ConfigError(f"distill.{name}: {value!r} is neither a positive number nor auto; give e.g. "
                                  f"distill.{name}=1e-4, or distill.{name}=auto")

    def embeddings_frozen(self, student_hidden: int, teacher_hidden: int | None) -> bool:
        """Whether distillation leaves the embedding and LM head untrained: freeze_embeddings, with auto resolved
        (frozen where a teacher is given and the student keeps its hidden width)."""
        if self.freeze_embeddings != "auto":
            return bool(self.freeze_embeddings)
        return teacher_hidden is not None and student_hidden == teacher_hidden


@dataclass
class EvalSection:
    tasks: list[str] = field(default_factory=lambda: ["wikitext2", "loss:default", "piqa", "arc_easy", "speed"])
    limit: int | None = 200               # items per zero-shot task
    ppl_limit: int | None = 20            # windows (wikitext2) / blocks (loss:...) per perplexity task
    batch_size: int = 8
    window: int = 2048
    speed_rounds: int = 5                 # speed: interleaved rounds over the models, best of each kept


@dataclass
class IterativeSection:
    budgets: list[str] = field(default_factory=list)  # e.g. [100M, 70M]: one prune -> distill per budget


@dataclass
class ExportSection:
    gguf: str | None = None               # also write export/student-<TYPE>.gguf for llama.cpp: f16 | q8_0 | ...
    gguf_speed: bool = False              # time teacher vs student GGUF under llama.cpp (needs llama-cpp-python)
    # per-layer students (target.layer_widths): also export/padded (stock layout, zero-padded to the widest layer:
    # exact logits, no memory saved) and export/nemotron-nas (NVIDIA's DeciLM layout, which vLLM loads)
    padded: bool = False
    nemotron_nas: bool = False


@dataclass
class BudgetSection:
    minutes: float | None = None          # wall time for the whole run; distillation gets what the rest leaves
    gpu_hours: float | None = None        # or GPU-hours, shared by the ranks (minutes = gpu_hours * 60 / ranks)


@dataclass
class RunConfig:
    """One recipe. The pruning target is `target` (or the search's pick, or the iterative budgets)."""

    out: str = "runs/default"
    budget: BudgetSection = field(default_factory=BudgetSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    correction: CorrectionSection = field(default_factory=CorrectionSection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    target: Target = field(default_factory=Target)
    prune: PruneSection = field(default_factory=PruneSection)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)
    iterative: IterativeSection = field(default_factory=IterativeSection)
    export: ExportSection = field(default_factory=ExportSection)

    def check(self) -> None:
        t = self.target
        if not (t.params or t.hidden or t.ffn or t.heads or t.kv_heads or t.layers or t.drop_layers or t.experts
                or t.top_k or t.shared_ffn or t.mamba_heads or t.mamba_head_dim
                or self.search.enabled or self.iterative.budgets):
            raise PlanError("the recipe prunes nothing: set target.params (e.g. 70M) or target dims, "
                            "or enable search / iterative")
        from minitron.prune.importance import CRITERIA

        if self.export.gguf:
            from minitron.export.gguf import check_type

            check_type(self.export.gguf)  # an unknown type fails now, not after distillation
        if self.export.gguf_speed:
            if not self.export.gguf:
                raise ConfigError("export.gguf_speed times the GGUF files: set export.gguf too (e.g. q8_0)")
            from minitron.export.runtime import llama_cpp

            llama_cpp()  # RuntimeMissing (how to install llama-cpp-python) now, not after distillation
        from minitron.distill.config import AUTOCAST_MODES

        for name in ("correction", "distill"):
            if getattr(self, name).autocast not in AUTOCAST_MODES:
                raise ConfigError(f"{name}.autocast {getattr(self, name).autocast!r} unknown; choose from "
                                  f"{', '.join(AUTOCAST_MODES)} (auto: the faster of bf16 and fp32 here, measured)")
        if self.importance.criterion not in CRITERIA:
            raise ConfigError(f"importance.criterion {self.importance.criterion!r} unknown; choose from "
                              f"{', '.join(CRITERIA)}")
        from minitron.prune.refit import RefitConfig

        try:
            RefitConfig(self.prune.refit, self.prune.refit_samples, self.prune.refit_ridge).check()
        except ValueError as e:
            raise ConfigError(f"prune: {e}") from None
        b = self.budget
        if b.minutes is not None and b.gpu_hours is not None:
            raise ConfigError("give one budget: budget.minutes (wall time) or budget.gpu_hours, not both")
        if any(v is not None and v <= 0 for v in (b.minutes, b.gpu_hours)):
            raise ConfigError(f"the budget must be positive, got minutes={b.minutes} gpu_hours={b.gpu_hours}")
        if (t.layer_widths or self.search.layer_widths) and self.iterative.budgets:
            raise ConfigError("per-layer widths (target / search.layer_widths) are not pruned again: iterative.budgets "
                              "would prune a per-layer student in its next step. Use one prune step (drop "
                              "iterative.budgets) or uniform widths")
        if (b.minutes or b.gpu_hours) and self.iterative.budgets:
            raise ConfigError("budget.minutes / gpu_hours plans one distillation; iterative.budgets runs several: "
                              "use distill.tokens with iterative, or drop iterative.budgets")
