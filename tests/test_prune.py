import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, make_text
from minitron import arch
from minitron.arch.models import ModelLoadError
from minitron.data import DataError
from minitron.prune import OutputExists, PruneConfig, apply_plan, prune
from minitron.prune.plan import PlanError, PrunePlan, Target, make_plan


def _cfg(model_dir, corpus_dir, out, **kw):
    base = dict(model=str(model_dir), out=str(out), calib_data=str(corpus_dir), calib_samples=8,
                heldout_samples=2, seq_len=32, batch_size=4, device="cpu")
    return PruneConfig(**{**base, **kw})


def test_identity_plan_keeps_logits(family, tokenizer):
    model = make_model(family)
    ids = tokenizer(make_text(4), return_tensors="pt").input_ids
    ref = model(ids).logits
    d = arch.dims_of(model.config)
    scores = {"heads": torch.rand(d.layers, d.heads), "kv_groups": torch.rand(d.layers, d.kv_heads),
              "neurons": torch.rand(d.layers, d.ffn), "channels": torch.rand(d.hidden)}
    apply_plan(model, make_plan(model.config, scores, Target()))
    assert torch.equal(model(ids).logits, ref)


def test_prune_saves_a_plain_hf_model(family, tiny_model_dir, corpus_dir, tmp_path, tokenizer):
    target = Target(hidden=48, ffn=96, heads=2, kv_heads=1, layers=3)  # trimmed only: equal to apply_plan's model
    out = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "out", target=target, refit="none"))
    plan = PrunePlan.load(out / "plan.json")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "scores.safetensors", "scores.json",
                 "importance.png", "prune_metrics.json", "plan.json"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    cfg = reloaded.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.num_hidden_layers, cfg.head_dim) == (48, 96, 2, 1, 3, 16)
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == 3
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after["total"]
    assert len(plan.dropped_layers) == 1 and plan.layer_choice["how"].startswith("contiguous")
    # same logits as the in-memory pruned model
    model = make_model(family)
    apply_plan(model, plan)
    ids = tokenizer(make_text(3), return_tensors="pt").input_ids
    assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)
    # layers were renumbered: generation with a KV cache equals generation without one
    a = reloaded.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=True)
    b = reloaded.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and a.shape[1] == 14
    metrics = json.loads((out / "prune_metrics.json").read_text())
    assert metrics["params_after"] == plan.params_after and metrics["heldout_loss_after"] > 0


def test_reused_scores_give_the_same_plan(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    target = Target(params=110_000)
    first = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "a", target=target))
    second = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "b", target=target,
                        scores=str(first / "scores.safetensors")))
    assert json.loads((second / "scores.json").read_text())["meta"]["calib_samples"] == 8
    assert (first / "plan.json").read_text() == (second / "plan.json").read_text()
    # scores measured for a width cut hold no Block Importance of a depth cut: refused before the model loads
    import minitron.prune.trim as trim

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trim, "load_model", no_load)
    with pytest.raises(PlanError, match=r"block_bi\.2.*--scores is not"):
        prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "c", target=Target(layers=2, layer_metric="bi"),
                   scores=str(first / "scores.safetensors")))


@pytest.mark.parametrize("family", ["llama"])
def test_budget_split_by_heldout_loss(tiny_model_dir, corpus_dir, tmp_path):
    out = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "loss", target=Target(params=110_000)))
    table = json.loads((out / "prune_metrics.json").read_text())["budget_splits"]
    assert len(table) > 1 and table == sorted(table, key=lambda r: r["loss_pruned"])
    plan = PrunePlan.load(out / "plan.json")
    assert (plan.target["hidden"], plan.target["ffn"]) == (table[0]["hidden"], table[0]["ffn"])
    # held-out hygiene: the split was chosen on the selection blocks, the loss is reported on the others
    from minitron.arch.models import lm_loss, load_tokenizer
    from minitron.data import load_splits, report_blocks, selection_blocks

    val = load_splits(str(corpus_dir), load_tokenizer(str(out)), 32).validation
    select, report = selection_blocks(val, 2), report_blocks(val, 2)
    assert not any(torch.equal(a, b) for a in select for b in report)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    metrics = json.loads((out / "prune_metrics.json").read_text())
    assert metrics["heldout_loss_after"] == pytest.approx(lm_loss(pruned, report), rel=1e-5)
    assert table[0]["loss_pruned"] == pytest.approx(lm_loss(pruned, select), rel=1e-5)
    ratio = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "ratio", target=Target(params=110_000, split="ratio"),
                       scores=str(out / "scores.safetensors")))
    assert json.loads((ratio / "prune_metrics.json").read_text())["budget_splits"] == []
    assert PrunePlan.load(ratio / "plan.json").target["hidden"] == min(r["hidden"] for r in table)


@pytest.mark.parametrize("family", ["llama"])
def test_criteria_give_different_plans(tiny_model_dir, corpus_dir, tmp_path):
    plans = {}
    for criterion in ("activation", "magnitude", "taylor", "random"):
        out = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / criterion, target=Target(ffn=64, layers=3),
                         criterion=criterion))
        plans[criterion] = PrunePlan.load(out / "plan.json")
        assert json.loads((out / "scores.json").read_text())["meta"]["criterion"] == criterion
    assert len({tuple(p.ffn[0]) for p in plans.values()}) == 4 and len(plans["random"].ffn[0]) == 64
    # the depth choice comes from the layer metric, whatever the width criterion
    assert len({tuple(p.dropped_layers) for p in plans.values()}) == 1
    with pytest.raises(ValueError, match="holds activation scores but the criterion asked for is taylor"):
        prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "t2", target=Target(ffn=64), criterion="taylor",
                   scores=str(tmp_path / "activation" / "scores.safetensors")))


@pytest.mark.parametrize("family", ["llama"])
def test_bad_inputs(tiny_model_dir, corpus_dir, tmp_path):
    ok = dict(target=Target(hidden=32))
    with pytest.raises(PlanError, match="larger than the source"):
        prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "o1", target=Target(hidden=1000)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputExists, match="--overwrite"):
        prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "full", **ok))
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        prune(_cfg(tiny_model_dir, empty, tmp_path / "o2", **ok))
    (empty / "a.txt").write_text("only a few words")
    with pytest.raises(DataError, match="too short"):
        prune(_cfg(tiny_model_dir, empty, tmp_path / "o3", **ok))
    with pytest.raises(ModelLoadError, match="not a Hugging Face model dir"):
        prune(_cfg(tmp_path, corpus_dir, tmp_path / "o4", **ok))
    (tiny_model_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="corrupt"):
        prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "o5", **ok))
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no half-written output dirs


def test_unknown_architecture(tmp_path, corpus_dir, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=384))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(arch.UnsupportedArchitecture, match="supported families: " + ", ".join(sorted(arch.FAMILIES))):
        prune(_cfg(tmp_path / "gpt2", corpus_dir, tmp_path / "o", target=Target(hidden=16)))


@pytest.mark.parametrize("target", [Target(heads=4), Target(heads=3, kv_heads=1), Target(ffn=64)],
                         ids=["heads", "kv-groups", "neurons"])
def test_trimming_equals_masking(family, tokenizer, target):
    """Removing heads / KV groups / neurons gives exactly the logits of zeroing their output columns."""
    model = make_model(family, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    d = arch.dims_of(model.config)
    heads = torch.rand(d.layers, d.heads)
    scores = {"heads": heads, "kv_groups": heads.view(d.layers, d.kv_heads, -1).norm(dim=-1),
              "neurons": torch.rand(d.layers, d.ffn), "channels": torch.rand(d.hidden)}
    plan = make_plan(model.config, scores, target)
    ids = tokenizer(make_text(3), return_tensors="pt").input_ids
    with torch.no_grad():
        masked = make_model(family, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
        for i, layer in enumerate(arch.decoder_layers(masked)):
            o, down = arch.attn_output(masked, layer), arch.mlp_output(masked, layer)
            for h in set(range(d.heads)) - set(plan.heads[i]):
                o.weight[:, h * d.head_dim:(h + 1) * d.head_dim] = 0
            for j in set(range(d.ffn)) - set(plan.ffn[i]):
                down.weight[:, j] = 0
        pruned = apply_plan(model, plan)
        assert torch.allclose(pruned(ids).logits, masked(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["llama"])
def test_depth_by_task_accuracy(tiny_model_dir, corpus_dir, tmp_path):
    from eval_fixtures import write_task_data

    write_task_data(tmp_path / "data")
    out = prune(_cfg(tiny_model_dir, corpus_dir, tmp_path / "o", target=Target(layers=2, layer_metric="task:piqa"),
                     data_dir=str(tmp_path / "data")))
    plan = PrunePlan.load(out / "plan.json")
    scores = json.loads((out / "scores.json").read_text())
    assert plan.layer_choice["how"] == "contiguous block by task:piqa" and len(plan.dropped_layers) == 2
    assert scores["shapes"]["block_task.2"] == [3] and (out / "blocks.png").is_file()
    drops = plan.layer_choice["block_scores"]
    assert plan.dropped_layers[0] == min(range(3), key=lambda i: drops[i])
