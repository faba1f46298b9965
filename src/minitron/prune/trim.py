"""Apply a PrunePlan: slice weights, drop layers, fix config and module attributes; save atomically."""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minitron.arch import adapters as arch
from minitron.arch import layerwise
from minitron.arch.adapters import slice_linear, slice_norm  # the slicing helpers (also importable from here)
from minitron.arch.files import atomic_dir
from minitron.arch.mamba import slice_mixer
from minitron.arch.models import lm_loss, load_model, save_model
from minitron.arch.moe import slice_experts
from minitron.data.corpus import (
    calibration_sample,
    load_splits,
    report_blocks,
    resolve_source,
    selection_blocks,
)
from minitron.eval.report import plot_blocks, plot_importance, plot_layer_widths
from minitron.prune import per_layer
from minitron.prune.importance import (
    CRITERIA,
    ImportanceConfig,
    check_scores_meta,
    data_free_widths,
    load_scores,
    save_scores,
    score_model,
)
from minitron.prune.plan import (
    PlanError,
    PrunePlan,
    Target,
    budget_splits,
    layer_score_name,
    make_plan,
    missing_layer_scores,
    resolve_dims,
    source_config,
)
from minitron.prune.refit import RefitConfig, refit
from minitron.prune.refit import supported as refit_supported


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Indices of the rows of `size` channels each that belong to the kept units (heads) -> [len(units)*size]."""
    return (torch.tensor(units)[:, None] * size + torch.arange(size)[None, :]).flatten()  # [U, D] -> [U*D]


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Trim `model` in place to the plan's kept layers, channels, neurons and heads. Returns the model."""
    src, dims = arch.Dims(**plan.source), arch.Dims(**plan.target)
    hd = dims.head_dim
    seg_size = {"q": src.heads * hd, "kv": src.kv_heads * hd, "ffn": src.ffn}  # rows per segment in the source
    hidden = torch.tensor(plan.hidden)
    layers = arch.decoder_layers(model)
    kept = nn.ModuleList([layers[i] for i in plan.kept_layers])
    moe = arch.is_moe(model)
    parts = arch.layer_parts(model)  # dense / MoE: attention and MLP in every layer; hybrid: one mixer each
    widths = {w["layer"]: w for w in plan.per_layer.get("widths", [])}  # per-layer widths (else: dims everywhere)
    for old_i, layer in zip(plan.kept_layers, kept, strict=True):
        w = widths.get(old_i)
        has = parts[old_i] - ({"attn"} if w and not w["kv_heads"] else set()) - ({"mlp"} if w and not w["ffn"] else set())
        rows = {"q": _rows(plan.heads.get(old_i, []), hd), "kv": _rows(plan.kv_heads.get(old_i, []), hd),
                "ffn": torch.tensor(plan.ffn.get(old_i, []), dtype=torch.long)}
        inputs = ((arch.attn_inputs(model, layer) if "attn" in has else [])
                  + (arch.mlp_inputs(model, layer) if "mlp" in has and not moe else []))
        for lin, segs in inputs:
            offsets = [sum(seg_size[s] for s in segs[:j]) for j in range(len(segs))]
            slice_linear(lin, out_idx=torch.cat([rows[s] + off for s, off in zip(segs, offsets, strict=True)]),
                         in_idx=hidden)
        if "attn" in has:
            slice_linear(arch.attn_output(model, layer), out_idx=hidden, in_idx=rows["q"])
            for norm, seg in arch.proj_norms(model, layer):  # OLMo2 / OLMoE q_norm, k_norm over whole projections
                slice_norm(norm, rows[seg])
        if moe:
            _slice_moe(model, layer, hidden, plan, old_i)
        elif "mlp" in has:
            slice_linear(arch.mlp_output(model, layer), out_idx=hidden, in_idx=rows["ffn"])
        if "mamba" in has:
            slice_mixer(model, layer, hidden, plan.mamba_heads[old_i], plan.mamba_channels[old_i], src)
        if "moe" in has:  # a hybrid MoE mixer: hidden only (its experts are not an axis yet)
            for module, name, axis in arch.hybrid_moe_hidden_axes(model, layer):
                t = getattr(module, name).data
                setattr(module, name, nn.Parameter(t.index_select(axis, hidden.to(t.device)).clone()))
        for norm in arch.hidden_norms(model, layer):
            slice_norm(norm, hidden)
        layer_dims = replace(dims, heads=w["heads"], kv_heads=w["kv_heads"], ffn=w["ffn"]) if w else dims
        arch.set_module_widths(model, layer, layer_dims, has)
        layerwise.skip_parts(model, layer, parts[old_i] - has)
        if moe:
            arch.set_moe_widths(model, layer, dims)
    arch.set_decoder_layers(model, kept)
    arch.write_dims(model.config, dims, plan.kept_layers)
    if widths:
        layerwise.write_layer_widths(model.config, [layerwise.LayerWidth(widths[i]["heads"], widths[i]["kv_heads"],
                                                                         widths[i]["ffn"]) for i in plan.kept_layers])
    for new_i, layer in enumerate(kept):
        arch.set_layer_index(model, layer, new_i)
    emb = arch.embedding(model)
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, hidden.to(emb.weight.device)).clone())
    emb.embedding_dim = len(hidden)
    arch.rescale_embedding(model, dims.hidden)  # Gemma3: sqrt(hidden) scale, folded so the embedding is kept
    slice_norm(arch.final_norm(model), hidden)
    head = arch.lm_head(model)
    if dims.tied:
        head.weight = emb.weight
        head.in_features = len(hidden)
    else:
        slice_linear(head, in_idx=hidden)
    return model


def _slice_moe(model: nn.Module, layer: nn.Module, hidden: torch.Tensor, plan: PrunePlan, old_i: int) -> None:
    """The MoE block of source layer old_i: router and fused experts (minitron.arch.moe), the shared expert
    (a gated MLP) and its gate [1, C]."""
    slice_experts(model, layer, hidden, plan.experts[old_i], plan.expert_ffn[old_i])
    p = arch.moe_parts(model, layer)
    if p.shared is not None:
        keep = torch.tensor(plan.shared_ffn[old_i], dtype=torch.long)
        slice_linear(p.shared.gate_proj, out_idx=keep, in_idx=hidden)
        slice_linear(p.shared.up_proj, out_idx=keep, in_idx=hidden)
        slice_linear(p.shared.down_proj, out_idx=hidden, in_idx=keep)
        slice_linear(p.shared_gate, in_idx=hidden)


def _snapshot(model: nn.Module) -> tuple[list, list, dict]:
    """What apply_plan changes, by reference: every module's parameter, buffer, submodule and attribute
    entries, the config's attributes, and clones of the small (0-1 dim) tensors it may write in place
    (Gemma3's embed_scale and final-norm gain). Costs no copy of any weight matrix."""
    modules = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules),
                {k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
               for m in model.modules()]
    small = [(t, t.detach().clone()) for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
             if t.dim() <= 1]
    return modules, small, dict(model.config.__dict__)


@torch.no_grad()
def _restore(model: nn.Module, saved: tuple[list, list, dict]) -> None:
    """Undo apply_plan from a _snapshot: the model is bit-identical to before (its own tensor objects)."""
    modules, small, config = saved
    for m, params, buffers, children, attrs in modules:
        for d, old in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
            d.clear()
            d.update(old)
        for k in [k for k in m.__dict__ if k not in attrs and k not in ("_parameters", "_buffers", "_modules")]:
            del m.__dict__[k]
        m.__dict__.update(attrs)
    for t, value in small:
        t.copy_(value)
    model.config.__dict__.clear()
    model.config.__dict__.update(config)


@contextlib.contextmanager
def pruned_in_place(model: nn.Module, plan: PrunePlan):
    """Temporarily prune `model` by `plan` in place (apply_plan); on exit it is restored exactly.

    The originals are kept by reference while the sliced tensors are made, so the peak is the model plus
    its pruned size (a deepcopy costs the full model on top of that). Forward passes only."""
    saved = _snapshot(model)
    try:
        yield apply_plan(model, plan)
    finally:
        _restore(model, saved)


def pruned_copy(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """An independent pruned model (e.g. to train), made at the cost of its own size: the tensors that
    apply_plan slices are moved into the copy, only the unsliced ones (per-head norms, buffers) are copied."""
    before = {id(t) for t in (*model.parameters(), *model.buffers())}
    with pruned_in_place(model, plan) as pruned:
        fresh = {id(t): t for t in (*pruned.parameters(), *pruned.buffers()) if id(t) not in before}
        return copy.deepcopy(pruned, memo=dict(fresh))


def loss_after_pruning(model: nn.Module, plan: PrunePlan, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """LM loss on blocks [N, T] of `model` pruned by `plan` (pruned in place, then restored exactly)."""
    with pruned_in_place(model, plan) as pruned:
        return lm_loss(pruned, blocks, batch_size)


def choose_split(model, scores: dict[str, torch.Tensor], heldout: torch.Tensor, target: Target,
                 batch_size: int = 8) -> tuple[Target, list[dict]]:
    """Prune every hidden/MLP split of `target`'s budget (plan.budget_splits) from `scores` and keep the one
    with the lowest LM loss on the held-out blocks [N, T] right after pruning. Returns that Target (hidden
    fixed) and the table, best first."""
    rows = []
    for t in tqdm(budget_splits(model.config, target), desc="prune: hidden/MLP split", unit="split"):
        plan = make_plan(model.config, scores, t)
        rows.append({"hidden": plan.target["hidden"], "ffn": plan.target["ffn"], "params": plan.params_after["total"],
                     "loss_pruned": loss_after_pruning(model, plan, heldout, batch_size)})
    if not rows:
        raise PlanError(f"no hidden/MLP split of {target.params:.0f} {target.params_kind} params at multiples of "
                        f"{target.round_to} fits; lower target.round_to or change target.params")
    rows.sort(key=lambda r: r["loss_pruned"])
    return replace(target, hidden=rows[0]["hidden"]), rows


def choose_layer_norm(model, scores: dict[str, torch.Tensor], heldout: torch.Tensor, target: Target,
                      batch_size: int = 8) -> tuple[Target, list[dict]]:
    """Per-layer widths: prune with each normalization of the scores across layers (per_layer.NORMS) and keep the
    one with the lowest LM loss on the held-out blocks [N, T] right after pruning. Returns that Target and the
    table (each normalization's loss and widths), best first."""
    rows = []
    for norm in tqdm(per_layer.NORMS, desc="prune: per-layer normalization", unit="norm"):
        plan = make_plan(model.config, scores, replace(target, layer_norm=norm))
        rows.append({"norm": norm, "loss_pruned": loss_after_pruning(model, plan, heldout, batch_size),
                     "ffn": [w["ffn"] for w in plan.per_layer["widths"]],
                     "kv_heads": [w["kv_heads"] for w in plan.per_layer["widths"]]})
    rows.sort(key=lambda r: r["loss_pruned"])
    return replace(target, layer_norm=rows[0]["norm"]), rows


class OutputExists(FileExistsError):
    """The output dir exists and is not empty."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output dir unless overwrite (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"--out {out} is a file, not a folder; choose another --out (the file is left as it is)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} exists and is not empty; choose another --out or pass --overwrite")


# ---- the `minitron prune` stage: data -> importance -> plan -> trim -> save -------------------------

@dataclass
class PruneConfig:
    """Everything `minitron prune` needs; saved as prune_config.json beside the pruned model. These
    defaults are the only ones: the CLI options and the recipe's importance/data sections read them."""

    model: str = "default"
    out: str = "runs/pruned"
    target: Target = field(default_factory=Target)
    calib_data: str = "default"        # corpus for calibration and held-out loss (see minitron.data.corpus)
    calib_samples: int = 128           # calibration blocks
    heldout_samples: int = 16          # validation blocks that choose (split, depth block); as many report
    seq_len: int = 256                 # tokens per block
    val_fraction: float = 0.05         # validation share of the corpus' blocks (whole documents)
    batch_size: int = 8
    seq_agg: str = "mean"              # aggregation over the sequence: mean | l2 | max | var
    batch_agg: str = "l2"              # aggregation over samples: mean | l2 | max | var
    criterion: str = "activation"      # width scores: activation | magnitude | taylor | random
    # least-squares refit of the trimmed o_proj / down_proj toward the teacher's residual stream (minitron.prune.refit)
    refit: str = "none"                # none | mlp | attn+mlp (see docs/pruning.md: helps before distillation)
    refit_samples: int = 64            # calibration blocks it reads (the first of the calibration sample)
    refit_ridge: float = 0.1           # pull toward the trimmed weights, relative to mean diag(X^T X)
    scores: str | None = None          # reuse a scores.safetensors (no calibration)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    data_dir: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False


def measure(model, tokenizer, calib: torch.Tensor, select: torch.Tensor, cfg: PruneConfig, n_drop: int
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """The scores cfg.target needs (see importance.score_model): LM-loss / task block scores only when
    layers are dropped by that metric."""
    metric, t = cfg.target.layer_metric, cfg.target
    need_lm = n_drop > 0 and not t.drop_layers and metric == "lm-loss"
    need_task = n_drop > 0 and not t.drop_layers and metric.startswith("task:")
    icfg = ImportanceConfig(cfg.seq_agg, cfg.batch_agg, cfg.batch_size, lm_loss_layers=need_lm,
                            lm_loss_block_sizes=[n_drop] if need_lm and t.contiguous else [],
                            bi_block_sizes=[1, n_drop] if n_drop > 0 and t.contiguous and not t.drop_layers else [1])
    task = ((tokenizer, metric[len("task:"):], [1, n_drop] if t.contiguous else [1], cfg.data_dir)
            if need_task else None)
    return score_model(model, calib, select, icfg, cfg.criterion, cfg.seed, task)


def _trim(model: nn.Module, plan: PrunePlan, train: torch.Tensor, report: torch.Tensor, cfg: PruneConfig
          ) -> tuple[nn.Module, dict]:
    """Apply the plan; with cfg.refit, to a copy whose output projections are then refit toward `model` (the
    teacher) on calibration blocks of `train`. Returns (the pruned model, what the refit did)."""
    rcfg = RefitConfig(cfg.refit, cfg.refit_samples, cfg.refit_ridge, cfg.batch_size)
    if rcfg.parts == "none" or not refit_supported(model):
        why = "off" if rcfg.parts == "none" else f"{arch.get_arch(model).family}: sub-layer outputs are not added as they are"
        return apply_plan(model, plan), {"parts": "none", "why": why}
    student = pruned_copy(model, plan)
    trimmed = lm_loss(student, report, cfg.batch_size)
    rows = refit(student, model, plan.kept_layers, plan.hidden,
                 calibration_sample(train, cfg.calib_samples, cfg.seed)[:cfg.refit_samples], rcfg)
    print(f"[minitron] refit {rcfg.parts} on {min(cfg.refit_samples, cfg.calib_samples)} calibration blocks: "
          f"held-out loss after trimming {trimmed:.4f}")
    return student, {"parts": rcfg.parts, "samples": rcfg.samples, "ridge": rcfg.ridge,
                     "heldout_loss_trimmed": trimmed, "projections": rows}


def prune(cfg: PruneConfig) -> Path:
    """Prune cfg.model to cfg.target and save a plain HF model dir (+ plan, scores, plot) at cfg.out.

    Held-out hygiene: the budget split and the LM-loss depth block are chosen on the selection blocks,
    the loss after pruning is reported on the disjoint report blocks (minitron.data.corpus)."""
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    if cfg.criterion not in CRITERIA:
        raise ValueError(f"criterion {cfg.criterion!r} unknown; choose from {', '.join(CRITERIA)}")
    RefitConfig(cfg.refit, cfg.refit_samples, cfg.refit_ridge).check()  # before any model is loaded
    config = source_config(cfg.model, cfg.trust_remote_code)  # architecture and target checked before loading
    src = arch.dims_of(config)
    n_drop = src.layers - resolve_dims(config, cfg.target).layers
    resolve_source(cfg.calib_data, cfg.data_dir)  # a missing corpus fails before loading too
    saved = load_scores(Path(cfg.scores)) if cfg.scores else None
    if saved is not None:
        check_scores_meta(saved[1], cfg.scores, src, cfg.criterion)
        need = layer_score_name(cfg.target, n_drop, scattered_kinds=cfg.target.depth_types is not None)
        if need is not None and need not in saved[0]:  # before the model loads and the widths are measured
            raise missing_layer_scores(need, cfg.target, n_drop)
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code)

    splits = load_splits(cfg.calib_data, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.seed, data_root=cfg.data_dir,
                         lazy=True)  # the token store: only the calibration and held-out blocks are read
    select = selection_blocks(splits.validation, cfg.heldout_samples)
    report = report_blocks(splits.validation, cfg.heldout_samples)
    if saved is not None:
        scores, meta = data_free_widths(model, saved[0], cfg.criterion, cfg.seed), {**saved[1], "criterion": cfg.criterion}
    else:
        scores, meta = measure(model, tokenizer, calibration_sample(splits.train, cfg.calib_samples, cfg.seed),
                               select, cfg, n_drop)
    target, splits_table = cfg.target, []
    if target.params is not None and target.split == "loss" and target.hidden is None and target.ffn is None:
        # measured per-layer widths probe around the uniform width, so the split is chosen with uniform widths first
        uniform_first = target.layer_widths and target.layer_norm == "measured"
        target, splits_table = choose_split(model, scores, select, replace(target, layer_widths=None)
                                            if uniform_first else target, cfg.batch_size)
        target = replace(target, layer_widths=cfg.target.layer_widths)
        print("[minitron] hidden/MLP split by held-out loss after pruning (selection blocks): " + ", ".join(
            f"{r['hidden']}/{r['ffn']} {r['loss_pruned']:.3f}" for r in splits_table))
    norms_table = []
    if target.layer_widths:  # the contribution normalization reads the output weights' norms
        scores = {**scores, **per_layer.output_norms(model)}
        if target.layer_norm == "measured":  # each layer's loss when it alone is narrowed (selection blocks)
            dims = resolve_dims(model.config, target)
            floors = per_layer.floor_units(dims, target.layer_floor, target.drop_parts, target.round_to)
            scores.update(per_layer.measure_curves(model, scores, select[:per_layer.MEASURE_BLOCKS], dims,
                                                   target.layer_widths, cfg.batch_size, floors))
        if target.layer_norm == "loss":
            target, norms_table = choose_layer_norm(model, scores, select, target, cfg.batch_size)
            print("[minitron] per-layer widths: held-out loss after pruning by normalization: " + ", ".join(
                f"{r['norm']} {r['loss_pruned']:.3f}" for r in norms_table))
    plan = make_plan(model.config, scores, target)
    print(f"[minitron] dims {src.to_dict()} -> {plan.target} dropped={plan.dropped_layers}")
    loss_before = lm_loss(model, report, cfg.batch_size)
    model, refit_metrics = _trim(model, plan, splits.train, report, cfg)
    loss_after = lm_loss(model, report, cfg.batch_size)
    metrics = {"params_before": plan.params_before, "params_after": plan.params_after,
               "heldout_loss_before": loss_before, "heldout_loss_after": loss_after,
               "heldout_tokens": int(report.numel()), "heldout_blocks": "report (disjoint from selection)",
               "selection_tokens": int(select.numel()), "criterion": meta.get("criterion", "activation"),
               "budget_splits": splits_table, "layer_norms": norms_table, "refit": refit_metrics}
    active = (f", active per token {plan.params_before['active'] / 1e6:.2f}M -> {plan.params_after['active'] / 1e6:.2f}M"
              if arch.is_moe(model) else "")
    print(f"[minitron] params {plan.params_before['total'] / 1e6:.2f}M -> {plan.params_after['total'] / 1e6:.2f}M "
          f"(non-embedding {plan.params_before['non_embedding'] / 1e6:.2f}M -> "
          f"{plan.params_after['non_embedding'] / 1e6:.2f}M{active}); held-out loss {loss_before:.4f} -> {loss_after:.4f}")

    with atomic_dir(out) as tmp:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        save_scores({k: v for k, v in scores.items() if k not in {*per_layer.OUT_NORM_KEYS.values(),
                                                                   *per_layer.MEASURED_KEYS.values()}}, tmp,
                    {**meta, "model": cfg.model})
        plot_importance(scores, tmp / "importance.png", title=f"importance of {cfg.model}")
        plot_blocks(scores, tmp / "blocks.png")
        if plan.per_layer:
            plot_layer_widths(plan.per_layer, plan.target, tmp / "layer_widths.png")
        (tmp / "prune_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        (tmp / "prune_metrics.json").write_text(json.dumps(metrics, indent=1))
    return out
