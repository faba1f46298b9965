"""Least-squares refit of a pruned student's output projections, so that its residual stream tracks the teacher's.

Trimming drops heads, neurons and whole layers; what they added to the residual stream is lost. This step refits,
layer by layer in order, the projections that write into the residual stream (attention o_proj, dense MLP
down_proj) on calibration text, each a ridge regression toward its trimmed weights W [C, k]:

    W' = argmin_W' ||X W'^T - R||^2 + lam * mean(diag(X^T X)) * ||W' - W||^2
       = solve(X^T X + lam * mean(diag(X^T X)) * I,  X^T R + lam * mean(diag(X^T X)) * W^T)^T

X [N, k] the projection's input in the student (its earlier layers already refit: the error they leave is what
this one corrects), R [N, C] what the sub-layer should add: the teacher's residual stream after the same source
sub-layer (on the kept hidden channels) minus the student's residual before it. A layer right after a dropped
block therefore also takes up part of what the block added. Forward passes and one k x k solve per projection;
statistics in fp32, solves in fp64. Families whose sub-layer outputs are not added to the stream as they are
(post-norms, residual multipliers: arch.residual_outputs) are left as trimmed; so are MoE experts and Mamba mixers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from minitron.arch import adapters as arch

REFIT_PARTS = ("none", "mlp", "attn+mlp")


@dataclass
class RefitConfig:
    """What is refit, on how much text, and how strongly it is pulled toward the trimmed weights."""

    parts: str = "attn+mlp"   # none | mlp (down_proj) | attn+mlp (o_proj too); the prune stage's default is none
    samples: int = 64         # calibration blocks (the first of the prune stage's calibration sample)
    ridge: float = 0.1        # lam, relative to the mean diagonal of X^T X
    batch_size: int = 8

    def check(self) -> None:
        if self.parts not in REFIT_PARTS:
            raise ValueError(f"refit parts {self.parts!r} unknown; choose from {', '.join(REFIT_PARTS)}")
        if self.samples < 1 or self.ridge <= 0:
            raise ValueError(f"refit needs samples >= 1 and ridge > 0 (got {self.samples}, {self.ridge}); "
                             "turn it off with parts: none")


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module], seen: dict[str, list], want: str):
    """Record each module's input (`want` = "input") or output per call into seen[name]."""
    def hook(name):
        def f(module, args, out):
            seen.setdefault(name, []).append((args[0] if want == "input" else arch.layer_output(out)).detach())
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _run(model: nn.Module, layers: list[int], hidden: torch.Tensor, taps: dict[str, nn.Module] | None = None,
         want: str = "output") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run decoder layers `layers` (consecutive) of `model` on hidden [B, T, C] -> (their output [B, T, C], what
    `taps` saw: name -> [B, T, *])."""
    blocks = arch.decoder_layers(model)
    seen: dict[str, list] = {}
    drop = [i for i in range(len(blocks)) if i not in set(layers)]
    with arch.without_layers(model, drop), _capture({"out": blocks[layers[-1]]}, seen, "output"), \
            _capture(taps or {}, seen, want):
        arch.backbone(model)(inputs_embeds=hidden, use_cache=False)
    return seen.pop("out")[0], {k: v[0] for k, v in seen.items()}


@torch.no_grad()
def _stream_start(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What enters decoder layer 0 for token ids [B, T] -> [B, T, C] (the family's embedding scaling included)."""
    seen: dict[str, list] = {}
    layer0 = arch.decoder_layers(model)[0]
    handle = layer0.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault(
        "in", []).append((args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    try:
        with arch.without_layers(model, list(range(1, len(arch.decoder_layers(model))))):
            arch.backbone(model)(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["in"][0]


def _solve(xtx: torch.Tensor, xtr: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge solution toward `weight` [C, k] given X^T X [k, k] and X^T R [k, C] -> new weight [C, k]."""
    a, b = xtx.double(), xtr.double()
    lam = ridge * a.diagonal().mean().clamp_min(1e-12)
    a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    w = torch.linalg.solve(a, b + lam * weight.double().T)  # [k, C]
    return w.T.to(weight.dtype)


class _Stats:
    """X^T X [k, k], X^T R [k, C] and ||R||^2 over the calibration tokens (fp32 sums, fp64 norm)."""

    def __init__(self, lin: nn.Linear) -> None:
        dev = lin.weight.device
        self.xtx = torch.zeros(lin.in_features, lin.in_features, device=dev)
        self.xtr = torch.zeros(lin.in_features, lin.out_features, device=dev)
        self.rr = torch.zeros((), dtype=torch.float64, device=dev)

    def add(self, x: torch.Tensor, r: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])  # [B, T, k] -> [B*T, k]
        r = r.float().reshape(-1, r.shape[-1])  # [B, T, C] -> [B*T, C]
        self.xtx += x.T @ x
        self.xtr += x.T @ r
        self.rr += r.double().square().sum()

    def apply(self, lin: nn.Linear, ridge: float) -> dict[str, float]:
        """Set lin's weight to the ridge solution; the relative error ||X W^T - R|| / ||R|| before and after."""
        def err(w: torch.Tensor) -> float:  # ||X W^T - R||^2 = tr(W X^T X W^T) - 2 tr(W X^T R) + ||R||^2
            w = w.double()
            e = (w @ self.xtx.double() @ w.T).trace() - 2 * (w @ self.xtr.double()).trace() + self.rr
            return float(e.clamp_min(0).sqrt() / self.rr.sqrt().clamp_min(1e-12))

        before = err(lin.weight.data)
        lin.weight.data.copy_(_solve(self.xtx, self.xtr, lin.weight.data, ridge))
        return {"error_before": before, "error_after": err(lin.weight.data)}


def _weight_part(r: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """What the projection's weight must add, r [B, T, C] less its bias (kept as it is)."""
    return r if lin.bias is None else r - lin.bias


def supported(model: nn.Module) -> bool:
    """Whether this family adds o_proj / down_proj outputs to the residual stream as they are."""
    return arch.residual_outputs(model)


def _check_residual(out: torch.Tensor, parts: list[torch.Tensor], family: str) -> None:
    """The layer's output [B, T, C] must be its input plus what the projections add (the adapter's claim)."""
    gap = (out.float() - sum(p.float() for p in parts)).norm() / out.float().norm().clamp_min(1e-12)
    if gap > 2e-2:
        raise RuntimeError(f"refit: a {family} layer's output is not its input plus its o_proj and down_proj outputs "
                           f"(relative gap {gap:.3g}); the adapter's residual_outputs is wrong for this family. Turn "
                           "the refit off (prune refit: none) and report it")


@torch.no_grad()
def refit(student: nn.Module, teacher: nn.Module, kept_layers: list[int], hidden: list[int], calib: torch.Tensor,
          cfg: RefitConfig) -> list[dict]:
    """Refit the student's o_proj / down_proj, layer by layer, toward the teacher's residual stream on calib
    [N, T] token ids. kept_layers: the source layer of each student layer; hidden: the kept hidden channels.
    Returns one row per refit projection (layer, part, relative error before and after)."""
    cfg.check()
    s_parts, moe = arch.layer_parts(student), arch.is_moe(student)
    if cfg.parts == "none" or not supported(student) or not any(
            "attn" in p and cfg.parts == "attn+mlp" or "mlp" in p and not moe for p in s_parts):
        return []
    device = next(student.parameters()).device
    keep = torch.tensor(hidden, device=device)
    batches = [calib[b:b + cfg.batch_size].to(device) for b in range(0, min(len(calib), cfg.samples), cfg.batch_size)]
    h_t = [_stream_start(teacher, ids) for ids in batches]                          # B x [b, T, C_teacher]
    h_s = [_stream_start(student, ids) for ids in batches]                          # B x [b, T, C]
    rows, done = [], -1
    for j, src in enumerate(tqdm(kept_layers, desc="prune: refit", unit="layer")):
        if src > done + 1:  # a dropped block: the teacher's stream goes through it
            h_t = [_run(teacher, list(range(done + 1, src)), hb)[0] for hb in h_t]
        t_layer, s_layer = arch.decoder_layers(teacher)[src], arch.decoder_layers(student)[j]
        attn = "attn" in s_parts[j] and cfg.parts == "attn+mlp"
        mlp = "mlp" in s_parts[j] and not moe
        t_parts, mids = arch.layer_parts(teacher)[src], []
        whole = t_parts <= {"attn", "mlp"} and not moe  # every part's output is tapped: the residual is checked
        for b, hb in enumerate(h_t):
            taps = {"a": arch.attn_output(teacher, t_layer)} if "attn" in t_parts and (attn or whole) else {}
            if "mlp" in t_parts and whole:
                taps["m"] = arch.mlp_output(teacher, t_layer)
            out, seen = _run(teacher, [src], hb, taps)
            if b == 0 and whole:
                _check_residual(out, [hb, *seen.values()], arch.get_arch(teacher).family)
            mids.append((hb + seen["a"])[..., keep] if attn else None)             # teacher stream after attention
            h_t[b] = out
        if attn:
            lin = arch.attn_output(student, s_layer)
            st = _Stats(lin)
            for hb, mb in zip(h_s, mids, strict=True):
                st.add(_run(student, [j], hb, {"x": lin}, "input")[1]["x"], _weight_part(mb - hb, lin))
            rows.append({"layer": j, "source_layer": src, "part": "attn", **st.apply(lin, cfg.ridge)})
        if mlp:
            lin = arch.mlp_output(student, s_layer)
            st, kept = _Stats(lin), []
            for hb, tb in zip(h_s, h_t, strict=True):
                out, seen = _run(student, [j], hb, {"x": lin}, "input")
                before = out - lin(seen["x"])                                      # the residual before the MLP
                st.add(seen["x"], _weight_part(tb[..., keep] - before, lin))
                kept.append((before, seen["x"]))
            rows.append({"layer": j, "source_layer": src, "part": "mlp", **st.apply(lin, cfg.ridge)})
            h_s = [res + lin(x) for res, x in kept]                                # the layer's new output
        else:
            h_s = [_run(student, [j], hb)[0] for hb in h_s]
        done = src
    return rows
