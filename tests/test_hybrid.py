"""Hybrid Mamba2 / attention / MLP models (NemotronH): Mamba head and head-dim importance (the x segment of
in_proj, as ModelOpt ranks them), pruning Mamba heads / head dim with every dependent tensor, hidden channels
through every layer kind, depth by layer kind with the config's layer pattern rewritten; the output reloading
with from_pretrained and generating the same with and without the cache; distillation of a pruned student."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import assert_same_and_generates, distill_pair, make_text
from minitron import arch
from minitron.prune import PruneConfig, apply_plan, prune
from minitron.prune.importance import ImportanceConfig, compute_importance
from minitron.prune.plan import PlanError, PrunePlan, Target, make_plan, resolve_dims

PATTERN = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]  # M - * M -
MOE_PATTERN = ["linear_attention", "moe", "full_attention", "mlp"]  # M E * -
H, P, G = 8, 8, 2  # Mamba heads, head dim, B/C groups: 4 heads per group


def make_config(pattern=PATTERN, eps: float = 1e-5, **over):
    """A tiny NemotronH: hidden 64, 4 attention heads / 2 KV heads of dim 16, MLP 128, Mamba2 8 heads of dim 8
    in 2 groups, state 16, chunks of 16 tokens (so the chunked scan spans several chunks); MoE layers: 4 experts
    of width 32, top-2, a shared expert of width 48."""
    kw = dict(vocab_size=384, hidden_size=64, intermediate_size=128, layers_block_type=list(pattern),
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=H, mamba_head_dim=P,
              n_groups=G, ssm_state_size=16, conv_kernel=4, chunk_size=16, max_position_embeddings=256,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1,
              layer_norm_epsilon=eps, eos_token_id=0, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    kw.update(over)
    return AutoConfig.for_model("nemotron_h", **kw)


def _nontrivial_(name: str, p: torch.nn.Parameter) -> bool:
    """Norm gains around 1 and non-zero D / conv biases (a fresh model's are 1 and 0), in place; True if `name`
    was one of them."""
    if p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))
    elif name.endswith(("D", "conv1d.bias")):
        p.copy_(0.5 * torch.randn_like(p))
    else:
        return False
    return True


def make_model(seed: int = 0, **over):
    """A tiny random NemotronH in eval mode with non-trivial norm gains, per-head A/D/dt and conv biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(**over), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _nontrivial_(name, p):
                pass
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) - 1.0)
            elif name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 2.0 - 1.0)
            elif name.endswith(("experts.up_proj", "experts.down_proj")):  # [E, F, C], [E, C, F]
                p.normal_(0.0, 0.1)
            elif name.endswith("gate.weight"):  # router [E, C]: routing that depends on the token
                p.normal_(0.0, 0.3)
    return model.eval()


def _ids(tokenizer, n=4):
    return tokenizer(make_text(n), return_tensors="pt").input_ids  # [1, T]


def _calib(tokenizer) -> torch.Tensor:
    ids = _ids(tokenizer, 40)[0]
    return ids[: (ids.numel() // 32) * 32].view(-1, 32)  # [N, 32]


def _scores(d: arch.Dims) -> dict[str, torch.Tensor]:
    return {"heads": torch.rand(d.layers, d.heads), "kv_groups": torch.rand(d.layers, d.kv_heads),
            "neurons": torch.rand(d.layers, d.ffn), "channels": torch.rand(d.hidden),
            "mamba_channels": torch.rand(d.layers, d.mamba_heads * d.mamba_head_dim),
            "layer_bi": torch.rand(d.layers), "block_bi.1": torch.rand(d.layers)}


def _mambas(model):
    return [(i, layer) for i, layer in enumerate(arch.decoder_layers(model)) if "mamba" in arch.layer_parts(model)[i]]


# ---- importance ------------------------------------------------------------------------------------

def test_importance_scores_one_value_per_mamba_head(tokenizer):
    """mamba_channels is the x segment of in_proj's output, mean |x| over the sequence and L2 over samples
    (recomputed here by hand); mamba_heads [L, H] is its L2 over head-dim channels, mamba_head_dim [L, P] its L2
    over heads; layers without a Mamba mixer score zero there, as they do for heads / neurons they lack."""
    model = make_model()
    calib = _calib(tokenizer)
    scores = compute_importance(model, calib, ImportanceConfig(batch_size=4))
    L = len(PATTERN)
    assert scores["mamba_heads"].shape == (L, H) and scores["mamba_head_dim"].shape == (L, P)
    assert scores["mamba_channels"].shape == (L, H * P) and scores["channels"].shape == (64,)
    mamba_rows, other = [0, 3], [1, 2, 4]
    assert torch.all(scores["mamba_heads"][mamba_rows] > 0) and torch.all(scores["mamba_heads"][other] == 0)
    assert torch.all(scores["heads"][2] > 0) and torch.all(scores["heads"][[0, 1, 3, 4]] == 0)
    assert torch.all(scores["neurons"][[1, 4]].sum(1) > 0) and torch.all(scores["neurons"][[0, 2, 3]] == 0)
    assert scores["layer_bi"].shape == (L,) and torch.all(scores["layer_bi"] > 0)

    seen = []
    layer = arch.decoder_layers(model)[3]
    handle = arch.mamba_parts(model, layer).in_proj.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        for start in range(0, calib.shape[0], 4):
            model(calib[start:start + 4])
    handle.remove()
    x = torch.cat(seen)[..., H * P:2 * H * P]  # [N, T, I]: the x segment
    by_hand = x.abs().mean(1).square().sum(0).sqrt()  # mean over the sequence, L2 over samples: [I]
    torch.testing.assert_close(scores["mamba_channels"][3], by_hand)
    torch.testing.assert_close(scores["mamba_heads"][3], by_hand.view(H, P).norm(dim=1))
    torch.testing.assert_close(scores["mamba_head_dim"][3], by_hand.view(H, P).norm(dim=0))


# ---- width ------------------------------------------------------------------------------------------

def test_pruning_to_own_dims_is_identity(tokenizer, tmp_path):
    model = make_model()
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
        apply_plan(model, make_plan(model.config, _scores(arch.dims_of(model.config)), Target()))
        assert torch.equal(model(ids).logits, ref)
        model.save_pretrained(tmp_path / "same")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "same")(ids).logits, ref)


@torch.no_grad()
def _silence_mamba(model, heads: list[int], channel: int | None) -> None:
    """Make Mamba heads `heads` and head-dim channel `channel` of every head carry exact zeros into the gated
    norm: their x rows of in_proj and their conv1d weights and bias are zero, so x = silu(0) = 0 after the
    convolution and the scan output y = (scan of x) + D x is 0 there."""
    d = arch.dims_of(model.config)
    H, P = d.mamba_heads, d.mamba_head_dim  # noqa: N806 (the module's names for them)
    for _, layer in _mambas(model):
        p = arch.mamba_parts(model, layer)
        silent = sorted({h * P + c for h in heads for c in range(P)}
                        | ({h * P + channel for h in range(H)} if channel is not None else set()))
        idx = torch.tensor(silent)
        p.in_proj.weight[H * P + idx] = 0  # the x segment's rows
        p.conv1d.weight[idx] = 0  # [I + 2GN, 1, K]
        p.conv1d.bias[idx] = 0


@torch.no_grad()
def _undo_group_rms(model, src_group: int) -> None:
    """The gated norm's mean square over a group now divides by the pruned group size g' instead of g: its output
    is the source's times sqrt(g'/g) with eps grown by g/g'. Undo both (gain x sqrt(g/g'), eps x g/g')."""
    for _, layer in _mambas(model):
        norm = arch.mamba_parts(model, layer).norm
        ratio = src_group / norm.group_size
        norm.weight.mul_(ratio**0.5)
        norm.variance_epsilon *= ratio


def test_silent_mamba_heads_channels_neurons_and_heads_prune_exactly(tokenizer):
    """Mamba heads (one per group) and a head-dim channel that carry zeros, MLP neurons whose down_proj column is
    zero and an attention KV group whose o_proj columns are zero are removed, each dependent tensor with them
    (in_proj z/x/dt rows, conv1d, A_log, D, dt_bias, the gated norm, out_proj): the logits stay, once the gated
    norm's group size is undone (it normalizes over the heads of a group)."""
    model = make_model()
    d = arch.dims_of(model.config)
    scores = _scores(d)
    _silence_mamba(model, heads=[1, 6], channel=5)
    for i, _ in _mambas(model):
        per = scores["mamba_channels"][i].view(H, P)  # [H*P] -> [H, P]
        per[:, 5] = 1e-4  # channel 5 ranks last
        per[[1, 6]] = 1e-3  # heads 1 (group 0) and 6 (group 1) rank last in their groups
    with torch.no_grad():
        for i, layer in enumerate(arch.decoder_layers(model)):
            if "mlp" in arch.layer_parts(model)[i]:
                drop = torch.randperm(d.ffn)[:32]
                arch.mlp_output(model, layer).weight[:, drop] = 0  # [C, F]
                scores["neurons"][i, drop] = -1.0
            if "attn" in arch.layer_parts(model)[i]:
                arch.attn_output(model, layer).weight[:, 2 * d.head_dim:] = 0  # heads 2, 3 (KV group 1) silent
                scores["kv_groups"][i, 1] = -1.0
        ids = _ids(tokenizer)
        ref = model(ids).logits
        plan = make_plan(model.config, scores, Target(mamba_heads=6, mamba_head_dim=7, ffn=96, heads=2, kv_heads=1))
        assert all(h == [0, 2, 3, 4, 5, 7] for h in plan.mamba_heads.values())
        assert all(c == [0, 1, 2, 3, 4, 6, 7] for c in plan.mamba_channels.values())
        pruned = apply_plan(copy.deepcopy(model), plan)
        assert (pruned.config.mamba_num_heads, pruned.config.mamba_head_dim) == (6, 7)
        _undo_group_rms(pruned, src_group=H * P // G)
        got = pruned(ids).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", [PATTERN, MOE_PATTERN], ids=["mamba-mlp-attn", "with-moe"])
def test_silent_hidden_channels_prune_exactly(pattern, tokenizer):
    """Hidden channels that stay zero (embedding columns, and every writer into the residual stream: Mamba
    out_proj, o_proj, down_proj, the experts' and shared expert's down rows) are removed from every layer kind
    (the MoE layer's router, experts and shared expert along hidden); with the hidden RMSNorms' size change
    undone, the logits stay."""
    model = make_model(pattern=pattern)
    d = arch.dims_of(model.config)
    drop = torch.tensor([3, 17, 40, 63])
    keep = 60
    scores = _scores(d)
    scores["channels"][drop] = -1.0
    with torch.no_grad():
        arch.embedding(model).weight[:, drop] = 0
        for i, layer in enumerate(arch.decoder_layers(model)):
            parts = arch.layer_parts(model)[i]
            if "moe" in parts:
                layer.mixer.experts.down_proj[:, drop] = 0  # [E, C, F]
                layer.mixer.shared_experts.down_proj.weight[drop] = 0  # [C, Fs]
                continue
            out = (arch.mamba_parts(model, layer).out_proj if "mamba" in parts else
                   arch.attn_output(model, layer) if "attn" in parts else arch.mlp_output(model, layer))
            out.weight[drop] = 0  # [C, in]
        ids = _ids(tokenizer)
        ref = model(ids).logits
        pruned = apply_plan(copy.deepcopy(model), make_plan(model.config, scores, Target(hidden=keep)))
        norms = [n for layer in arch.decoder_layers(pruned) for n in arch.hidden_norms(pruned, layer)]
        for norm in [*norms, arch.final_norm(pruned)]:  # mean square over 60 channels, not 64
            norm.weight.mul_((d.hidden / keep) ** 0.5)
            norm.variance_epsilon *= d.hidden / keep
        got = pruned(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mamba_targets_checked():
    """Mamba heads must split evenly over the B/C groups (the message names the fix); Mamba axes on a model
    without Mamba layers, unknown layer kinds and expert axes on NemotronH's MoE layers are refused."""
    config = make_config()
    with pytest.raises(PlanError, match="n_groups.*multiple of 2"):
        resolve_dims(config, Target(mamba_heads=5))
    with pytest.raises(PlanError, match="larger than the source"):
        resolve_dims(config, Target(mamba_head_dim=9))
    with pytest.raises(PlanError, match="no Mamba layers"):
        resolve_dims(make_config(pattern=["full_attention", "mlp"]), Target(mamba_heads=4))
    with pytest.raises(PlanError, match="layer kind 'ssm' unknown"):
        resolve_dims(config, Target(layers=4, depth_types=["ssm"]))
    with pytest.raises(PlanError, match="only 1 of them"):
        resolve_dims(config, Target(layers=3, depth_types=["attention"]))
    with pytest.raises(PlanError, match="pruned along hidden and depth only"):
        resolve_dims(make_config(pattern=MOE_PATTERN), Target(experts=2))


# ---- depth ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kinds, dropped", [(["mamba"], [3]), (["mlp", "M"], [1, 3])])
def test_depth_by_layer_kind_rewrites_the_pattern(kinds, dropped, tokenizer, tmp_path):
    """depth_types drops the least important layers (by the layer metric) among the named kinds only; the
    config's layer pattern keeps the kinds of the kept layers, layer indices (the cache slots) are renumbered,
    and the output reloads and generates the same with and without the cache."""
    model = make_model()
    d = arch.dims_of(model.config)
    scores = _scores(d)
    scores["layer_bi"] = torch.tensor([0.9, 0.2, 0.1, 0.3, 0.8])
    plan = make_plan(model.config, scores, Target(layers=d.layers - len(dropped), depth_types=kinds, layer_metric="bi"))
    assert plan.dropped_layers == dropped
    pruned = apply_plan(make_model(), plan)
    want = [k for i, k in enumerate(PATTERN) if i not in dropped]
    assert pruned.config.layers_block_type == want and pruned.config.num_hidden_layers == len(want)
    assert [layer.mixer.layer_idx for layer in arch.decoder_layers(pruned)] == list(range(len(want)))
    pruned.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.hybrid_override_pattern == "".join({"linear_attention": "M", "mlp": "-",
                                                                "full_attention": "*"}[k] for k in want)
    assert_same_and_generates(reloaded, pruned, _ids(tokenizer, 3))


def test_depth_keeps_an_attention_layer():
    """Without any attention layer transformers' NemotronH cannot generate with its cache: a plan that would drop
    the last one is refused with the fix."""
    config = make_config()
    scores = _scores(arch.dims_of(config))
    scores["layer_bi"] = torch.tensor([0.9, 0.2, 0.1, 0.3, 0.8])
    with pytest.raises(PlanError, match="drops every full_attention layer"):
        make_plan(config, scores, Target(layers=4, depth_types=["attention", "mlp"], layer_metric="bi"))


# ---- the prune stage and distillation ------------------------------------------------------------------

def test_prune_stage_output_reloads_and_generates(tokenizer, corpus_dir, tmp_path):
    """Mamba heads and head dim, hidden, MLP, attention heads and depth at once through the prune stage: a plain
    HF dir that from_pretrained loads (no custom code) with the in-memory logits and the planned parameter count,
    and that generates the same with and without the cache (Mamba conv / SSM states and the KV cache)."""
    src = tmp_path / "src"
    make_model().save_pretrained(src)
    tokenizer.save_pretrained(src)
    target = Target(mamba_heads=4, mamba_head_dim=6, hidden=48, ffn=96, heads=2, kv_heads=1, layers=4,
                    layer_metric="bi")
    out = prune(PruneConfig(model=str(src), out=str(tmp_path / "out"), calib_data=str(corpus_dir), calib_samples=8,
                            heldout_samples=2, seq_len=32, batch_size=4, device="cpu", target=target))
    plan = PrunePlan.load(out / "plan.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    d = arch.dims_of(reloaded.config)
    assert (d.mamba_heads, d.mamba_head_dim, d.hidden, d.ffn, d.heads, d.kv_heads, d.layers) == (4, 6, 48, 96, 2, 1, 4)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after["total"]
    assert all(len(h) == 4 and sum(x < 4 for x in h) == 2 for h in plan.mamba_heads.values())  # 2 per group
    assert_same_and_generates(reloaded, apply_plan(make_model(), plan), _ids(tokenizer, 3))


def test_pruned_hybrid_student_distills(tokenizer, corpus_dir, tmp_path):
    teacher = make_model()
    d = arch.dims_of(teacher.config)
    student = apply_plan(make_model(), make_plan(teacher.config, _scores(d),
                                                 Target(mamba_heads=4, hidden=48, layers=4, layer_metric="bi")))
    out, info = distill_pair(teacher, student, tokenizer, corpus_dir, tmp_path)
    assert info["finished"] and info["steps"] == 6
    assert info["first_eval"]["val_kl"] > 0.005  # pruning moved the student away from the teacher
    assert info["final_eval"]["val_kl"] < info["first_eval"]["val_kl"]
    assert AutoModelForCausalLM.from_pretrained(out).config.mamba_num_heads == 4


def test_budget_shrinks_mamba_heads_with_hidden_and_mlp():
    """A parameter budget on NemotronH shrinks the Mamba heads by the common ratio of hidden and MLP (whole heads
    per B/C group, head dim kept), every hidden / MLP split of the prune stage included; target.mamba_heads fixes
    them instead."""
    from minitron.prune.plan import budget_splits, config_with_dims, count_params

    config = make_config()
    budget = 0.6 * count_params(config)["total"]
    d = resolve_dims(config, Target(params=budget, split="ratio"))
    assert d.mamba_heads < H and d.mamba_heads % G == 0 and d.mamba_head_dim == P and d.hidden < 64
    assert count_params(config_with_dims(config, d))["total"] <= budget
    splits = [resolve_dims(config, t) for t in budget_splits(config, Target(params=budget))]
    assert splits and all(s.mamba_heads % G == 0 and s.mamba_heads < H for s in splits)
    fixed = resolve_dims(config, Target(params=budget, mamba_heads=H))
    assert fixed.mamba_heads == H and count_params(config_with_dims(config, fixed))["total"] <= budget


def test_search_candidates_prune_mamba_heads():
    """search.axes may free mamba_heads: candidates keep whole heads per B/C group, and each candidate's Target
    (search.target_of) resolves back to its dims."""
    from minitron.prune.plan import count_params
    from minitron.prune.search import SearchConfig, candidates, target_of

    config = make_config()
    cfg = SearchConfig(params=0.85 * count_params(config)["total"], tolerance=0.15, axes=["hidden", "mamba_heads"],
                       layer_metric="bi")
    found = candidates(config, cfg)
    assert {d.mamba_heads for d in found} > {8} and all(d.mamba_heads % G == 0 for d in found)
    for d in found:
        assert resolve_dims(config, target_of(d, cfg)) == d


def test_search_skips_depth_candidates_that_drop_the_only_attention_layer(tokenizer, tmp_path):
    """A depth candidate whose least important block holds NemotronH's only attention layer is refused by the
    planner: the search skips it with the reason (printed, listed after the ranked rows, a 'skipped' row in
    search.md) and ranks the rest; when every candidate is refused, the search says why."""
    from minitron.prune.plan import count_params
    from minitron.prune.search import SearchConfig, save_table, search

    model = make_model()
    d = arch.dims_of(model.config)
    scores = _scores(d)
    scores["block_bi.2"] = torch.tensor([0.9, 0.1, 0.8, 0.7])  # blocks of 2: the best one (1-2) holds layer 2
    cfg = SearchConfig(params=0.8 * count_params(model.config)["total"], tolerance=0.3, axes=["hidden", "layers"],
                       layer_fractions=[0.6, 1.0], layer_metric="bi")
    rows = search(model, scores, _calib(tokenizer)[:2], cfg, batch_size=2)
    ranked = [r for r in rows if "skipped" not in r]
    skipped = rows[len(ranked):]
    assert ranked and skipped and all("skipped" in r for r in skipped)
    assert all(r["dims"]["layers"] == 5 for r in ranked) and all(r["dims"]["layers"] == 3 for r in skipped)
    assert all("drops every full_attention layer" in r["skipped"] for r in skipped)
    table = (save_table(rows, tmp_path, cfg) / "search.md").read_text()
    assert table.count("| — |") >= len(skipped) and "skipped: the plan drops every full_attention layer" in table
    with pytest.raises(PlanError, match="every search candidate was refused.*full_attention"):
        search(model, scores, _calib(tokenizer)[:2], SearchConfig(
            params=cfg.params, tolerance=0.3, axes=["layers"], layer_fractions=[0.6], layer_metric="bi"))


def test_moe_layers_prune_along_hidden_and_depth(tokenizer, corpus_dir, tmp_path):
    """A NemotronH with an MoE layer through the prune stage (Mamba heads, hidden, MLP, depth dropping the MoE
    layer's neighbour or itself by BI): the output reloads with from_pretrained and generates the same with and
    without the cache; own dims stay identical."""
    model = make_model(pattern=MOE_PATTERN)
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = model(ids).logits
        same = apply_plan(copy.deepcopy(model), make_plan(model.config, _scores(arch.dims_of(model.config)), Target()))
        assert torch.equal(same(ids).logits, ref)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = prune(PruneConfig(model=str(src), out=str(tmp_path / "out"), calib_data=str(corpus_dir), calib_samples=8,
                            heldout_samples=2, seq_len=32, batch_size=4, device="cpu",
                            target=Target(mamba_heads=4, hidden=48, ffn=96, layers=3, layer_metric="bi",
                                          depth_types=["mlp", "moe"])))
    plan = PrunePlan.load(out / "plan.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.hidden_size == 48 and len(reloaded.config.layers_block_type) == 3
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after["total"]
    assert_same_and_generates(reloaded, apply_plan(make_model(pattern=MOE_PATTERN), plan), _ids(tokenizer, 3))



# ---- Mamba2 (Mamba layers only; hidden x expand = heads x head_dim) ----------------------------------------

def make_mamba2(seed: int = 0):
    """A tiny Mamba2: hidden 64, 3 layers, 8 heads of dim 16 (expand 2) in 2 groups, state 16, chunks of 16."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("mamba2", vocab_size=384, hidden_size=64, num_hidden_layers=3, num_heads=8,
                                  head_dim=16, expand=2, n_groups=2, state_size=16, conv_kernel=4, chunk_size=16,
                                  eos_token_id=0, pad_token_id=0, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _nontrivial_(name, p)
    return model.eval()


def test_mamba2_heads_prune_exactly_and_identity(tokenizer):
    """Mamba2: own dims are the identity; silent heads (two per group) prune exactly once the gated norm's group
    size is undone, config.expand rewritten (4 x 16 = 64 x 1); importance scores one value per head; inner widths
    that hidden does not divide are refused."""
    model = make_mamba2()
    d = arch.dims_of(model.config)
    assert (d.mamba_heads, d.mamba_head_dim, d.layers, d.heads) == (8, 16, 3, 0)
    ids = _ids(tokenizer)
    scores = compute_importance(model, _calib(tokenizer), ImportanceConfig(batch_size=4))
    assert scores["mamba_heads"].shape == (3, 8) and torch.all(scores["mamba_heads"] > 0)
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(apply_plan(copy.deepcopy(model), make_plan(model.config, scores, Target()))(ids).logits, ref)
        _silence_mamba(model, heads=[2, 3, 5, 6], channel=None)
        ref = model(ids).logits
        for i in range(3):
            scores["mamba_channels"][i].view(8, 16)[[2, 3, 5, 6]] = 1e-3  # [H*P] -> [H, P]: rank last in their groups
        with pytest.raises(PlanError, match="whole multiple of hidden=64"):  # 6 x 16 = 96 inner, expand 1.5
            make_plan(model.config, scores, Target(mamba_heads=6))
        plan = make_plan(model.config, scores, Target(mamba_heads=4))
        assert all(h == [0, 1, 4, 7] for h in plan.mamba_heads.values())
        pruned = apply_plan(copy.deepcopy(model), plan)
        assert pruned.config.expand == 1
        _undo_group_rms(pruned, src_group=8 * 16 // 2)
        got = pruned(ids).logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mamba2_prune_stage_reloads_generates_and_distills(tokenizer, corpus_dir, tmp_path):
    """Mamba2 heads, hidden and depth through the prune stage: the output reloads (expand rewritten), generates
    the same with and without the cache, and distills from the unpruned teacher."""
    src = tmp_path / "src"
    teacher = make_mamba2()
    teacher.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = prune(PruneConfig(model=str(src), out=str(tmp_path / "out"), calib_data=str(corpus_dir), calib_samples=8,
                            heldout_samples=2, seq_len=32, batch_size=4, device="cpu",
                            target=Target(mamba_heads=4, hidden=32, layers=2, layer_metric="bi")))
    plan = PrunePlan.load(out / "plan.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    c = reloaded.config
    assert (c.num_heads, c.head_dim, c.hidden_size, c.expand, c.num_hidden_layers) == (4, 16, 32, 2, 2)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after["total"]
    assert_same_and_generates(reloaded, apply_plan(make_mamba2(), plan), _ids(tokenizer, 3))
    _, info = distill_pair(teacher, reloaded, tokenizer, corpus_dir, tmp_path / "kd")
    assert info["finished"] and info["final_eval"]["val_kl"] < info["first_eval"]["val_kl"]


# ---- report ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, panels", [
    (make_model, ["heads", "neurons", "mamba_heads", "channels", "layer_bi"]),
    (make_mamba2, ["mamba_heads", "channels", "layer_bi"]),  # attention-free: heads [L, 0], neurons [L, 0]
], ids=["nemotron_h", "mamba2"])
def test_importance_plot_panels_follow_the_scores(build, panels, tokenizer, tmp_path):
    """importance.png draws a panel only for the axes the scores hold: a Mamba head heatmap (mamba_heads [L, H])
    beside the attention and MLP panels of NemotronH; Mamba2 (no attention, no MLP) gets no heads or neuron
    panel instead of crashing."""
    from minitron.eval.report import importance_panels, plot_importance

    scores = compute_importance(build(), _calib(tokenizer), ImportanceConfig(batch_size=4))
    assert importance_panels(scores) == panels
    path = plot_importance(scores, tmp_path / "importance.png", title="t")
    assert path.stat().st_size > 1000


def test_depth_pruning_keeps_the_first_cache_layer():
    """transformers reads the cached length from the first layer's cache: a NemotronH whose first layer is an MLP
    cannot generate with its cache (DummyLayer has no get_seq_length). Depth pruning never drops the first layer
    that holds a cache, by depth_types, contiguous block or scattered layers, however unimportant it scores; Mamba2
    (every layer holds one) and dense families are free."""
    from minitron.prune.plan import choose_layers

    config = make_config()  # M - * M -
    keep = arch.first_cache_layer(config)
    assert keep == 0 and arch.first_cache_layer(make_config(["mlp", "full_attention", "mlp"])) == 1
    assert arch.first_cache_layer(AutoConfig.for_model("llama")) is None
    n = len(PATTERN)
    scores = {"layer_lm_loss": torch.arange(n, dtype=torch.float32),            # layer 0 the least important
              "block_lm_loss.2": torch.arange(n - 1, dtype=torch.float32)}
    depth = Target(layer_metric="lm-loss", depth_types=["mamba", "mlp"])
    allowed = [i for i, k in enumerate(PATTERN) if k in ("linear_attention", "mlp")]
    assert choose_layers(scores, n, 1, depth, allowed, keep)[0] == [1]
    assert choose_layers(scores, n, 1, depth, allowed, None)[0] == [0]            # what it chose before
    assert choose_layers(scores, n, 2, Target(layer_metric="lm-loss"), None, keep)[0] == [1, 2]
    assert choose_layers(scores, n, 2, Target(layer_metric="lm-loss", contiguous=False), None, keep)[0] == [1, 2]
    plan = make_plan(config, {**_scores(arch.dims_of(config)), "layer_lm_loss": scores["layer_lm_loss"]},
                     Target(layers=4, layer_metric="lm-loss", depth_types=["mamba", "mlp"]))
    assert 0 not in plan.dropped_layers
