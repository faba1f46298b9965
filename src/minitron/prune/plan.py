"""Decide what to keep: target dims (explicit or from a parameter budget) + scores -> a JSON PrunePlan."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minitron.arch import adapters as arch
from minitron.arch import layerwise, mamba
from minitron.arch.moe import plan_layer
from minitron.prune import per_layer as per_layer_plan


class PlanError(ValueError):
    """A target that cannot be met; the message says why and what to change."""


@dataclass
class Target:
    """What to prune to. Unset fields keep the source value (a param budget sets hidden and ffn)."""

    hidden: int | None = None
    ffn: int | None = None
    heads: int | None = None         # query heads per layer
    kv_heads: int | None = None      # KV groups per layer (pruning whole groups)
    layers: int | None = None        # keep this many layers
    drop_layers: list[int] | None = None  # or drop exactly these (0-based)
    experts: int | None = None       # MoE: experts kept per layer (ffn is then each expert's width)
    top_k: int | None = None         # MoE: experts per token (default: the source's, capped at experts)
    shared_ffn: int | None = None    # MoE: the shared expert's width (Qwen2-MoE)
    mamba_heads: int | None = None   # hybrid / Mamba: Mamba2 heads per mamba layer (a multiple of n_groups)
    mamba_head_dim: int | None = None  # hybrid / Mamba: channels per Mamba2 head
    # hybrid: drop layers only of these kinds (config names or mamba / attention / mlp), each the least
    # important by the layer metric (scattered); None: any layer, as `contiguous` says
    depth_types: list[str] | None = None
    params: float | str | None = None  # parameter budget (e.g. 70e6 or "70M")
    params_kind: str = "total"       # what the budget counts: total | non_embedding | active (per token, MoE)
    layer_metric: str = "lm-loss"    # bi | lm-loss | task:NAME: ranks layers / blocks for depth pruning
    contiguous: bool = True          # drop one contiguous block (paper's best) or scattered layers
    round_to: int = 8                # budget search rounds hidden and ffn to multiples of this
    split: str = "loss"              # how a budget divides hidden vs MLP: loss (the split with the lowest
                                     # held-out loss after pruning, measured by the prune stage) | ratio
                                     # (one common ratio for both)
    # per-layer widths (Llama, Mistral, Qwen2): the axes whose width may differ by layer (ffn, kv_heads); the uniform
    # target's totals are spread over the layers by importance (minitron.prune.per_layer)
    layer_widths: list[str] | None = None
    layer_norm: str = "measured"     # how layers compare: measured (each layer's held-out loss when narrowed alone,
                                     # measured by the prune stage) | loss (whichever of mean / contribution / raw
                                     # gives the lowest held-out loss) | mean | contribution | raw
    layer_floor: float = 0.25        # each layer keeps at least this fraction of the uniform width
    drop_parts: bool = False         # a layer may lose its whole MLP or attention (floor 0; layer 0 keeps attention)

    def __post_init__(self) -> None:
        if isinstance(self.params, str):
            self.params = parse_count(self.params)


@dataclass
class PrunePlan:
    """Kept indices per axis (sorted, in source numbering) and what the result is."""

    source: dict
    target: dict
    kept_layers: list[int]
    dropped_layers: list[int]
    hidden: list[int]                # kept hidden channels
    ffn: dict[int, list[int]]        # source layer -> kept neurons
    heads: dict[int, list[int]]      # source layer -> kept query heads (grouped by KV group)
    kv_heads: dict[int, list[int]]   # source layer -> kept KV heads
    experts: dict[int, list[int]] = field(default_factory=dict)  # MoE: source layer -> kept experts
    # MoE: source layer -> each kept expert's kept neurons (in the order of experts[layer]); ffn stays empty
    expert_ffn: dict[int, list[list[int]]] = field(default_factory=dict)
    shared_ffn: dict[int, list[int]] = field(default_factory=dict)  # MoE: source layer -> shared expert's neurons
    mamba_heads: dict[int, list[int]] = field(default_factory=dict)  # Mamba layer -> kept heads (grouped)
    mamba_channels: dict[int, list[int]] = field(default_factory=dict)  # Mamba layer -> kept head-dim channels
    params_before: dict = field(default_factory=dict)
    params_after: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resulting HF config
    layer_choice: dict = field(default_factory=dict)  # how dropped layers were chosen
    # per-layer widths: {"axes", "norm", "floor", "drop_parts", "widths": [{"layer" (source), "heads", "kv_heads",
    # "ffn"} per kept layer]}; empty for a uniform plan
    per_layer: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> PrunePlan:
        raw = json.loads(Path(path).read_text())
        for key in ("ffn", "heads", "kv_heads", "experts", "expert_ffn", "shared_ffn", "mamba_heads", "mamba_channels"):
            raw[key] = {int(k): v for k, v in raw.get(key, {}).items()}
        return cls(**raw)


def parse_count(text: str | float | int) -> float:
    """'70M' | '1.5B' | '500k' | '70000000' -> float."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise PlanError(f"cannot read parameter count {text!r}; write e.g. 70M, 1.5B or 70000000")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]


def parse_layer_list(text: str) -> list[int]:
    """'16-29' | '3,5,7-9' -> sorted unique ints."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not re.fullmatch(r"\d+(-\d+)?", part):
            raise PlanError(f"cannot read layer list {text!r}; write e.g. 16-29 or 3,5,7-9")
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def config_with_dims(config, dims: arch.Dims, kept_layers: list[int] | None = None):
    """A deep copy of an HF config with pruned dims written in."""
    new = copy.deepcopy(config)
    arch.write_dims(new, dims, kept_layers if kept_layers is not None else list(range(dims.layers)))
    return new


def source_config(name: str, trust_remote_code: bool = False):
    """A model's config alone (no weight is read), checked to be a family minitron prunes: so an
    unsupported architecture or an impossible target fails before a checkpoint is loaded."""
    from minitron.arch.models import ModelLoadError, load_config

    try:
        config = load_config(name, trust_remote_code)
    except ValueError as e:
        raise arch.UnsupportedArchitecture(
            f"{name!r}: unknown or unsupported architecture ({e}); supported families: "
            f"{', '.join(sorted(arch.FAMILIES))}") from e
    except OSError as e:
        raise ModelLoadError(f"could not read the config of {name!r}: {e}. Point --model at a dir written by "
                             "save_pretrained (with config.json), or a hub id when online.") from e
    arch.get_arch(config)
    return config


PARAMS_KINDS = ("total", "non_embedding", "active")


def count_params(config) -> dict:
    """Exact parameter counts of a config (model built on the meta device): total, non-embedding and active
    (what one token uses: total less the experts it is not routed to; = total for a dense model)."""
    from minitron.arch.models import model_from_config
    from minitron.arch.moe import inactive_params

    with torch.device("meta"):
        model = model_from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    d = arch.dims_of(config)
    embed = d.vocab * d.hidden * (1 if d.tied else 2)
    return {"total": int(total), "non_embedding": int(total - embed), "active": int(total - inactive_params(model))}


def _round(x: float, to: int) -> int:
    return max(to, int(round(x / to)) * to)


def resolve_dims(config, target: Target) -> arch.Dims:
    """Target -> concrete dims, checked against the source."""
    src = arch.dims_of(config)
    n_drop = len(target.drop_layers) if target.drop_layers else 0

    def pick(value, default):
        return default if value is None else value

    if not arch.is_moe(config) and (target.experts or target.top_k or target.shared_ffn):
        why = ("its MoE layers are pruned along hidden and depth only (experts and their width are not axes yet)"
               if "moe" in arch.layer_kinds(config) else "it is a dense model")
        raise PlanError(f"experts / top_k / shared_ffn are MoE axes, but {config.model_type} has no MoE adapter: "
                        f"{why}; drop them (--ffn prunes its MLP)")
    if not src.mamba_heads and (target.mamba_heads or target.mamba_head_dim):
        raise PlanError(f"mamba_heads / mamba_head_dim are Mamba axes, but {config.model_type} has no Mamba layers; "
                        "drop them")
    if layerwise.is_per_layer(config):
        raise PlanError("this model already has per-layer widths (its config has per_layer_config); pruning it again "
                        "is not supported: prune its uniform source, with target.layer_widths for per-layer widths")
    heads = pick(target.heads, src.heads)
    hidden = pick(target.hidden, heads * src.head_dim if arch.get_arch(config).hidden_is_q_width else src.hidden)
    experts = pick(target.experts, src.experts)
    dims = arch.Dims(hidden=hidden, ffn=pick(target.ffn, src.ffn), heads=heads,
                     kv_heads=pick(target.kv_heads, src.kv_heads), layers=pick(target.layers, src.layers - n_drop),
                     head_dim=src.head_dim, vocab=src.vocab, tied=src.tied, experts=experts,
                     top_k=pick(target.top_k, min(src.top_k, experts)), shared_ffn=pick(target.shared_ffn, src.shared_ffn),
                     mamba_heads=pick(target.mamba_heads, src.mamba_heads),
                     mamba_head_dim=pick(target.mamba_head_dim, src.mamba_head_dim))
    if target.params is not None and arch.get_arch(config).attention_free:
        raise PlanError(f"a parameter budget is not supported for {config.model_type} yet (its inner width is tied to "
                        "hidden by an integer expand); give explicit target dims (hidden, mamba_heads, mamba_head_dim)")
    if target.params is not None:
        dims = _fit_budget(config, dims, target)
    _check(config, src, dims, target)
    return dims


def _fit_budget(config, dims: arch.Dims, target: Target) -> arch.Dims:
    """The paper's recommended shape: keep heads and depth, shrink hidden and MLP by one common ratio,
    then give the MLP whatever budget the rounding of hidden left over. Hybrid models: Mamba heads (unless
    target.mamba_heads fixes them) follow the same ratio in whole heads per B/C group; their head dim is kept,
    as attention's is."""
    budget = target.params
    fixed_ffn = target.ffn is not None
    fixed_hidden = target.hidden is not None or arch.get_arch(config).hidden_is_q_width  # OLMoE: hidden = heads*D
    fixed_shared = target.shared_ffn is not None
    fixed_mamba = target.mamba_heads is not None or not dims.mamba_heads
    groups = 1 if fixed_mamba else getattr(config, arch.get_arch(config).mamba.groups_key)  # B/C groups
    if fixed_hidden and fixed_ffn:
        raise PlanError("--params with both --hidden and --ffn leaves nothing to fit; drop one of them")
    if target.split not in ("loss", "ratio"):
        raise PlanError(f"split {target.split!r} unknown; choose loss or ratio")
    if target.params_kind not in PARAMS_KINDS:
        raise PlanError(f"params_kind {target.params_kind!r} unknown; choose {', '.join(PARAMS_KINDS)}")
    step = arch.hidden_step(config, dims.heads, target.round_to)

    def at(ratio: float, ffn: int | None = None) -> arch.Dims:
        hidden = dims.hidden if fixed_hidden else min(dims.hidden, _round(dims.hidden * ratio, step))
        if ffn is None:
            ffn = dims.ffn if fixed_ffn else min(dims.ffn, _round(dims.ffn * ratio, target.round_to))
        shared = dims.shared_ffn if fixed_shared or not dims.shared_ffn else min(
            dims.shared_ffn, _round(dims.shared_ffn * ratio, target.round_to))
        mamba_heads = dims.mamba_heads if fixed_mamba else min(dims.mamba_heads, _round(dims.mamba_heads * ratio, groups))
        return arch.Dims(**{**dims.to_dict(), "hidden": hidden, "ffn": ffn, "shared_ffn": shared,
                            "mamba_heads": mamba_heads})

    def params(d: arch.Dims) -> int:
        return count_params(config_with_dims(config, d))[target.params_kind]

    full = params(at(1.0))
    if budget >= full and target.hidden is not None:
        return at(1.0)  # the fixed hidden width (a split's) leaves the budget room for the whole MLP: nothing to fit
    if budget >= full:
        raise PlanError(f"target {budget / 1e6:.4g}M {target.params_kind} params is not smaller than the model "
                        f"at these dims ({full / 1e6:.4g}M); give a smaller --params")
    if params(at(1e-6)) > budget:
        raise PlanError(f"target {budget / 1e6:.4g}M {target.params_kind} params is below the smallest model reachable by "
                        "shrinking hidden and MLP (and Mamba heads); also lower --layers/--heads, or raise --params")
    lo, hi = 1e-6, 1.0
    for _ in range(30):  # the largest common ratio whose rounded dims fit the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(at(mid)) <= budget else (lo, mid)
    best = at(lo)
    if not fixed_ffn:  # hidden moves in coarse steps: let the MLP take the rest of the budget
        ffn_options = range(best.ffn, dims.ffn + 1, target.round_to)
        best = max((at(lo, f) for f in ffn_options if params(at(lo, f)) <= budget), key=lambda d: d.ffn)
    return best


def budget_splits(config, target: Target, max_splits: int = 8) -> list[Target]:
    """The ways a parameter budget can divide between hidden and MLP: hidden from the source's width down to
    the common-ratio fit's (at most max_splits steps, evenly spaced, widest first), the MLP fitted to the
    rest of the budget; every other axis as `target` has it. The prune stage picks one by held-out loss."""
    src = arch.dims_of(config)
    ratio = resolve_dims(config, replace(target, split="ratio"))
    step = arch.hidden_step(config, target.heads or src.heads, target.round_to)
    hidden = list(range(ratio.hidden, src.hidden + 1, step))
    if len(hidden) > max_splits:
        hidden = sorted({hidden[round(i * (len(hidden) - 1) / (max_splits - 1))] for i in range(max_splits)})
    splits = []
    for h in reversed(hidden):
        try:
            resolve_dims(config, replace(target, hidden=h))
        except PlanError:  # the MLP cannot shrink enough to leave this hidden width its budget
            continue
        splits.append(replace(target, hidden=h))
    return splits


def _check(config, src: arch.Dims, d: arch.Dims, target: Target) -> None:
    moe = ("experts", "top_k") + (("shared_ffn",) if src.shared_ffn else ()) if src.experts else ()
    attn = () if arch.get_arch(config).attention_free else ("ffn", "heads", "kv_heads")
    for name in ("hidden", *attn, "layers", *moe):
        new, old = getattr(d, name), getattr(src, name)
        if new <= 0:
            raise PlanError(f"target {name}={new} must be positive")
        if new > old:
            raise PlanError(f"target {name}={new} is larger than the source's {old}; pruning only shrinks")
    if src.experts and d.top_k > d.experts:
        raise PlanError(f"top_k={d.top_k} routes each token to more experts than the {d.experts} kept; "
                        f"choose top_k <= experts")
    if not src.shared_ffn and d.shared_ffn:
        raise PlanError(f"{config.model_type} has no shared expert; drop shared_ffn")
    if arch.get_arch(config).hidden_is_q_width and d.hidden != d.heads * d.head_dim:
        raise PlanError(f"{config.model_type} sizes q_norm by hidden_size, so hidden must equal heads x head_dim "
                        f"({d.heads} x {d.head_dim} = {d.heads * d.head_dim}), not {d.hidden}: set hidden by --heads "
                        "alone (drop --hidden)")
    if not src.heads:  # attention-free (Mamba2): no head axes to check
        if (target.heads or target.kv_heads or target.ffn) and arch.get_arch(config).attention_free:
            raise PlanError(f"{config.model_type} has no attention or MLP; drop heads / kv_heads / ffn")
    elif d.heads % d.kv_heads:
        raise PlanError(f"{d.heads} query heads cannot be split evenly over {d.kv_heads} KV groups; "
                        f"choose heads as a multiple of kv_heads")
    if src.heads and arch.get_arch(config).hidden_divisible_by_heads and d.hidden % d.heads:
        raise PlanError(f"hidden={d.hidden} is not a multiple of heads={d.heads}, which transformers requires of "
                        f"{arch.get_arch(config).family} configs (the model would not reload); choose hidden as a "
                        f"multiple of {d.heads}, e.g. {d.hidden // d.heads * d.heads}")
    if src.heads and d.heads // d.kv_heads > src.heads // src.kv_heads:
        raise PlanError(f"{d.heads} heads over {d.kv_heads} KV groups needs {d.heads // d.kv_heads} query "
                        f"heads per group, but the source has {src.heads // src.kv_heads}; "
                        f"keep more KV groups or fewer heads")
    if src.mamba_heads:
        m = arch.get_arch(config).mamba
        why = mamba.check_dims(src, d, getattr(config, m.groups_key), expand_tied=m.expand_key is not None)
        if why:
            raise PlanError(why)
    if target.depth_types is not None:
        _check_depth_types(config, src, d, target)
    if target.drop_layers and target.layers is not None and src.layers - len(target.drop_layers) != target.layers:
        raise PlanError("--layers and --drop-layers disagree; give one of them")
    if target.drop_layers and max(target.drop_layers) >= src.layers:
        raise PlanError(f"--drop-layers names layer {max(target.drop_layers)}, but the model has {src.layers} (0-based)")
    if target.layer_widths is not None:
        why = per_layer_plan.check_target(config, target.layer_widths, target.layer_norm, target.layer_floor)
        if why:
            raise PlanError(why)
    if target.layer_metric not in ("bi", "lm-loss") and not target.layer_metric.startswith("task:"):
        raise PlanError(f"layer metric {target.layer_metric!r} unknown; choose bi, lm-loss or task:NAME (e.g. task:piqa)")


def _check_depth_types(config, src: arch.Dims, d: arch.Dims, target: Target) -> None:
    """depth_types: known kinds, no explicit drop_layers beside them, and enough layers of those kinds."""
    try:
        kinds = {arch.kind_name(config, k) for k in target.depth_types}
    except ValueError as e:
        raise PlanError(f"depth_types: {e}") from e
    if target.drop_layers:
        raise PlanError("depth_types and --drop-layers both choose the dropped layers; give one of them")
    have = sum(k in kinds for k in arch.layer_kinds(config))
    if src.layers - d.layers > have:
        raise PlanError(f"dropping {src.layers - d.layers} layers among the kinds {sorted(kinds)}, but the model has "
                        f"only {have} of them; keep more layers or name more kinds in depth_types")


def _check_kept_kinds(config, kept_layers: list[int]) -> None:
    """Hybrid: refuse dropping every layer of the kind the family's cache needs (NemotronH: attention)."""
    a = arch.get_arch(config)
    need = a.hybrid.keeps_attention if a.hybrid is not None else None
    kinds = arch.layer_kinds(config)
    if need and need in kinds and not any(kinds[i] == need for i in kept_layers):
        raise PlanError(f"the plan drops every {need} layer, and {config.model_type} cannot generate with its cache "
                        f"without one (transformers counts the sequence on them); keep one: exclude that kind from "
                        "depth_types, or list the dropped layers with --drop-layers")


def layer_score_name(target: Target, n_drop: int, scattered_kinds: bool = False) -> str | None:
    """The scores entry choose_layers reads to drop n_drop layers: block_<metric>.<n_drop> for a contiguous block,
    layer_<metric> for scattered layers (or, scattered_kinds, a hybrid's depth_types); None when nothing is dropped
    or the layers are listed."""
    if n_drop == 0 or target.drop_layers:
        return None
    key = {"bi": "bi", "lm-loss": "lm_loss"}.get(target.layer_metric, "task")
    return f"block_{key}.{n_drop}" if target.contiguous and not scattered_kinds else f"layer_{key}"


def missing_layer_scores(name: str, target: Target, n_drop: int) -> PlanError:
    """The error for scores without the layer score `name` (layer_score_name), with the fix."""
    if name.startswith("block_"):
        return PlanError(f"scores hold no {name}: rerun importance with the {target.layer_metric} metric for blocks of "
                         f"{n_drop} layers (prune computes it when --layers is given and --scores is not)"
                         + ("" if target.layer_metric == "bi" else ", or use --layer-metric bi"))
    return PlanError(f"scores hold no {name}; rerun importance with --layer-metric {target.layer_metric}")


def choose_layers(scores: dict, n_layers: int, n_drop: int, target: Target,
                  allowed: list[int] | None = None, keep: int | None = None) -> tuple[list[int], dict]:
    """Layers to drop: the least important contiguous block (or scattered layers) by the layer metric;
    with `allowed` (hybrid depth_types), the least important scattered layers among those indices. `keep`: a layer
    no choice may drop (arch.first_cache_layer); explicit drop_layers are the user's."""
    if n_drop == 0:
        return [], {}
    if target.drop_layers:
        return sorted(target.drop_layers), {"how": "explicit"}
    name = layer_score_name(target, n_drop, scattered_kinds=allowed is not None)
    if name not in scores:
        raise missing_layer_scores(name, target, n_drop)
    if allowed is not None:
        order = sorted((i for i in allowed if i != keep), key=lambda i: float(scores[name][i]))
        return sorted(order[:n_drop]), {"how": f"scattered layers of kinds {target.depth_types} by "
                                               f"{target.layer_metric}", "layer_scores": scores[name].tolist()}
    if target.contiguous:
        block = scores[name].float().clone()                                        # [L - n_drop + 1]
        if keep is not None:  # no block that covers it
            block[max(0, keep - n_drop + 1):keep + 1] = float("inf")
        start = int(torch.argmin(block))
        return list(range(start, start + n_drop)), {"how": f"contiguous block by {target.layer_metric}",
                                                     "block_scores": scores[name].tolist()}
    layer = scores[name].float().clone()                                            # [L]
    if keep is not None:
        layer[keep] = float("inf")
    drop = torch.argsort(layer)[:n_drop].sort().values.tolist()
    return drop, {"how": f"scattered layers by {target.layer_metric}", "layer_scores": scores[name].tolist()}


def _topk_sorted(score: torch.Tensor, k: int) -> list[int]:
    return torch.topk(score.float(), k).indices.sort().values.tolist()


def make_plan(config, scores: dict[str, torch.Tensor], target: Target) -> PrunePlan:
    """Rank every axis by its scores and keep the top units to reach the target dims."""
    src, dims = arch.dims_of(config), resolve_dims(config, target)
    allowed = None
    if target.depth_types is not None:  # hybrid: drop only layers of these kinds
        kinds = {arch.kind_name(config, k) for k in target.depth_types}
        allowed = [i for i, k in enumerate(arch.layer_kinds(config)) if k in kinds]
    dropped, layer_choice = choose_layers(scores, src.layers, src.layers - dims.layers, target, allowed,
                                          arch.first_cache_layer(config))
    kept_layers = [i for i in range(src.layers) if i not in set(dropped)]
    _check_kept_kinds(config, kept_layers)
    group, new_group = (src.heads // src.kv_heads, dims.heads // dims.kv_heads) if src.heads else (0, 0)
    heads, kv_heads, ffn, experts, expert_ffn, shared_ffn, m_heads, m_channels = {}, {}, {}, {}, {}, {}, {}, {}
    parts = arch.layer_parts(config)
    a = arch.get_arch(config)
    widths = None
    if target.layer_widths:  # each kept layer its own MLP width / KV groups (the uniform dims' totals)
        w = per_layer_plan.layer_widths(scores, dims, kept_layers, target.layer_widths, target.layer_norm,
                                        target.layer_floor, target.drop_parts, target.round_to)
        widths = {i: (w["kv_heads"][j], w["ffn"][j]) for j, i in enumerate(kept_layers)}
    for i in kept_layers:
        if widths is not None:
            kv_i, ffn_i = widths[i]
            kv_heads[i] = _topk_sorted(scores["kv_groups"][i], kv_i) if kv_i else []
            heads[i] = [g * group + h for g in kv_heads[i]
                        for h in _topk_sorted(scores["heads"][i, g * group:(g + 1) * group], new_group)]
            ffn[i] = _topk_sorted(scores["neurons"][i], ffn_i) if ffn_i else []
            continue
        if "mamba" in parts[i]:  # heads ranked within their B/C group, head-dim channels shared by all heads
            m_heads[i], m_channels[i] = mamba.plan_layer(scores, i, src, dims, getattr(config, a.mamba.groups_key))
        if "mlp" in parts[i] and a.hybrid is not None:
            ffn[i] = _topk_sorted(scores["neurons"][i], dims.ffn)
        if "attn" not in parts[i]:
            continue
        kv = _topk_sorted(scores["kv_groups"][i], dims.kv_heads)
        kv_heads[i] = kv
        # query heads ranked within their KV group; every group keeps the same count (GQA-consistent)
        heads[i] = [g * group + h for g in kv for h in _topk_sorted(scores["heads"][i, g * group:(g + 1) * group], new_group)]
        if arch.is_moe(config):  # experts by their output norm; each kept expert ranks its own neurons
            experts[i], expert_ffn[i], shared_ffn[i] = plan_layer(scores, i, src, dims)
        elif a.hybrid is None:  # the layer's MLP (hybrid MLP layers are ranked above)
            ffn[i] = _topk_sorted(scores["neurons"][i], dims.ffn)
    new_config = config_with_dims(config, dims, kept_layers)
    per_layer = {}
    if widths is not None:
        lw = [layerwise.LayerWidth(len(heads[i]), len(kv_heads[i]), len(ffn[i])) for i in kept_layers]
        layerwise.write_layer_widths(new_config, lw)
        per_layer = {"axes": list(target.layer_widths), "norm": target.layer_norm, "floor": target.layer_floor,
                     "drop_parts": target.drop_parts,
                     "widths": [{"layer": i, "heads": w.heads, "kv_heads": w.kv_heads, "ffn": w.ffn}
                                for i, w in zip(kept_layers, lw, strict=True)]}
    return PrunePlan(source=src.to_dict(), target=dims.to_dict(), kept_layers=kept_layers, dropped_layers=dropped,
                     hidden=_topk_sorted(scores["channels"], dims.hidden), ffn=ffn, heads=heads, kv_heads=kv_heads,
                     experts=experts, expert_ffn=expert_ffn, shared_ffn=shared_ffn, mamba_heads=m_heads,
                     mamba_channels=m_channels, params_before=count_params(config), params_after=count_params(new_config),
                     config=_config_dict(new_config), layer_choice=layer_choice, per_layer=per_layer)


def _config_dict(config) -> dict:
    return layerwise.config_json(config) if layerwise.is_per_layer(config) else config.to_dict()
