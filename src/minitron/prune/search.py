"""Lightweight architecture search (Minitron paper 1, section 4): candidates within a parameter budget,
each pruned from the cached importance scores (no recalibration), ranked by validation loss.

    candidates(config, SearchConfig(params=70e6))        -> list of Dims within budget +- tolerance
    search(model, scores, validation, cfg, train=...)    -> table rows, best first (then skipped ones)
`train(model) -> model` is the short distillation of each candidate (minitron.distill); without it the
ranking is by the loss right after pruning, which the paper shows can differ from the ranking after
retraining.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minitron.arch import adapters as arch
from minitron.arch.models import lm_loss
from minitron.prune.importance import layer_lm_loss
from minitron.prune.plan import PlanError, Target, config_with_dims, count_params, make_plan, parse_count
from minitron.prune.trim import pruned_copy, pruned_in_place


@dataclass
class SearchConfig:
    """Search space and budget."""

    enabled: bool = False               # as a pipeline stage: pick the target by search
    params: float | str = 0.0           # total parameter budget (e.g. 70M)
    train_tokens: int = 0               # short distillation per candidate (0: rank by loss after pruning)
    tolerance: float = 0.05             # keep candidates within budget * (1 +- tolerance)
    axes: list[str] = field(default_factory=lambda: ["hidden", "ffn", "heads", "layers"])  # free axes
    width_fractions: list[float] = field(default_factory=lambda: [0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125,
                                                                   0.875, 0.9375, 1.0])
    layer_fractions: list[float] = field(default_factory=lambda: [0.75, 0.875, 1.0])
    # MoE, with "experts" in axes: fractions of the experts kept per layer (never below top-k)
    expert_fractions: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    round_to: int = 8
    max_candidates: int = 6             # distill at most this many (best by loss after pruning)
    layer_metric: str = "lm-loss"       # how depth candidates choose their dropped block
    # > 0: each candidate's prefill / decode speed at batch 1 is measured against the teacher's (best of
    # speed_rounds), and only candidates at least this much faster to prefill are ranked first and trained
    speedup: float = 0.0
    speed_rounds: int = 3
    # the candidates that may be picked are timed again in this many rounds, each the teacher then the candidate,
    # and keep the median of the rounds' ratios (0: the first timing stands; search.retime_finalists)
    retime_rounds: int = 5
    # per-layer widths (Llama, Mistral, Qwen2): every candidate spreads its MLP neurons / KV groups over its layers
    # (minitron.prune.per_layer; scores compared by the mean normalization: measuring every candidate's layers would
    # cost too much) and the pick keeps it (the prune stage then spreads them by target.layer_norm, measured)
    layer_widths: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.params, str):
            self.params = parse_count(self.params)

    def check(self) -> None:
        unknown = set(self.axes) - {"hidden", "ffn", "heads", "layers", "experts", "mamba_heads"}
        if unknown:
            raise ValueError(f"search.axes: unknown axes {sorted(unknown)}; choose from hidden, ffn, heads, layers, "
                             "experts (MoE), mamba_heads (hybrid)")
        if self.params < 0 or not 0 <= self.tolerance < 1:
            raise ValueError("search.params must be >= 0 and search.tolerance in [0, 1)")
        if self.speedup < 0 or self.speed_rounds < 1 or self.retime_rounds < 0:
            raise ValueError("search.speedup must be >= 0 (0: speed not measured), search.speed_rounds >= 1 and "
                             "search.retime_rounds >= 0")


def _round(x: float, to: int) -> int:
    return max(to, int(round(x / to)) * to)


def candidates(config, cfg: SearchConfig) -> list[arch.Dims]:
    """Every combination of the free axes' grid values whose total params lie within the budget band."""
    src = arch.dims_of(config)
    group = src.heads // src.kv_heads if src.kv_heads else 0  # 0: attention-free (Mamba2)

    def grid(axis, source, fractions, step):
        return sorted({min(source, _round(source * f, step)) for f in fractions}) if axis in cfg.axes else [source]

    hidden = grid("hidden", src.hidden, cfg.width_fractions, cfg.round_to)
    ffn = grid("ffn", src.ffn, cfg.width_fractions, cfg.round_to)
    heads = ([src.kv_heads * g for g in range(1, group + 1)] if "heads" in cfg.axes and group else [src.heads])
    layers = sorted({max(1, round(src.layers * f)) for f in cfg.layer_fractions}) if "layers" in cfg.axes else [src.layers]
    if "experts" in cfg.axes and not src.experts:
        raise PlanError(f"search.axes names experts, but {config.model_type} is a dense model; drop it")
    experts = (sorted({max(src.top_k, round(src.experts * f)) for f in cfg.expert_fractions})
               if "experts" in cfg.axes else [src.experts])
    if "mamba_heads" in cfg.axes and not src.mamba_heads:
        raise PlanError(f"search.axes names mamba_heads, but {config.model_type} has no Mamba layers; drop it")
    a = arch.get_arch(config)
    groups = getattr(config, a.mamba.groups_key) if src.mamba_heads else 1
    mamba_heads = grid("mamba_heads", src.mamba_heads, cfg.width_fractions, groups)  # whole heads per B/C group
    lo, hi = cfg.params * (1 - cfg.tolerance), cfg.params * (1 + cfg.tolerance)
    out = []
    for h, f, nh, nl, ne, nm in itertools.product(hidden, ffn, heads, layers, experts, mamba_heads):
        if (a.hidden_divisible_by_heads and h % nh) or (a.hidden_is_q_width and h != nh * src.head_dim):
            continue  # transformers would refuse to load this config
        # MoE: top-k and shared width kept; Mamba: head dim kept
        dims = replace(src, hidden=h, ffn=f, heads=nh, layers=nl, experts=ne, mamba_heads=nm)
        if lo <= count_params(config_with_dims(config, dims))["total"] <= hi:
            out.append(dims)
    if not out:
        raise PlanError(f"no candidate within {cfg.params / 1e6:.4g}M +- {cfg.tolerance:.0%}; widen "
                        "search.tolerance, free more axes or change the grids")
    return out


def depth_block_sizes(config, cfg: SearchConfig) -> list[int]:
    """Numbers of layers the depth candidates of `cfg` drop (each a contiguous block): the Block Importance
    sizes an importance pass must measure for a search by layer_metric bi."""
    if not cfg.params:
        return []
    L = arch.dims_of(config).layers
    return sorted({L - d.layers for d in candidates(config, cfg) if d.layers < L})


def target_of(d: arch.Dims, cfg: SearchConfig) -> Target:
    """The Target that prunes to a candidate's dims (a search row's "dims"), MoE and Mamba axes included."""
    moe = dict(experts=d.experts, top_k=d.top_k, shared_ffn=d.shared_ffn or None) if d.experts else {}
    mamba = dict(mamba_heads=d.mamba_heads, mamba_head_dim=d.mamba_head_dim) if d.mamba_heads else {}
    return Target(hidden=d.hidden, ffn=d.ffn, heads=d.heads, kv_heads=d.kv_heads, layers=d.layers,
                  layer_metric=cfg.layer_metric, layer_widths=cfg.layer_widths, layer_norm="mean",
                  round_to=cfg.round_to, **moe, **mamba)


def search(model, scores: dict[str, torch.Tensor], validation: torch.Tensor, cfg: SearchConfig,
           train: Callable | None = None, batch_size: int = 8, rank_blocks: torch.Tensor | None = None
           ) -> list[dict]:
    """Prune every candidate from `scores`, keep the best cfg.max_candidates by loss after pruning,
    train each with `train` (if given) and rank by validation loss [N, T]. Returns rows, best first, then the
    candidates the planner refused (a "skipped" reason instead of losses; search.skipped_row)."""
    cfg.check()
    cands = candidates(model.config, cfg)
    L = arch.dims_of(model.config).layers
    missing = sorted({L - d.layers for d in cands if d.layers < L} - {int(k.split(".")[1]) for k in scores
                                                                       if k.startswith("block_lm_loss.")})
    no_bi = sorted(n for n in depth_block_sizes(model.config, cfg) if f"block_bi.{n}" not in scores)
    if no_bi and cfg.layer_metric == "bi":
        raise PlanError(f"scores hold no Block Importance for blocks of {no_bi} layers, which the search's depth "
                        "candidates drop: measure importance with ImportanceConfig(bi_block_sizes="
                        "search.depth_block_sizes(config, cfg)), or search with layer_metric lm-loss")
    if missing and cfg.layer_metric == "lm-loss":  # LM-loss of removing each contiguous block of the needed sizes
        scores = {**scores, **layer_lm_loss(model, validation if rank_blocks is None else rank_blocks, missing,
                                             batch_size)}
    if cfg.speedup:
        cands = near_speedup(model.config, cands, cfg.speedup)
    rows, skipped = [], []
    ref = speed_of(model, cfg.speed_rounds) if cfg.speedup else None
    for dims in tqdm(cands, desc="search: prune candidates", unit="cand"):
        try:
            plan = make_plan(model.config, scores, target_of(dims, cfg))
        except PlanError as e:  # e.g. a hybrid's best block to drop holds its only attention layer
            skipped.append(skipped_row(model.config, dims, str(e)))
            continue
        row = {"dims": dims.to_dict(), "params": plan.params_after, "dropped_layers": plan.dropped_layers}
        with pruned_in_place(model, plan) as pruned:
            row["loss_pruned"] = lm_loss(pruned, validation, batch_size)
            if ref is not None:
                row.update({f"{k}_speedup": v / ref[k] for k, v in speed_of(pruned, cfg.speed_rounds).items()})
        rows.append(row)
    if not rows:
        raise PlanError("every search candidate was refused by the planner: "
                        + "; ".join(sorted({r["skipped"] for r in skipped})))
    if ref is not None and cfg.retime_rounds:
        retime_finalists(model, scores, rows, cfg, cfg.max_candidates if train is not None else 1)
    if ref is not None and not any(fast_enough(r, cfg) for r in rows):
        best = max(r["prefill_speedup"] for r in rows)
        raise PlanError(f"no search candidate prefills {cfg.speedup:g}x faster than the teacher (the fastest: "
                        f"{best:.2f}x); lower search.params (smaller students are faster) or search.speedup")
    rows.sort(key=lambda r: (not fast_enough(r, cfg), r["loss_pruned"]))
    for row in tqdm([r for r in rows if fast_enough(r, cfg)][: cfg.max_candidates], desc="search: train candidates",
                    unit="cand"):
        if train is None:
            break
        plan = make_plan(model.config, scores, target_of(arch.Dims(**row["dims"]), cfg))
        student = train(pruned_copy(model, plan))
        row["loss_trained"] = lm_loss(student, validation, batch_size)
        del student
    key = "loss_trained" if train is not None else "loss_pruned"
    rows.sort(key=lambda r: (not fast_enough(r, cfg), key not in r, r.get(key, float("inf"))))
    mark_pareto(rows)
    return rows + skipped


SPEED_BAND = (0.9, 1.5)   # estimated speed-ups, as multiples of search.speedup, whose candidates may be measured
MAX_MEASURED = 16         # at most this many are timed, shared evenly by the depths
AIM = 1.1                 # measured prefill speed-ups fall ~0-15% short of the estimate: aim the timed ones at 1.1x
RETIME_FLOOR = 0.9        # candidates first timed at >= this x search.speedup are timed again against the teacher


def compute_params(config) -> int:
    """Parameters a prompt token's prefill multiplies through: the decoder's, not the embedding lookup nor the LM
    head, which a generation's prefill runs on the last position only (harness.measure_speed times it so; until
    2026-12-07 the LM head counted, which ranked hidden cuts as faster than they prefill); MoE: the experts a token
    is routed to."""
    c = count_params(config)
    return c["active"] - (c["total"] - c["non_embedding"])


def near_speedup(config, cands: list[arch.Dims], speedup: float) -> list[arch.Dims]:
    """The candidates worth timing for a speed-up target: of those whose speed-up estimated from compute parameters
    (teacher's / candidate's) lies in SPEED_BAND x speedup, the ones estimated nearest AIM x speedup at each depth
    (MAX_MEASURED shared by the depths). Near the line is where the quality is: a much faster candidate gives up
    quality the target does not ask for, a much slower one cannot meet it; and the estimate misses fixed per-layer
    and per-call costs, which weigh differently at each depth. Timing decides."""
    ref = compute_params(config)
    est = [(ref / compute_params(config_with_dims(config, d)), d) for d in cands]
    near = [(e, d) for e, d in est if SPEED_BAND[0] * speedup <= e <= SPEED_BAND[1] * speedup]
    if not near:
        raise PlanError(f"no candidate within search.params +- tolerance is estimated near {speedup:g}x faster than "
                        f"the teacher (estimates {min(e for e, _ in est):.2f}x-{max(e for e, _ in est):.2f}x); "
                        "move search.params or widen search.tolerance")
    by_depth: dict[int, list] = {}
    for e, d in sorted(near, key=lambda ed: abs(ed[0] - AIM * speedup)):  # nearest the aim first
        by_depth.setdefault(d.layers, []).append((e, d))
    kept, rank = [], 0
    while len(kept) < min(MAX_MEASURED, len(near)):  # round robin over the depths, nearest first
        kept += [ds[rank] for ds in by_depth.values() if rank < len(ds)][: MAX_MEASURED - len(kept)]
        rank += 1
    return [d for _, d in sorted(kept, key=lambda ed: ed[0])]


def fast_enough(row: dict, cfg: SearchConfig) -> bool:
    """The candidate meets search.speedup (measured prefill speed-up at batch 1), or no speed-up is asked."""
    return not cfg.speedup or row["prefill_speedup"] >= cfg.speedup


def retime_finalists(model, scores: dict[str, torch.Tensor], rows: list[dict], cfg: SearchConfig, picks: int) -> None:
    """Time again the candidates the search may pick, each interleaved with the teacher, in place in `rows`.

    In order of loss after pruning, the candidates first timed at >= RETIME_FLOOR x search.speedup, until `picks`
    of them (1, or max_candidates when the search trains them) meet the speed-up, at most 2 x picks + 2. Each of
    search.retime_rounds rounds times the teacher, then the candidate (a pruned copy, speed_of); the row keeps the
    median of the rounds' ratios (first timing: first_prefill_speedup). A single timing against a teacher timed
    minutes earlier reads any drift of the machine's speed as the candidate's (on a shared 2-core CPU single
    calls of one 89M student ranged 1.40x-1.64x), and the rows that decide are the ones near the line."""
    order = sorted((r for r in rows if r["prefill_speedup"] >= RETIME_FLOOR * cfg.speedup), key=lambda r: r["loss_pruned"])
    met = 0
    for row in tqdm(order[: 2 * picks + 2], desc="search: time finalists again", unit="cand"):
        if met >= picks:
            break
        student = pruned_copy(model, make_plan(model.config, scores, target_of(arch.Dims(**row["dims"]), cfg)))
        ratios = {"prefill": [], "decode": []}
        for _ in range(cfg.retime_rounds):
            t, s = speed_of(model, 1), speed_of(student, 1)
            for k in ratios:
                ratios[k].append(s[k] / t[k])
        del student
        row["first_prefill_speedup"] = row["prefill_speedup"]
        row.update({f"{k}_speedup": sorted(v)[len(v) // 2] for k, v in ratios.items()}, retimed=cfg.retime_rounds)
        met += fast_enough(row, cfg)


def speed_of(model, rounds: int) -> dict[str, float]:
    """Best of `rounds` prefill (128 tokens) and decode (8 tokens, KV cache) throughputs at batch 1 -> tok/s."""
    from minitron.eval.harness import measure_speed

    best = {"prefill": 0.0, "decode": 0.0}
    for r in range(rounds):
        s = measure_speed(model, decode_tokens=8, batch_sizes=(1,), seed=r)
        best = {"prefill": max(best["prefill"], s["prefill_tok_s"][1]),
                "decode": max(best["decode"], s["decode_tok_s"][1])}
    return best


def mark_pareto(rows: list[dict]) -> None:
    """row["pareto"] = True where no other candidate is both at least as fast to prefill and lower in loss (the
    trained loss where there is one, else the loss after pruning). Only where speed was measured."""
    if not rows or "prefill_speedup" not in rows[0]:
        return
    loss = [r.get("loss_trained", r["loss_pruned"]) for r in rows]
    for i, r in enumerate(rows):
        r["pareto"] = not any(o["prefill_speedup"] >= r["prefill_speedup"] and loss[j] < loss[i]
                              for j, o in enumerate(rows) if j != i)


def skipped_row(config, dims: arch.Dims, why: str) -> dict:
    """A table row for a candidate the planner refused (why: the PlanError's message), printed as it is
    skipped; search() lists these after the ranked rows."""
    short = f"L{dims.layers} h{dims.hidden} f{dims.ffn} H{dims.heads}" + (
        f" M{dims.mamba_heads}" if dims.mamba_heads else "")
    print(f"[minitron] search: candidate {short} skipped: {why}")
    return {"dims": dims.to_dict(), "params": count_params(config_with_dims(config, dims)), "skipped": why}


def save_table(rows: list[dict], out_dir: Path, cfg: SearchConfig) -> Path:
    """search.json, search.md (the table) and search.png (params vs loss, pruned and trained)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=1))
    mamba = any(r["dims"].get("mamba_heads") for r in rows)
    speed = any("prefill_speedup" in r for r in rows)
    lines = ["| rank | layers | hidden | ffn | heads | " + ("Mamba heads | " if mamba else "")
             + "params | loss after pruning | loss after training |" + (" prefill / decode speed-up |" if speed else ""),
             "|---" * (8 + mamba + speed) + "|"]
    for i, r in enumerate(rows):
        d = r["dims"]
        cells = [str(d[k]) for k in ("layers", "hidden", "ffn", "heads")] + ([str(d["mamba_heads"])] if mamba else [])
        if "skipped" in r:  # refused by the planner (search.skipped_row)
            losses = f"skipped: {r['skipped']} | —"
            rank = "—"
        else:
            losses = f"{r['loss_pruned']:.4f} | " + (f"{r['loss_trained']:.4f}" if "loss_trained" in r else "—")
            rank = str(i + 1)
        if speed:
            losses += (f" | {r['prefill_speedup']:.2f}x / {r['decode_speedup']:.2f}x" + (" (Pareto)" if r["pareto"] else "")
                       + ("" if fast_enough(r, cfg) else f", under {cfg.speedup:g}x")
                       + (f", median of {r['retimed']} rounds against the teacher (first {r['first_prefill_speedup']:.2f}x)"
                          if r.get("retimed") else "") if "prefill_speedup" in r else " | —")
        lines.append(f"| {rank} | {' | '.join(cells)} | {r['params']['total'] / 1e6:.2f}M | {losses} |")
    (out_dir / "search.md").write_text("\n".join(lines) + "\n")
    from minitron.eval.report import plot_search

    plot_search(rows, out_dir / "search.png")
    return out_dir
