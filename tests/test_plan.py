import pytest
import torch

from conftest import make_config, make_model
from minitron import arch
from minitron.prune.plan import (
    PlanError,
    Target,
    budget_splits,
    config_with_dims,
    count_params,
    make_plan,
    parse_count,
    parse_layer_list,
    resolve_dims,
)


def fake_scores(config, seed=0):
    d = arch.dims_of(config)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(d.layers, d.heads, generator=g)
    s = {"heads": heads, "kv_groups": heads.view(d.layers, d.kv_heads, -1).norm(dim=-1),
         "neurons": torch.rand(d.layers, d.ffn, generator=g), "channels": torch.rand(d.hidden, generator=g),
         "layer_bi": torch.rand(d.layers, generator=g), "layer_lm_loss": torch.rand(d.layers, generator=g)}
    for n in range(1, d.layers + 1):
        s[f"block_bi.{n}"] = torch.rand(d.layers - n + 1, generator=g)
        s[f"block_lm_loss.{n}"] = torch.rand(d.layers - n + 1, generator=g)
    return s


def test_parsers():
    assert parse_count("70M") == 70e6 and parse_count("1.5B") == 1.5e9 and parse_count("500k") == 5e5
    assert parse_layer_list("16-18,3") == [3, 16, 17, 18]
    with pytest.raises(PlanError):
        parse_count("seventy")
    with pytest.raises(PlanError):
        parse_layer_list("a-b")


def test_count_params_matches_model(family):
    model = make_model(family)
    assert count_params(model.config)["total"] == sum(p.numel() for p in model.parameters())


def test_gqa_plan_keeps_groups_consistent():
    config = make_config("llama", num_attention_heads=8, num_key_value_heads=2)
    scores = fake_scores(config)
    plan = make_plan(config, scores, Target(heads=4))
    for layer, kept in plan.heads.items():
        groups = [h // 4 for h in kept]
        assert groups == sorted(groups) and groups.count(0) == groups.count(1) == 2
        for g in (0, 1):  # the two best query heads of each group are kept
            best = torch.topk(scores["heads"][layer, g * 4:(g + 1) * 4], 2).indices + g * 4
            assert sorted(best.tolist()) == [h for h in kept if h // 4 == g]
    plan = make_plan(config, scores, Target(heads=4, kv_heads=1))
    for layer, kv in plan.kv_heads.items():
        assert kv == [int(scores["kv_groups"][layer].argmax())]
        assert all(h // 4 == kv[0] for h in plan.heads[layer])


def test_budget_keeps_heads_and_depth_and_fits():
    config = make_config("llama")
    plan = make_plan(config, fake_scores(config), Target(params=120_000, round_to=8))
    t = plan.target
    assert (t["heads"], t["kv_heads"], t["layers"]) == (4, 2, 4)
    assert t["hidden"] < 64 and t["ffn"] < 128
    assert plan.params_after["total"] <= 120_000
    bigger = dict(t, ffn=t["ffn"] + 8)  # one MLP rounding step more would not fit
    assert count_params(config_with_dims(config, arch.Dims(**bigger)))["total"] > 120_000


def test_budget_splits_span_hidden_from_source_to_common_ratio():
    config = make_config("llama")
    ratio = resolve_dims(config, Target(params=120_000, split="ratio"))
    splits = budget_splits(config, Target(params=120_000))
    hidden = [t.hidden for t in splits]
    assert hidden == sorted(hidden, reverse=True) and hidden[-1] == ratio.hidden and hidden[0] <= 64
    assert len(hidden) > 2 and all(h % 8 == 0 for h in hidden)
    for t in splits:  # each fits the budget with the widest MLP that does
        d = resolve_dims(config, t)
        assert count_params(config_with_dims(config, d))["total"] <= 120_000
        wider = arch.Dims(**{**d.to_dict(), "ffn": d.ffn + 8})
        assert d.ffn == 128 or count_params(config_with_dims(config, wider))["total"] > 120_000
    few = [t.hidden for t in budget_splits(config, Target(params=120_000), max_splits=3)]
    assert len(few) <= 3 and set(few) <= set(hidden) and few[-1] == hidden[-1]
    with pytest.raises(PlanError, match="split 'sideways' unknown"):
        resolve_dims(config, Target(params=120_000, split="sideways"))
    # coarse rounding (round_to 32, as for a quantized GGUF export) can leave a split whose hidden width fits
    # the budget with the whole MLP: that split keeps the MLP, it is not refused as "not smaller"
    coarse = budget_splits(config, Target(params=120_000, round_to=32))
    assert [t.hidden for t in coarse] == [32] and resolve_dims(config, coarse[0]).ffn == 128


def test_llama_hidden_stays_a_multiple_of_heads(tmp_path):
    config = make_config("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    plan = make_plan(config, fake_scores(config), Target(params=200_000, round_to=16))
    assert plan.target["hidden"] % 6 == 0 and plan.target["hidden"] < 96
    assert plan.params_after["total"] <= 200_000
    with pytest.raises(PlanError, match="multiple of 6, e.g. 48"):
        resolve_dims(config, Target(hidden=50))
    # Mistral does not demand it, and the result reloads
    from transformers import AutoConfig

    mistral = make_config("mistral", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    assert resolve_dims(mistral, Target(hidden=50)).hidden == 50
    config_with_dims(mistral, resolve_dims(mistral, Target(hidden=50))).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).hidden_size == 50


def test_non_embedding_budget():
    config = make_config("llama")
    plan = make_plan(config, fake_scores(config), Target(params=60_000, params_kind="non_embedding", round_to=8))
    assert plan.params_after["non_embedding"] <= 60_000 < plan.params_after["total"]


def test_depth_choice_contiguous_and_scattered():
    config = make_config("llama", layers=4)
    scores = fake_scores(config)
    scores["block_lm_loss.2"] = torch.tensor([0.5, 0.1, 0.9])
    scores["layer_bi"] = torch.tensor([0.9, 0.2, 0.8, 0.1])
    assert make_plan(config, scores, Target(layers=2)).dropped_layers == [1, 2]
    plan = make_plan(config, scores, Target(layers=2, layer_metric="bi", contiguous=False))
    assert plan.dropped_layers == [1, 3] and plan.kept_layers == [0, 2]
    assert make_plan(config, scores, Target(drop_layers=[0, 3])).kept_layers == [1, 2]


@pytest.mark.parametrize("target, message", [
    (Target(hidden=128), "larger than the source"),
    (Target(ffn=0), "must be positive"),
    (Target(heads=3), "cannot be split evenly"),
    (Target(heads=4, kv_heads=1), "query heads per group"),
    (Target(params=10e9), "not smaller than"),
    (Target(params=10), "below the smallest"),
    (Target(drop_layers=[7]), "has 4"),
    (Target(layers=2, drop_layers=[0]), "disagree"),
])
def test_bad_targets(target, message):
    with pytest.raises(PlanError, match=message):
        resolve_dims(make_config("llama"), target)


def test_missing_block_scores_is_explained():
    config = make_config("llama")
    scores = {k: v for k, v in fake_scores(config).items() if not k.startswith("block_lm_loss")}
    with pytest.raises(PlanError, match="block_lm_loss.2"):
        make_plan(config, scores, Target(layers=2))
