"""MoE families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE): expert importance and router
statistics, pruning experts / expert width / shared-expert width exactly, the active-parameter budget,
the prune stage's output reloading and generating, and distillation of a pruned MoE student."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import assert_same_and_generates, distill_pair, make_config, make_model, make_text
from minitron import arch
from minitron.arch.tiny import MOE_FAMILIES
from minitron.prune import PruneConfig, apply_plan, prune
from minitron.prune.importance import ImportanceConfig, compute_importance
from minitron.prune.plan import PlanError, PrunePlan, Target, make_plan, resolve_dims


@pytest.fixture(params=MOE_FAMILIES)
def moe_family(request):
    return request.param


def _ids(tokenizer, n=4):
    return tokenizer(make_text(n), return_tensors="pt").input_ids  # [1, T]


def _calib(tokenizer) -> torch.Tensor:
    ids = _ids(tokenizer, 60)[0]
    return ids[: (ids.numel() // 32) * 32].view(-1, 32)  # [N, 32]


def _random_scores(d: arch.Dims) -> dict[str, torch.Tensor]:
    out = {"heads": torch.rand(d.layers, d.heads), "kv_groups": torch.rand(d.layers, d.kv_heads),
           "channels": torch.rand(d.hidden), "experts": torch.rand(d.layers, d.experts),
           "neurons": torch.rand(d.layers, d.experts * d.ffn)}
    if d.shared_ffn:
        out["shared_neurons"] = torch.rand(d.layers, d.shared_ffn)
    return out


def test_pruning_to_own_dims_is_identity(moe_family, tokenizer, tmp_path):
    model = make_model(moe_family)
    ids = _ids(tokenizer)
    d = arch.dims_of(model.config)
    assert d.experts == 4 and d.top_k == 2 and d.ffn == 32 and d.shared_ffn == (48 if moe_family == "qwen2_moe" else 0)
    with torch.no_grad():
        ref = model(ids).logits
        apply_plan(model, make_plan(model.config, _random_scores(d), Target()))
        assert torch.equal(model(ids).logits, ref)
        model.save_pretrained(tmp_path / "same")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "same")(ids).logits, ref)


@torch.no_grad()
def _never_route(model, expert: int, channel: int = 5) -> None:
    """Make `expert` never selected in any layer: hidden channel `channel` of the residual stream is held at
    0.02 (embedding column 0.02, nothing written to it by attention or experts), so after each pre-MLP norm
    (gain 1 there) it is positive; the expert's router row reads only that channel, times -1e4, and no other
    router row reads it."""
    arch.embedding(model).weight[:, channel] = 0.02
    for layer in arch.decoder_layers(model):
        o = arch.attn_output(model, layer)
        o.weight[channel] = 0
        if o.bias is not None:
            o.bias[channel] = 0
        p = arch.moe_parts(model, layer)
        p.experts.down_proj[:, channel, :] = 0  # [E, C, F]
        if p.shared is not None:
            p.shared.down_proj.weight[channel] = 0
        for norm in arch.channel_norms(model, layer):
            norm.weight[channel] = 1.0
        p.router.weight[:, channel] = 0
        p.router.weight[expert] = 0
        p.router.weight[expert, channel] = -1e4


def test_never_routed_expert_scores_zero_and_prunes_exactly(moe_family, tokenizer):
    """Removing an expert the router never selects leaves the logits unchanged (its softmax share is exactly
    0, so even Qwen2-MoE / OLMoE routing weights that are not renormalized stay the same). The importance pass
    finds it: zero routed tokens and zero score in every layer, so the plan drops it."""
    model = make_model(moe_family)
    _never_route(model, expert=2)
    scores = compute_importance(model, _calib(tokenizer), ImportanceConfig(batch_size=4))
    d = arch.dims_of(model.config)
    assert scores["experts"].shape == scores["router_tokens"].shape == scores["router_prob"].shape == (d.layers, 4)
    assert scores["neurons"].shape == (d.layers, 4 * d.ffn)
    assert torch.all(scores["router_tokens"][:, 2] == 0) and torch.all(scores["experts"][:, 2] == 0)
    assert torch.all(scores["experts"][:, [0, 1, 3]] > 0)
    torch.testing.assert_close(scores["router_tokens"].sum(1), torch.full((d.layers,), 2.0))  # top-2
    torch.testing.assert_close(scores["router_prob"].sum(1), torch.ones(d.layers))
    plan = make_plan(model.config, scores, Target(experts=3))
    assert all(kept == [0, 1, 3] for kept in plan.experts.values())
    assert plan.target["top_k"] == 2  # active parameters lose only the router rows
    assert plan.params_before["active"] - plan.params_after["active"] == d.layers * d.hidden
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
        got = apply_plan(copy.deepcopy(model), plan)(ids).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_silent_expert_neurons_prune_exactly(moe_family, tokenizer):
    """Neurons whose down-projection column is zero (a different set in each expert, and in the shared
    expert) carry nothing: pruning exactly those leaves the logits unchanged."""
    model = make_model(moe_family)
    d = arch.dims_of(model.config)
    scores = _random_scores(d)
    torch.manual_seed(3)
    with torch.no_grad():
        for i, layer in enumerate(arch.decoder_layers(model)):
            p = arch.moe_parts(model, layer)
            for e in range(d.experts):
                drop = torch.randperm(d.ffn)[:8]
                p.experts.down_proj[e, :, drop] = 0  # [E, C, F]
                scores["neurons"][i].view(d.experts, d.ffn)[e, drop] = -1.0  # ranked last
            if p.shared is not None:
                drop = torch.randperm(d.shared_ffn)[:8]
                p.shared.down_proj.weight[:, drop] = 0
                scores["shared_neurons"][i, drop] = -1.0
    target = Target(ffn=d.ffn - 8, shared_ffn=d.shared_ffn - 8 if d.shared_ffn else None)
    plan = make_plan(model.config, scores, target)
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
        pruned = apply_plan(copy.deepcopy(model), plan)
        got = pruned(ids).logits
    assert pruned.config.to_dict()[arch.get_arch(pruned).moe.width_key] == d.ffn - 8
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_prune_stage_output_reloads_and_generates(moe_family, tokenizer, corpus_dir, tmp_path):
    """Experts, expert width, heads, KV groups, hidden and depth at once, through the prune stage: a plain HF
    dir that from_pretrained loads (same logits as in memory, parameter count as planned) and that generates
    the same with and without a KV cache; scores.json carries the router statistics."""
    src = tmp_path / "src"
    make_model(moe_family).save_pretrained(src)
    tokenizer.save_pretrained(src)
    hidden = 32 if moe_family == "olmoe" else 48  # OLMoE: hidden = heads x head_dim
    target = Target(experts=3, ffn=24, heads=2, kv_heads=1, layers=3, hidden=hidden, layer_metric="bi",
                    shared_ffn=40 if moe_family == "qwen2_moe" else None)
    out = prune(PruneConfig(model=str(src), out=str(tmp_path / "out"), calib_data=str(corpus_dir), calib_samples=8,
                            heldout_samples=2, seq_len=32, batch_size=4, device="cpu", target=target))
    plan = PrunePlan.load(out / "plan.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    d = arch.dims_of(reloaded.config)
    assert (d.experts, d.top_k, d.ffn, d.heads, d.kv_heads, d.layers, d.hidden) == (3, 2, 24, 2, 1, 3, hidden)
    assert d.shared_ffn == (40 if moe_family == "qwen2_moe" else 0)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after["total"]
    assert plan.params_after["active"] < plan.params_after["total"]
    assert_same_and_generates(reloaded, apply_plan(make_model(moe_family), plan), _ids(tokenizer, 3))
    scores = load_file(str(out / "scores.safetensors"))
    assert scores["router_tokens"].shape == (4, 4)
    summary = json.loads((out / "scores.json").read_text())
    assert len(summary["router_tokens"]) == 4 and len(summary["experts_per_layer_ranking"][0]) == 4
    metrics = json.loads((out / "prune_metrics.json").read_text())
    assert {"total", "non_embedding", "active"} <= set(metrics["params_after"])
    assert (out / "importance.png").stat().st_size > 1000  # with the expert and router panels


def test_report_line_shows_total_and_active_parameters():
    from minitron.eval.report import _params_line

    assert _params_line({"total": 3e6, "non_embedding": 2e6, "active": 1e6}) == (
        "3.00M total, 2.00M non-embedding, 1.00M active per token")
    assert "active" not in _params_line({"total": 3e6, "non_embedding": 2e6, "active": 3e6})  # dense


def test_active_parameter_budget():
    """A budget can count the parameters one token uses: total less the experts it is not routed to."""
    config = make_config("qwen2_moe")
    p = make_plan(config, _random_scores(arch.dims_of(config)), Target()).params_before
    d = arch.dims_of(config)
    per_expert = 3 * d.hidden * d.ffn
    assert p["total"] - p["active"] == d.layers * (d.experts - d.top_k) * per_expert
    budget = int(0.7 * p["active"])
    dims = resolve_dims(config, Target(params=budget, params_kind="active", split="ratio"))
    plan = make_plan(config, _random_scores(d), Target(params=budget, params_kind="active", split="ratio"))
    assert plan.target == dims.to_dict() and 0.9 * budget < plan.params_after["active"] <= budget
    assert dims.shared_ffn < d.shared_ffn  # the shared expert shrinks with the expert width
    # fewer experts leave the active count alone; fewer per token lower it
    same = make_plan(config, _random_scores(d), Target(experts=2)).params_after
    assert p["active"] - same["active"] == 2 * d.layers * d.hidden and same["total"] < p["total"]  # router rows
    assert make_plan(config, _random_scores(d), Target(top_k=1)).params_after["active"] < p["active"]


def test_moe_targets_are_checked():
    config = make_config("mixtral")
    assert resolve_dims(config, Target(experts=1)).top_k == 1  # top-k kept valid
    with pytest.raises(PlanError, match="top_k=3"):
        resolve_dims(config, Target(experts=2, top_k=3))
    with pytest.raises(PlanError, match="larger than the source"):
        resolve_dims(config, Target(experts=5))
    with pytest.raises(PlanError, match="no shared expert"):
        resolve_dims(config, Target(shared_ffn=8))
    with pytest.raises(PlanError, match="MoE axes"):
        resolve_dims(make_config("llama"), Target(experts=2))
    with pytest.raises(PlanError, match="heads x head_dim"):
        resolve_dims(make_config("olmoe"), Target(hidden=48))
    with pytest.raises(arch.UnsupportedArchitecture, match="mlp_only_layers"):
        arch.dims_of(make_config("qwen3_moe", mlp_only_layers=[1]))


def test_unknown_architecture_refused_from_the_config(corpus_dir, tmp_path):
    """A family transformers knows but minitron does not: refused from config.json, before any weight is read
    (the dir holds no weights at all)."""
    AutoConfig.for_model("gpt2", vocab_size=384, n_embd=64, n_layer=2, n_head=4).save_pretrained(tmp_path / "m")
    with pytest.raises(arch.UnsupportedArchitecture, match="gpt2"):
        prune(PruneConfig(model=str(tmp_path / "m"), out=str(tmp_path / "out"), calib_data=str(corpus_dir),
                          target=Target(hidden=32)))


def test_distill_a_pruned_moe_student(tokenizer, corpus_dir, tmp_path):
    """The teacher (Qwen2-MoE, 4 experts + shared) distills into its pruned copy (2 experts, narrower)."""

    teacher = make_model("qwen2_moe")
    with torch.no_grad():  # peaked teacher distributions (a random one is near uniform)
        teacher.lm_head.weight.mul_(8.0)
    d = arch.dims_of(teacher.config)
    student = apply_plan(copy.deepcopy(teacher), make_plan(teacher.config, _random_scores(d), Target(experts=2, ffn=16, shared_ffn=24)))
    out, info = distill_pair(teacher, student, tokenizer, corpus_dir, tmp_path)
    assert info["finished"] and info["steps"] == 6
    assert info["first_eval"]["val_kl"] > 0.05  # pruning moved the student away from the teacher
    assert info["final_eval"]["val_kl"] < info["first_eval"]["val_kl"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert arch.dims_of(reloaded.config).experts == 2


def test_search_candidates_keep_the_moe_axes():
    """The architecture search varies hidden / expert width / heads / depth of an MoE model and keeps its
    experts, top-k and shared expert."""
    from minitron.prune.search import SearchConfig, candidates, target_of

    config = make_config("qwen2_moe")
    total = make_plan(config, _random_scores(arch.dims_of(config)), Target()).params_before["total"]
    cands = candidates(config, SearchConfig(params=0.8 * total, tolerance=0.1))
    assert cands and all((c.experts, c.top_k, c.shared_ffn) == (4, 2, 48) for c in cands)
    assert resolve_dims(config, target_of(cands[0], SearchConfig())) == cands[0]
    # with the experts axis free: fewer experts per layer (never below top-k), the rest of the shape kept
    cands = candidates(config, SearchConfig(params=0.7 * total, tolerance=0.1, axes=["experts", "ffn"]))
    assert {c.experts for c in cands} == {2, 3} and all(c.hidden == 64 and c.top_k == 2 for c in cands)
    assert resolve_dims(config, target_of(cands[0], SearchConfig())) == cands[0]
    with pytest.raises(PlanError, match="dense model"):
        candidates(make_config("llama"), SearchConfig(params=1e5, axes=["experts"]))


@pytest.mark.parametrize("how", ["mean", "l2", "max", "var"])
def test_routed_aggregate_equals_the_masked_sequence_aggregate(how):
    """An expert's neurons are aggregated from its routed tokens alone, as seq_aggregate would over a mask."""
    from minitron.arch.moe import routed_aggregate
    from minitron.prune.importance import seq_aggregate

    torch.manual_seed(0)
    B, T, F = 3, 7, 5
    mask = torch.rand(B, T) < 0.4
    mask[1] = False  # a sample with no routed token
    x = torch.randn(B, T, F)
    rows = mask.flatten().nonzero().flatten()
    got = routed_aggregate(x.view(B * T, F)[rows], rows // T, B, how)
    torch.testing.assert_close(got, seq_aggregate(x, mask, how))


def test_weight_criteria_score_experts(tokenizer):
    """magnitude and taylor give every MoE axis (experts, per-expert neurons, shared-expert neurons) in the
    activation scores' shapes; an expert whose weights are all zero scores 0 by both and is the one dropped."""
    from minitron.prune.criteria import magnitude_scores, taylor_scores

    model = make_model("qwen2_moe")
    with torch.no_grad():
        for layer in arch.decoder_layers(model):
            p = arch.moe_parts(model, layer)
            p.experts.gate_up_proj[1] = 0
            p.experts.down_proj[1] = 0
            p.router.weight[1] = 0
    d = arch.dims_of(model.config)
    for scores in (magnitude_scores(model), taylor_scores(model, _calib(tokenizer)[:4], batch_size=4)):
        assert {k: tuple(v.shape) for k, v in scores.items()} == {
            "heads": (d.layers, 4), "kv_groups": (d.layers, 2), "channels": (d.hidden,), "experts": (d.layers, 4),
            "neurons": (d.layers, 4 * d.ffn), "shared_neurons": (d.layers, d.shared_ffn)}
        assert torch.all(scores["experts"][:, 1] == 0) and torch.all(scores["experts"][:, [0, 2, 3]] > 0)
        assert all(kept == [0, 2, 3] for kept in make_plan(model.config, scores, Target(experts=3)).experts.values())


def test_expert_scores_by_hand(tokenizer):
    """experts [L, E] and neurons [L, E*F] of layer 0 recomputed by hand from the tokens the router sent to each
    expert: per sample the mean over its routed tokens of ||y_e(x)|| (and of |act(gate) * up|), then L2 over
    samples (the paper's default aggregation, as for every other axis)."""
    model = make_model("mixtral")
    calib = _calib(tokenizer)[:6]  # [B, T]
    seen = {}
    p = arch.moe_parts(model, arch.decoder_layers(model)[0])
    handle = p.experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], idx=args[1]))
    with torch.no_grad():
        model(calib)
    handle.remove()
    scores = compute_importance(model, calib, ImportanceConfig(batch_size=6))
    B, T = calib.shape
    F = arch.dims_of(model.config).ffn
    x, idx = seen["x"].view(B, T, -1), seen["idx"].view(B, T, -1)  # [B*T, C] -> [B, T, C]; [B, T, k]
    for e in range(4):
        W = p.experts.gate_up_proj[e].detach()  # [2F, C]
        act = torch.nn.functional.silu(x @ W[:F].T) * (x @ W[F:].T)  # [B, T, F]
        y = act @ p.experts.down_proj[e].detach().T  # [B, T, C]
        routed = (idx == e).any(-1).float()  # [B, T]
        n = routed.sum(1).clamp_min(1)  # [B]
        per_sample = (y.norm(dim=-1) * routed).sum(1) / n  # [B]
        torch.testing.assert_close(scores["experts"][0, e], per_sample.norm(), rtol=1e-4, atol=1e-6)
        neurons = (act.abs() * routed[..., None]).sum(1) / n[:, None]  # [B, F]
        torch.testing.assert_close(scores["neurons"][0, e * F:(e + 1) * F], neurons.norm(dim=0), rtol=1e-4, atol=1e-6)


def test_search_pick_keeps_the_moe_axes():
    """A search row's dims (as search.json stores them) become a Target with experts, top-k and shared width:
    the pick `minitron run` prunes to is the candidate that was ranked."""
    from minitron.prune.search import SearchConfig, target_of

    d = arch.Dims(hidden=64, ffn=32, heads=4, kv_heads=2, layers=2, head_dim=16, vocab=100, tied=False,
                  experts=4, top_k=2, shared_ffn=16)
    t = target_of(arch.Dims(**json.loads(json.dumps(d.to_dict()))), SearchConfig())
    assert (t.hidden, t.ffn, t.experts, t.top_k, t.shared_ffn) == (64, 32, 4, 2, 16)
