"""Minitron activation importance from a calibration set: forward passes only, hooks, fp32 statistics.

Width axes (per layer unless noted; in hybrid models a layer without the part has a zero row):
  heads    [L, H]  input of o_proj viewed per head; per-channel score, then L2 over head_dim
  neurons  [L, F]  input of down_proj (act(gate) * up)
  channels [C]     outputs of each layer's pre-attention and pre-MLP norms (hybrid: its one pre-norm), scored
                   per norm, summed
  mamba_channels / mamba_heads / mamba_head_dim   Mamba2 mixers: the x segment of in_proj (minitron.arch.mamba)
Each activation x [B, T, C] is aggregated over the sequence (per sample; padding masked), then over the
batch. Paper default: mean of |x| over the sequence, L2 over the batch.
Under torchrun each rank scores its share of the calibration batches; the sums are all-reduced.
Depth:
  layer_bi / block_bi.{n}   Block Importance 1 - cos(h_in, h_out) of a block of n layers, token mean (the
                            sizes ImportanceConfig.bi_block_sizes asks for; a size n holds n layers' states)
  layer_lm_loss / block_lm_loss.{n}  increase of held-out LM loss when the block is removed
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from minitron.arch import adapters as arch
from minitron.arch import ranks
from minitron.arch.models import lm_loss

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
    # contiguous block sizes n whose Block Importance (block_bi.n) is measured; 1 (layer_bi) always is, and so
    # is every LM-loss size measured (the block plots show both). Each size n holds n layers' hidden states.
    bi_block_sizes: list[int] = field(default_factory=lambda: [1])

    def check(self) -> None:
        if self.seq_agg not in SEQ_AGGS:
            raise ValueError(f"seq_agg {self.seq_agg!r} unknown; choose from {SEQ_AGGS}")
        if self.batch_agg not in BATCH_AGGS:
            raise ValueError(f"batch_agg {self.batch_agg!r} unknown; choose from {BATCH_AGGS}")


def seq_aggregate(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Per-sample aggregation over valid tokens: x [B, T, C] (fp32), mask [B, T] bool (or [B, T, C]: a mask per
    channel, e.g. the tokens routed to each expert) -> [B, C]."""
    m = (mask if mask.dim() == 3 else mask[..., None]).to(x.dtype)  # [B, T, 1] or [B, T, C]
    n = m.sum(1).clamp_min(1.0)  # [B, 1] or [B, C]
    if how == "mean":
        return (x.abs() * m).sum(1) / n
    if how == "l2":
        return (x.square() * m).sum(1).sqrt()
    if how == "max":
        return (x.abs() * m).amax(1)
    mean = (x * m).sum(1) / n  # var
    return ((x - mean[:, None]).square() * m).sum(1) / n


class BatchStat:
    """Running per-channel statistics over samples of s [B, C] (fp32), reduced by a batch aggregation.
    With `size` the sums start at zero (and max at -inf) on `device`, so a process that saw no sample can
    still take part in all_reduce."""

    def __init__(self, size: int | None = None, device: torch.device | str | None = None) -> None:
        self.sum = self.sumsq = self.max = None
        self.n = 0
        if size is not None:
            self.sum, self.sumsq = torch.zeros(size, device=device), torch.zeros(size, device=device)
            self.max = torch.full((size,), -torch.inf, device=device)

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


class BlockBI:
    """Running Block Importance sums, one depth at a time: sum over valid tokens of 1 - cos(h_i, h_{i+n}) for
    every block size n in `sizes`, where h_i [B, T, C] is the input of layer i (h_L the last output).

    Holds only the unit-normalized states of the last max(sizes) depths, [N, C] in the model dtype each
    (N = B*T tokens of the current batch), never all L+1 of them."""

    def __init__(self, n_layers: int, sizes: list[int], device: torch.device | str | None = None) -> None:
        self.sizes = sorted({n for n in sizes if 0 < n <= n_layers})
        self.sums = {n: torch.zeros(n_layers - n + 1, dtype=torch.float64, device=device) for n in self.sizes}
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.recent: dict[int, torch.Tensor] = {}  # depth -> unit states [N, C]
        self.mask: torch.Tensor | None = None  # [N] bool: valid tokens of the current batch

    def start(self, mask: torch.Tensor) -> None:
        """A new batch with valid tokens mask [B, T] (bool)."""
        self.recent, self.mask = {}, mask.flatten()
        self.tokens += self.mask.sum()

    def add(self, depth: int, hidden: torch.Tensor) -> None:
        """hidden [B, T, C] at depth (0 = input of layer 0): adds the blocks ending here."""
        unit = torch.nn.functional.normalize(hidden.detach().flatten(0, 1).float(), dim=-1)  # [N, C] fp32
        for n in self.sizes:
            if depth - n in self.recent:
                cos = torch.linalg.vecdot(self.recent[depth - n].float(), unit)  # [N]
                self.sums[n][depth - n] += torch.where(self.mask, 1.0 - cos, 0.0).double().sum()  # no host sync
        self.recent[depth] = unit.to(hidden.dtype)
        self.recent.pop(depth - (self.sizes[-1] if self.sizes else 0), None)

    def result(self) -> dict[int, torch.Tensor]:
        """{n: [L-n+1]} token means of 1 - cos (fp32, on the CPU)."""
        return {n: (s / self.tokens).float().cpu() for n, s in self.sums.items()}


class _Collector:
    """Forward hooks writing BatchStats and Block Importance sums for one model; `start(mask)` before each
    forward."""

    def __init__(self, model, cfg: ImportanceConfig, bi_sizes: list[int]):
        self.cfg, self.mask, self.handles = cfg, None, []
        layers = arch.decoder_layers(model)
        dims, device = arch.dims_of(model.config), next(model.parameters()).device
        parts = arch.layer_parts(model)
        # one statistic per layer that has the part (None where it has not: hybrid layers hold one mixer)
        self.attn = [BatchStat(dims.heads * dims.head_dim, device) if "attn" in p else None for p in parts]
        self.mlp = [] if arch.is_moe(model) else [BatchStat(dims.ffn, device) if "mlp" in p else None for p in parts]
        inner = dims.mamba_heads * dims.mamba_head_dim
        self.mamba = [BatchStat(inner, device) if "mamba" in p else None for p in parts]
        taps = [arch.channel_taps(model, layer) for layer in layers]
        self.norms = [BatchStat(dims.hidden, device) for t in taps for _ in t]
        self.bi = BlockBI(len(layers), bi_sizes, device)
        self.moe = None
        if arch.is_moe(model):  # expert, expert-neuron, shared-expert and router statistics
            from minitron.arch.moe import MoeCollector

            self.moe = MoeCollector(model, lambda n: BatchStat(n, device),
                                    lambda x, m: seq_aggregate(x, m, cfg.seq_agg), cfg.seq_agg, device)
        norms = iter(self.norms)
        for i, layer in enumerate(layers):
            if self.attn[i] is not None:
                self._pre(arch.attn_output(model, layer), self.attn[i])
            if self.mlp and self.mlp[i] is not None:
                self._pre(arch.mlp_output(model, layer), self.mlp[i])
            if self.mamba[i] is not None:  # the x segment of in_proj's output (ModelOpt's Mamba estimate)
                from minitron.arch.mamba import register_x_hook

                self.handles.append(register_x_hook(model, layer, inner, lambda x, s=self.mamba[i]: self._add(s, x)))
            for module, where in taps[i]:
                stat = next(norms)
                self.handles.append(module.register_forward_hook(self._norm_hook(stat)) if where == "output" else
                                    module.register_forward_pre_hook(self._input_hook(stat), with_kwargs=True))
            self.handles.append(layer.register_forward_pre_hook(self._layer_in(i), with_kwargs=True))
        self.handles.append(layers[-1].register_forward_hook(self._layer_out(len(layers))))

    def start(self, mask: torch.Tensor) -> None:
        """Valid tokens [B, T] (bool) of the next forward."""
        self.mask = mask
        self.bi.start(mask)
        if self.moe is not None:
            self.moe.start(mask)

    def _add(self, stat: BatchStat, x: torch.Tensor) -> None:
        stat.add(seq_aggregate(x.float(), self.mask, self.cfg.seq_agg))

    def _pre(self, module, stat):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self._add(stat, args[0])))

    def _norm_hook(self, stat):
        return lambda m, args, out: self._add(stat, out)

    def _input_hook(self, stat):
        def hook(m, args, kwargs):
            self._add(stat, args[0] if args else kwargs["hidden_states"])
        return hook

    def _layer_in(self, i):
        def hook(m, args, kwargs):
            self.bi.add(i, args[0] if args else kwargs["hidden_states"])
        return hook

    def _layer_out(self, i):
        def hook(m, args, out):
            self.bi.add(i, arch.layer_output(out))
        return hook

    def all_reduce(self) -> None:
        """Sum (max for max) every statistic over the ranks of torch.distributed, on the model's device."""
        import torch.distributed as dist

        stats = [s for s in (*self.attn, *self.mlp, *self.mamba, *self.norms, *(self.moe.stats() if self.moe else []))
                 if s is not None]
        counts = torch.tensor([float(s.n) for s in stats], dtype=torch.float64, device=self.bi.tokens.device)
        _all_reduce_flat([t for s in stats for t in (s.sum, s.sumsq)], dist.ReduceOp.SUM)
        _all_reduce_flat([s.max for s in stats], dist.ReduceOp.MAX)
        _all_reduce_flat([counts, self.bi.tokens, *self.bi.sums.values(), *(self.moe.sums() if self.moe else [])],
                         dist.ReduceOp.SUM)
        for s, n in zip(stats, counts.tolist(), strict=True):
            s.n = int(n)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.moe is not None:
            self.moe.remove()


def _per_layer(stats: list[BatchStat | None], how: str, size: int) -> torch.Tensor:
    """One score row per layer -> [L, size]; zeros for layers without the part (hybrid layers)."""
    rows = [s.result(how) if s is not None else None for s in stats]
    like = next((r for r in rows if r is not None), None)
    zero = torch.zeros(size) if like is None else torch.zeros_like(like)
    return torch.stack([r if r is not None else zero for r in rows])  # [L, size]


def _all_reduce_flat(tensors: list[torch.Tensor], op) -> None:
    """One all_reduce over tensors of one dtype and device, concatenated; results written back in place."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum of numels]
    dist.all_reduce(flat, op=op)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))


def bi_sizes_of(cfg: ImportanceConfig) -> list[int]:
    """Block sizes whose BI a pass measures: 1, cfg.bi_block_sizes and the LM-loss sizes it measures."""
    return sorted({1, *cfg.bi_block_sizes, *(cfg.lm_loss_block_sizes if cfg.lm_loss_layers else [])})


@torch.no_grad()
def compute_importance(model, calib: torch.Tensor, cfg: ImportanceConfig | None = None,
                       heldout: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
    """Score every prunable unit of `model` on calibration blocks calib [N, T].

    attention_mask [N, T] (optional): 0 marks padding, which never enters the statistics.
    heldout [M, T]: blocks for the LM-loss layer metric (cfg.lm_loss_layers). Returns name -> fp32 tensor.
    Block Importance is measured for the block sizes bi_sizes_of(cfg) (block_bi.n [L-n+1]; layer_bi = n 1).
    Under torch.distributed (torchrun), rank r scores batches r, r + world, ... of calib and the statistics
    are summed over ranks before the scores are formed: every rank returns the scores of all of calib.
    """
    cfg = cfg or ImportanceConfig()
    cfg.check()
    model.eval()
    dims = arch.dims_of(model.config)
    device = next(model.parameters()).device
    rank, n_ranks = ranks.rank(), ranks.size()
    col = _Collector(model, cfg, bi_sizes_of(cfg))
    try:
        starts = range(rank * cfg.batch_size, calib.shape[0], n_ranks * cfg.batch_size)
        for start in tqdm(starts, desc="importance", unit="batch", disable=rank != 0):
            ids = calib[start:start + cfg.batch_size].to(device)  # [B, T]
            mask = (torch.ones_like(ids) if attention_mask is None
                    else attention_mask[start:start + cfg.batch_size].to(device))
            col.start(mask.bool())
            arch.backbone(model)(input_ids=ids, attention_mask=mask, use_cache=False)  # hooks only: no logits
        col.bi.recent = {}
        if n_ranks > 1:
            col.all_reduce()
    finally:
        col.remove()
    how = cfg.batch_agg
    heads = _per_layer(col.attn, how, dims.heads * dims.head_dim)
    heads = heads.view(dims.layers, dims.heads, dims.head_dim).norm(dim=-1)  # [L, H*D] -> [L, H, D] -> [L, H]
    scores = {
        "heads": heads.cpu(),  # [L, H]
        "kv_groups": (heads.view(dims.layers, dims.kv_heads, -1).norm(dim=-1).cpu()  # [L, K, H/K] -> [L, K]
                      if dims.kv_heads else torch.zeros(dims.layers, 0)),  # attention-free (Mamba2)
        "channels": torch.stack([s.result(how) for s in col.norms]).sum(0).cpu(),  # [taps, C] -> [C]
    }
    if col.moe is not None:  # experts [L, E], neurons [L, E*F], router_tokens / router_prob [L, E], shared_neurons
        scores.update(col.moe.scores(how))
    else:
        scores["neurons"] = _per_layer(col.mlp, how, dims.ffn).cpu()  # [L, F]
    if dims.mamba_heads:  # mamba_channels [L, H*P], mamba_heads [L, H], mamba_head_dim [L, P]
        from minitron.arch.mamba import mamba_scores

        inner = _per_layer(col.mamba, how, dims.mamba_heads * dims.mamba_head_dim)
        scores.update({k: v.cpu() for k, v in mamba_scores(inner, dims.mamba_heads).items()})
    for n, s in col.bi.result().items():
        scores[f"block_bi.{n}"] = s
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
    from minitron.eval.harness import NORM_TASKS, score_task
    from minitron.eval.tasks import canonical_name, load_task

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
    if "router_tokens" in scores:  # MoE: share of tokens routed to each expert, per layer
        summary["router_tokens"] = [[round(float(x), 6) for x in row] for row in scores["router_tokens"]]
        summary["experts_per_layer_ranking"] = scores["experts"].argsort(dim=1, descending=True).tolist()
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


WIDTH_AXES = ("heads", "kv_groups", "neurons", "channels", "experts", "shared_neurons",  # MoE only: the last two
              "mamba_channels", "mamba_heads", "mamba_head_dim")  # models with Mamba layers only
CRITERIA = ("activation", "magnitude", "taylor", "random")


def random_scores(scores: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The random-importance baseline: width scores replaced by seeded uniform noise of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(scores[k].shape, generator=gen) for k in WIDTH_AXES if k in scores}


def score_model(model, calib: torch.Tensor, select: torch.Tensor, cfg: ImportanceConfig, criterion: str = "activation",
                seed: int = 0, task: tuple | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every score a plan can need, by one criterion: the Minitron activation pass (width axes, Block
    Importance, LM-loss blocks per cfg on the selection blocks select [M, T]); for magnitude / taylor /
    random the width axes are replaced by that criterion's (depth scores stay activation-based);
    task = (tokenizer, task name, block sizes, data_root) adds the downstream-accuracy depth scores.
    Returns (scores, meta); meta records the criterion, so a saved file says what made it."""
    from minitron.prune.criteria import taylor_scores

    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} unknown; choose from {', '.join(CRITERIA)}")
    if task is not None:  # the block plots show BI beside the task drop of each size
        cfg = replace(cfg, bi_block_sizes=sorted({*cfg.bi_block_sizes, *task[2]}))
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
    from minitron.prune.criteria import magnitude_scores

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
