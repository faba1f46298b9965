"""Minitron activation importance from a calibration set: forward passes only, hooks, fp32 statistics.

Width axes (per layer unless noted):
  heads    [L, H]  input of o_proj viewed per head; per-channel score, then L2 over head_dim
  neurons  [L, F]  input of down_proj (act(gate) * up)
  channels [C]     outputs of each layer's pre-attention and pre-MLP norms, scored per norm, summed
Each activation x [B, T, C] is aggregated over the sequence (per sample; padding masked), then over the
batch. Paper default: mean of |x| over the sequence, L2 over the batch.
Depth:
  layer_bi / block_bi.{n}   Block Importance 1 - cos(h_in, h_out) of a block of n layers, token mean
  layer_lm_loss / block_lm_loss.{n}  increase of held-out LM loss when the block is removed
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from minitron import arch
from minitron.models import lm_loss

SEQ_AGGS = ("mean", "l2", "max", "var")
BATCH_AGGS = ("mean", "l2", "max", "var")
LAYER_METRICS = ("bi", "lm-loss")


@dataclass
class ImportanceConfig:
    """How importance is measured."""

    seq_agg: str = "mean"          # aggregation over the sequence: mean | l2 | max | var
    batch_agg: str = "l2"          # aggregation over samples: mean | l2 | max | var
    batch_size: int = 8            # calibration forward batch
    lm_loss_layers: bool = False   # also score layer removal by held-out LM loss (one forward per candidate)
    lm_loss_block_sizes: list[int] = field(default_factory=list)  # contiguous block sizes for LM loss

    def check(self) -> None:
        if self.seq_agg not in SEQ_AGGS:
            raise ValueError(f"seq_agg {self.seq_agg!r} unknown; choose from {SEQ_AGGS}")
        if self.batch_agg not in BATCH_AGGS:
            raise ValueError(f"batch_agg {self.batch_agg!r} unknown; choose from {BATCH_AGGS}")


def seq_aggregate(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Per-sample aggregation over valid tokens: x [B, T, C] (fp32), mask [B, T] bool -> [B, C]."""
    m = mask[..., None].to(x.dtype)  # [B, T, 1]
    n = m.sum(1).clamp_min(1.0)  # [B, 1]
    if how == "mean":
        return (x.abs() * m).sum(1) / n
    if how == "l2":
        return (x.square() * m).sum(1).sqrt()
    if how == "max":
        return (x.abs() * m).amax(1)
    mean = (x * m).sum(1) / n  # var
    return ((x - mean[:, None]).square() * m).sum(1) / n


class BatchStat:
    """Running per-channel statistics over samples of s [B, C] (fp32), reduced by a batch aggregation."""

    def __init__(self) -> None:
        self.sum = self.sumsq = self.max = None
        self.n = 0

    def add(self, s: torch.Tensor) -> None:
        s = s.detach().float()
        if self.sum is None:
            self.sum, self.sumsq, self.max = s.sum(0), s.square().sum(0), s.amax(0)
        else:
            self.sum += s.sum(0)
            self.sumsq += s.square().sum(0)
            self.max = torch.maximum(self.max, s.amax(0))
        self.n += s.shape[0]

    def result(self, how: str) -> torch.Tensor:
        if how == "l2":
            return self.sumsq.sqrt()
        if how == "mean":
            return self.sum / self.n
        if how == "max":
            return self.max
        return self.sumsq / self.n - (self.sum / self.n).square()  # var


class _Collector:
    """Forward hooks writing BatchStats for one model; `mask` is set before each forward."""

    def __init__(self, model, cfg: ImportanceConfig):
        self.cfg, self.mask, self.handles = cfg, None, []
        layers = arch.decoder_layers(model)
        self.attn = [BatchStat() for _ in layers]
        self.mlp = [BatchStat() for _ in layers]
        self.norms = [BatchStat() for _ in range(2 * len(layers))]
        self.hidden: list[torch.Tensor | None] = [None] * (len(layers) + 1)  # inputs of each layer + last output
        for i, layer in enumerate(layers):
            self._pre(arch.attn_output(model, layer), self.attn[i])
            self._pre(arch.mlp_output(model, layer), self.mlp[i])
            for j, norm in enumerate(arch.channel_norms(model, layer)):
                self.handles.append(norm.register_forward_hook(self._norm_hook(self.norms[2 * i + j])))
            self.handles.append(layer.register_forward_pre_hook(self._layer_in(i), with_kwargs=True))
        self.handles.append(layers[-1].register_forward_hook(self._layer_out(len(layers))))

    def _add(self, stat: BatchStat, x: torch.Tensor) -> None:
        stat.add(seq_aggregate(x.float(), self.mask, self.cfg.seq_agg))

    def _pre(self, module, stat):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self._add(stat, args[0])))

    def _norm_hook(self, stat):
        return lambda m, args, out: self._add(stat, out)

    def _layer_in(self, i):
        def hook(m, args, kwargs):
            self.hidden[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _layer_out(self, i):
        def hook(m, args, out):
            self.hidden[i] = arch.layer_output(out)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def block_importance(hidden: list[torch.Tensor], mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Summed (1 - cos) over valid tokens for every contiguous block.

    hidden: L+1 tensors [B, T, C] (input of each layer, then the last layer's output); mask [B, T].
    Returns {n: [L-n+1]} sums over tokens (divide by the token count for the mean).
    """
    L = len(hidden) - 1
    unit = torch.stack([torch.nn.functional.normalize(h.float().flatten(0, 1)[mask.flatten()], dim=-1)
                        for h in hidden])  # [L+1, N_valid, C]
    unit = unit.flatten(1)  # [L+1, N_valid*C]
    gram = unit @ unit.T  # [L+1, L+1]: cosines of every pair of depths, summed over tokens
    n_tokens = mask.sum().to(gram.dtype)
    return {n: n_tokens - torch.diagonal(gram, offset=n) for n in range(1, L + 1)}


@torch.no_grad()
def compute_importance(model, calib: torch.Tensor, cfg: ImportanceConfig | None = None,
                       heldout: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
    """Score every prunable unit of `model` on calibration blocks calib [N, T].

    attention_mask [N, T] (optional): 0 marks padding, which never enters the statistics.
    heldout [M, T]: blocks for the LM-loss layer metric (cfg.lm_loss_layers). Returns name -> fp32 tensor.
    """
    cfg = cfg or ImportanceConfig()
    cfg.check()
    model.eval()
    dims = arch.dims_of(model.config)
    device = next(model.parameters()).device
    col = _Collector(model, cfg)
    bi_sum = {n: torch.zeros(dims.layers - n + 1, dtype=torch.float64) for n in range(1, dims.layers + 1)}
    tokens = 0
    try:
        for start in tqdm(range(0, calib.shape[0], cfg.batch_size), desc="importance", unit="batch"):
            ids = calib[start:start + cfg.batch_size].to(device)  # [B, T]
            mask = (torch.ones_like(ids) if attention_mask is None
                    else attention_mask[start:start + cfg.batch_size].to(device))
            col.mask = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            for n, s in block_importance(col.hidden, col.mask).items():
                bi_sum[n] += s.double().cpu()
            tokens += int(col.mask.sum())
            col.hidden = [None] * len(col.hidden)
    finally:
        col.remove()
    how = cfg.batch_agg
    heads = torch.stack([s.result(how).view(dims.heads, dims.head_dim).norm(dim=-1)  # [H*D] -> [H, D] -> [H]
                         for s in col.attn])
    scores = {
        "heads": heads.cpu(),  # [L, H]
        "kv_groups": heads.view(dims.layers, dims.kv_heads, -1).norm(dim=-1).cpu(),  # [L, K, H/K] -> [L, K]
        "neurons": torch.stack([s.result(how) for s in col.mlp]).cpu(),  # [L, F]
        "channels": torch.stack([s.result(how) for s in col.norms]).sum(0).cpu(),  # [2L, C] -> [C]
    }
    for n, s in bi_sum.items():
        scores[f"block_bi.{n}"] = (s / tokens).float()
    scores["layer_bi"] = scores["block_bi.1"]
    if cfg.lm_loss_layers:
        if heldout is None:
            raise ValueError("the LM-loss layer metric needs held-out blocks")
        scores.update(layer_lm_loss(model, heldout, sorted({1, *cfg.lm_loss_block_sizes}), cfg.batch_size))
    return {k: v.float() for k, v in scores.items()}


@torch.no_grad()
def layer_lm_loss(model, heldout: torch.Tensor, block_sizes: list[int], batch_size: int = 8
                  ) -> dict[str, torch.Tensor]:
    """Held-out LM-loss increase when each contiguous block of n layers is removed -> {block_lm_loss.n: [L-n+1]}."""
    L = arch.dims_of(model.config).layers
    block_sizes = sorted(set(block_sizes))
    base = lm_loss(model, heldout, batch_size)
    out = {"lm_loss_base": torch.tensor([base])}
    todo = [(n, i) for n in block_sizes if 0 < n < L for i in range(L - n + 1)]
    values: dict[int, list[float]] = {n: [] for n in block_sizes if 0 < n < L}
    for n, i in tqdm(todo, desc="layer LM loss", unit="block"):
        with arch.without_layers(model, list(range(i, i + n))):
            values[n].append(lm_loss(model, heldout, batch_size) - base)
    for n, v in values.items():
        out[f"block_lm_loss.{n}"] = torch.tensor(v)
    if 1 in values:
        out["layer_lm_loss"] = out["block_lm_loss.1"]
    return out


def layer_task_accuracy(model, tokenizer, task_name: str, block_sizes: list[int], limit: int = 200,
                        batch_size: int = 8, data_root=None) -> dict[str, torch.Tensor]:
    """Downstream-accuracy drop when each contiguous block of n layers is removed (second paper, Figs. 8-9)
    -> {block_task.n: [L-n+1]} (base accuracy minus accuracy without the block; lower = less needed)."""
    from minitron.evaluate import NORM_TASKS, score_task
    from minitron.tasks import canonical_name, load_task

    task = load_task(task_name, data_root, limit)
    metric = "acc_norm" if canonical_name(task_name) in NORM_TASKS else "acc"
    L = arch.dims_of(model.config).layers
    base = score_task(model, tokenizer, task, batch_size, progress=False)[metric]
    out = {"task_base": torch.tensor([base])}
    for n in sorted(set(block_sizes)):
        if not 0 < n < L:
            continue
        drops = []
        for i in tqdm(range(L - n + 1), desc=f"{task_name} without {n} layer(s)", unit="block"):
            with arch.without_layers(model, list(range(i, i + n))):
                drops.append(base - score_task(model, tokenizer, task, batch_size, progress=False)[metric])
        out[f"block_task.{n}"] = torch.tensor(drops)
    if "block_task.1" in out:
        out["layer_task"] = out["block_task.1"].clone()
    return out


def save_scores(scores: dict[str, torch.Tensor], out_dir: Path, meta: dict) -> Path:
    """Write scores.safetensors (tensors + meta) and scores.json (a readable summary)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scores.safetensors"
    tensors = {k: v.detach().float().contiguous().clone() for k, v in scores.items()}  # no shared storage
    save_file(tensors, str(path), metadata={"minitron": json.dumps(meta)})
    summary = {"meta": meta, "shapes": {k: list(v.shape) for k, v in scores.items()}}
    for key in ("layer_bi", "layer_lm_loss", "lm_loss_base"):
        if key in scores:
            summary[key] = [round(float(x), 6) for x in scores[key]]
    summary["heads_per_layer_mean"] = [round(float(x), 6) for x in scores["heads"].mean(1)]
    summary["neurons_per_layer_mean"] = [round(float(x), 6) for x in scores["neurons"].mean(1)]
    summary["channels_top10"] = scores["channels"].topk(min(10, scores["channels"].numel())).indices.tolist()
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=1))
    return path


def load_scores(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a scores.safetensors written by save_scores -> (scores, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "scores.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no scores at {path}; pass the scores.safetensors of an earlier prune run")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("minitron", "{}"))
        return load_file(str(path)), meta
    except Exception as e:  # noqa: BLE001 - corrupt file
        raise ValueError(f"{path} is not a readable scores file ({e}); recompute it (drop --scores)") from e


def config_meta(cfg: ImportanceConfig, calib: torch.Tensor, dims: arch.Dims) -> dict:
    """What a scores file records about how it was made."""
    return {"importance": asdict(cfg), "calib_samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
            "dims": dims.to_dict()}


WIDTH_AXES = ("heads", "kv_groups", "neurons", "channels")
CRITERIA = ("activation", "magnitude", "taylor", "random")


def random_scores(scores: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The random-importance baseline: width scores replaced by seeded uniform noise of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(scores[k].shape, generator=gen) for k in WIDTH_AXES}


def score_model(model, calib: torch.Tensor, select: torch.Tensor, cfg: ImportanceConfig, criterion: str = "activation",
                seed: int = 0, task: tuple | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every score a plan can need, by one criterion: the Minitron activation pass (width axes, Block
    Importance, LM-loss blocks per cfg on the selection blocks select [M, T]); for magnitude / taylor /
    random the width axes are replaced by that criterion's (depth scores stay activation-based);
    task = (tokenizer, task name, block sizes, data_root) adds the downstream-accuracy depth scores.
    Returns (scores, meta); meta records the criterion, so a saved file says what made it."""
    from minitron.criteria import taylor_scores

    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} unknown; choose from {', '.join(CRITERIA)}")
    scores = compute_importance(model, calib, cfg, heldout=select)
    if criterion == "taylor":
        scores.update(taylor_scores(model, calib, cfg.batch_size))
    else:
        scores = data_free_widths(model, scores, criterion, seed)
    if task is not None:
        tokenizer, name, sizes, data_root = task
        scores.update(layer_task_accuracy(model, tokenizer, name, sizes, batch_size=cfg.batch_size, data_root=data_root))
    meta = {**config_meta(cfg, calib, arch.dims_of(model.config)), "criterion": criterion}
    return scores, meta


def data_free_widths(model, scores: dict[str, torch.Tensor], criterion: str, seed: int = 0) -> dict:
    """Width axes of a data-free criterion (magnitude: the weights; random: the seed) in place of those in
    `scores`; depth scores kept. activation / taylor: scores unchanged."""
    from minitron.criteria import magnitude_scores

    if criterion == "magnitude":
        return {**scores, **magnitude_scores(model)}
    if criterion == "random":
        return {**scores, **random_scores(scores, seed)}
    return scores


def check_scores_meta(meta: dict, path, dims: arch.Dims, criterion: str) -> None:
    """Refuse a saved scores file measured on another model, or by another criterion than asked for
    (magnitude and random widths are data-free: they are recomputed over any saved scores)."""
    if meta.get("dims") and meta["dims"] != dims.to_dict():
        raise ValueError(f"{path} was measured on a model of dims {meta['dims']}, not this model's "
                         f"{dims.to_dict()}; drop --scores to recompute")
    made_by = meta.get("criterion", "activation")
    if made_by != criterion and criterion not in ("magnitude", "random"):
        raise ValueError(f"{path} holds {made_by} scores but the criterion asked for is {criterion}; drop --scores "
                         f"to recompute, or pass --criterion {made_by}")
