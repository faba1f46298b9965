"""Per-layer widths (issue 26): the allocation across layers, the trimmed model, its three outputs (HF dir with
per_layer_config read back by minitron, zero-padded stock HF dir, GGUF arch deci run by llama.cpp), the prune stage
choosing the normalization, distillation of such a student, and the refusals."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model
from minitron import arch
from minitron.arch import layerwise
from minitron.arch.models import load_model, save_model
from minitron.prune import PruneConfig, apply_plan, prune
from minitron.prune import per_layer as P
from minitron.prune.plan import PlanError, PrunePlan, Target, make_plan

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
FAMS = list(layerwise.PER_LAYER_FAMILIES)


def scores_for(model, seed: int = 0, skew=(1.0, 5.0, 0.2, 1.0)) -> dict:
    """Random scores whose layers differ in size (layer 1's neurons 5x, layer 2's 0.2x), with output norms."""
    d = arch.dims_of(model.config)
    g = torch.Generator().manual_seed(seed)
    s = {"heads": torch.rand(d.layers, d.heads, generator=g), "kv_groups": torch.rand(d.layers, d.kv_heads, generator=g),
         "neurons": torch.rand(d.layers, d.ffn, generator=g) * torch.tensor(skew)[:, None],
         "channels": torch.rand(d.hidden, generator=g)}
    return {**s, **P.output_norms(model)}


def per_layer_model(family: str, drop_parts: bool = True, axes=("ffn", "kv_heads")):
    model = make_model(family)
    t = Target(hidden=48, ffn=64, heads=2, kv_heads=1, layer_widths=list(axes), layer_norm="raw", drop_parts=drop_parts)
    plan = make_plan(model.config, scores_for(model), t)
    return apply_plan(model, plan).eval(), plan


def test_allocation_keeps_the_uniform_totals_floors_and_blocks():
    score = torch.tensor([[9.0, 8, 7, 6], [1, 1, 1, 1], [5, 5, 0, 0]])  # [L=3, U=4]
    assert P.allocate(score, 6, 1, [0, 0, 0]) == [4, 0, 2]
    assert P.allocate(score, 6, 1, [1, 1, 1]) == [4, 1, 1]            # every layer keeps its floor
    assert P.allocate(score, 6, 2, [0, 0, 0]) == [4, 0, 2]            # whole blocks of 2
    assert sum(P.allocate(torch.rand(5, 64), 5 * 24, 8, [8] * 5)) == 5 * 24
    with pytest.raises(ValueError, match="floors"):
        P.allocate(score, 2, 1, [1, 1, 1])


def test_normalizations_compare_layers_differently():
    """mean makes each layer's scale irrelevant (only the spread within a layer counts); raw follows the scale;
    contribution multiplies by the output weights' norms."""
    model = make_model("llama")
    s = scores_for(model)
    raw, mean, contrib = (P.normalized(s, "neurons", n) for n in ("raw", "mean", "contribution"))
    assert torch.allclose(mean.mean(dim=1), torch.ones(4))
    assert raw[1].mean() > 20 * raw[2].mean()
    assert torch.allclose(contrib, raw * s["neuron_out_norm"])
    with pytest.raises(ValueError, match="output-weight norms"):
        P.normalized({"neurons": s["neurons"]}, "neurons", "contribution")


@pytest.mark.parametrize("family", FAMS)
def test_plan_spreads_the_uniform_totals_and_the_model_saves_and_reloads_exactly(family, tmp_path, tokenizer):
    model, plan = per_layer_model(family)
    uniform = make_plan(make_model(family).config, scores_for(make_model(family)), Target(hidden=48, ffn=64, heads=2,
                                                                                          kv_heads=1))
    w = plan.per_layer["widths"]
    assert sum(x["ffn"] for x in w) == 4 * 64 and sum(x["kv_heads"] for x in w) == 4 * 1
    assert all(x["ffn"] % 8 == 0 and x["heads"] == 2 * x["kv_heads"] for x in w)
    assert w[0]["kv_heads"] >= 1                     # layer 0 keeps its attention (llama.cpp's deci needs it)
    assert len({x["ffn"] for x in w}) > 1 and w[1]["ffn"] > w[2]["ffn"]  # layer 1's neurons score 5x layer 2's
    skipped_norms = sum(48 for x in w if not x["kv_heads"]) + sum(48 for x in w if not x["ffn"])
    assert plan.params_after["total"] == uniform.params_after["total"] - skipped_norms  # equal but the dropped norms
    assert sum(p.numel() for p in model.parameters()) == plan.params_after["total"]
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    save_model(model, tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["per_layer_config"] and "allow_global_per_layer_attribute_access" not in cfg
    back, _ = load_model(str(tmp_path / "m"))
    assert [x for x in layerwise.layer_widths(back.config)] == [layerwise.LayerWidth(x["heads"], x["kv_heads"], x["ffn"])
                                                                for x in w]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)
        out = back.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
        assert torch.equal(out, model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("family", FAMS)
def test_zero_padded_copy_loads_in_stock_transformers_with_the_same_logits(family, tmp_path):
    model, _ = per_layer_model(family)
    padded = layerwise.pad_to_uniform(model)
    padded.save_pretrained(tmp_path / "pad")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pad").eval()
    c = stock.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (
        max(x.ffn for x in layerwise.layer_widths(model.config)), 4, 2)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_gguf_is_deci_with_per_layer_arrays_and_zero_mlps(tokenizer, tmp_path):
    from gguf import GGUFReader

    from minitron.export.gguf import export_gguf

    model, plan = per_layer_model("llama")
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    r = GGUFReader(str(tmp_path / "m.gguf"))

    def array(key):
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    w = plan.per_layer["widths"]
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "deci"
    assert array("deci.attention.head_count") == [x["heads"] for x in w]
    assert array("deci.attention.head_count_kv") == [x["kv_heads"] for x in w]
    # a layer with attention and no MLP gets a zero MLP of 32 (deci drops such a layer's attention output)
    assert array("deci.feed_forward_length") == [x["ffn"] or (32 if x["heads"] else 0) for x in w]
    names = {t.name for t in r.tensors}
    for i, x in enumerate(w):
        assert (f"blk.{i}.attn_norm.weight" in names) == bool(x["heads"])
        assert (f"blk.{i}.ffn_down.weight" in names) == bool(x["ffn"] or x["heads"])


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python not installed (extra gguf-runtime)")
@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("drop_parts", [False, True], ids=["floors", "drop-parts"])
def test_llama_cpp_runs_the_deci_file_like_minitron(family, drop_parts, tokenizer, tmp_path):
    """llama.cpp's deci graph gives minitron's in-memory logits (f32 file, f32 KV cache, 1e-5 as the other
    families), with layers that have no attention and no MLP."""
    from minitron.export import runtime as R
    from minitron.export.gguf import export_gguf

    model, plan = per_layer_model(family, drop_parts=drop_parts)
    ids = torch.randint(1, 384, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    llm = R.load(tmp_path / "m.gguf", n_ctx=64, logits_all=True, kv_f32=True)
    got = R.logits(llm, ids[0].tolist())
    llm.close()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_prune_stage_chooses_the_normalization_by_held_out_loss(tokenizer, corpus_dir, tmp_path):
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    tokenizer.save_pretrained(src)
    target = Target(params="95k", layer_widths=["ffn", "kv_heads"], round_to=8, layer_norm="loss")
    out = prune(PruneConfig(model=str(src), out=str(tmp_path / "out"), calib_data=str(corpus_dir), calib_samples=8,
                            heldout_samples=2, seq_len=32, batch_size=4, device="cpu", target=target))
    metrics = json.loads((out / "prune_metrics.json").read_text())
    table = metrics["layer_norms"]
    assert sorted(r["norm"] for r in table) == sorted(P.NORMS) and table[0]["loss_pruned"] <= table[-1]["loss_pruned"]
    plan = PrunePlan.load(out / "plan.json")
    assert plan.per_layer["norm"] == table[0]["norm"] and len(plan.per_layer["widths"]) == 4
    assert (out / "layer_widths.png").stat().st_size > 1000
    model, _ = load_model(str(out))
    assert sum(p.numel() for p in model.parameters()) == plan.params_after["total"]
    assert abs(metrics["heldout_loss_after"] - table[0]["loss_pruned"]) < 5.0  # same model, other blocks


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "mixtral", "olmo2"])
def test_families_without_llama_math_are_refused_before_any_weight(family):
    config = make_model(family).config
    with pytest.raises(PlanError, match="Llama-math families only.*uniform"):
        make_plan(config, {}, Target(ffn=16, layer_widths=["ffn"]))


@pytest.mark.parametrize("over, match", [({"layer_widths": ["heads"]}, "choose one or both of ffn, kv_heads"),
                                         ({"layer_norm": "zscore"}, "layer_norm 'zscore' unknown"),
                                         ({"layer_floor": 1.5}, r"layer_floor 1.5 must be")])
def test_bad_per_layer_targets_are_refused(over, match):
    config = make_model("llama").config
    with pytest.raises(PlanError, match=match):
        make_plan(config, {}, Target(ffn=64, **{"layer_widths": ["ffn"], **over}))


def vllm_weights(cfg: dict) -> dict[str, tuple]:
    """{weight name: shape} that vLLM's DeciLMForCausalLM builds from a nemotron-nas config.json, by the rules of
    vllm/model_executor/models/nemotron_nas.py (written here from that code, not from minitron's writer): query heads
    config.num_attention_heads in every attention layer, KV heads heads // n_heads_in_group, MLP width
    int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256, no norm before a no-op part, q/k/v biases under
    qkv_bias (o_proj's too under attention_bias), lm_head skipped when tied."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads

    def width(mult):
        n = int(2 * mult * h / 3)
        return n if n % 256 == 0 else n + 256 - n % 256

    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (cfg["vocab_size"], h)
    qkv_bias = cfg.get("qkv_bias", cfg.get("attention_bias", False))
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            kv = heads // block["attention"]["n_heads_in_group"]
            out |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (heads * hd, h),
                    p + "self_attn.k_proj.weight": (kv * hd, h), p + "self_attn.v_proj.weight": (kv * hd, h),
                    p + "self_attn.o_proj.weight": (h, heads * hd)}
            if qkv_bias:
                out |= {p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                        p + "self_attn.v_proj.bias": (kv * hd,)}
            if cfg.get("attention_bias"):
                out[p + "self_attn.o_proj.bias"] = (h,)
        if not block["ffn"]["no_op"]:
            f = width(block["ffn"]["ffn_mult"])
            out |= {p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f)}
    return out


@pytest.mark.parametrize("family", FAMS)
def test_nemotron_nas_layout_is_what_vllm_builds(family, tokenizer, tmp_path):
    from safetensors import safe_open

    from minitron.export.per_layer import write_nemotron_nas

    model = make_model(family, intermediate_size=1024)
    t = Target(hidden=48, ffn=512, layer_widths=["ffn"], round_to=256, drop_parts=True, layer_norm="raw")
    plan = make_plan(model.config, scores_for(model), t)
    apply_plan(model, plan)
    out = write_nemotron_nas(model, tokenizer, tmp_path / "nas")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert "per_layer_config" not in cfg and len(cfg["block_configs"]) == 4
    assert [b["ffn"].get("intermediate_size", 0) for b in cfg["block_configs"]] == [w["ffn"] for w in plan.per_layer["widths"]]
    with safe_open(out / "model.safetensors", "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert got == vllm_weights(cfg)


def test_nemotron_nas_refuses_what_vllm_would_build_differently(tokenizer, tmp_path):
    from minitron.export.per_layer import PerLayerExportError, write_nemotron_nas

    model, _ = per_layer_model("llama", axes=("ffn", "kv_heads"))
    with pytest.raises(PerLayerExportError, match="same query heads"):
        write_nemotron_nas(model, tokenizer, tmp_path / "a")
    model, _ = per_layer_model("llama", axes=("ffn",))
    with pytest.raises(PerLayerExportError, match="multiple of 256.*round_to=256"):
        write_nemotron_nas(model, tokenizer, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export_writes_the_padded_and_gguf_layouts(tokenizer, tmp_path, capsys):
    from minitron.cli import main

    model, _ = per_layer_model("llama")
    save_model(model, tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    main(["export", "--model", str(tmp_path / "m"), "--gguf", "f16", "--out", str(tmp_path / "m.gguf"),
          "--padded", str(tmp_path / "pad")])
    assert "deci" in capsys.readouterr().out and (tmp_path / "m.gguf").stat().st_size > 10_000
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pad")
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_recipe_with_per_layer_widths_end_to_end(tokenizer, corpus_dir, tmp_path):
    """`minitron run` with target.layer_widths on a tiny Llama: prune (widths by measured per-layer loss), distill the
    per-layer student (checkpoints included), evaluate it, export it with its padded copy and a deci GGUF; the
    report and the model card show the widths."""
    from minitron.pipeline import RunConfig, run
    from minitron.pipeline.config import load_config

    teacher = tmp_path / "teacher"
    model = make_model("llama")
    with torch.no_grad():  # layer 1's MLP 4x the others': narrowing it costs more loss, it keeps more neurons
        model.model.layers[1].mlp.up_proj.weight.mul_(4.0)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "run"
    over = {"out": str(out), "model.teacher": str(teacher), "model.device": "cpu", "data.corpus": str(corpus_dir),
            "data.seq_len": 32, "importance.calib_samples": 8, "importance.heldout_samples": 4,
            "importance.batch_size": 4, "target.params": 110000, "target.layer_widths": "[ffn,kv_heads]",
            "target.drop_parts": "true", "distill.tokens": 768, "distill.batch_size": 4, "distill.eval_every": 2,
            "distill.save_every": 2, "eval.tasks": f"loss:{corpus_dir}", "eval.limit": 4, "eval.batch_size": 4,
            "export.padded": "true", "export.gguf": "f32"}
    run(load_config(RunConfig, None, [f"{k}={v}" for k, v in over.items()]))
    plan = PrunePlan.load(out / "prune" / "plan.json")
    assert plan.per_layer["widths"] and json.loads((out / "export" / "config.json").read_text())["per_layer_config"]
    student, _ = load_model(str(out / "export"))
    assert sum(p.numel() for p in student.parameters()) == plan.params_after["total"]
    stock = AutoModelForCausalLM.from_pretrained(out / "export" / "padded")
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, student(ids).logits, atol=1e-5, rtol=0)
    assert list((out / "export").glob("*.gguf"))
    report, card = (out / "report.md").read_text(), (out / "export" / "README.md").read_text()
    assert "## Per-layer widths" in report and "layer_widths.png" in report
    assert "## Per-layer widths" in card and "padded/" in card and "load_model(PATH)" in card


def test_search_prunes_every_candidate_per_layer(tokenizer):
    """search.layer_widths: candidates are pruned with per-layer widths (what the trained students are), and the
    pick's Target keeps them for the prune stage."""
    from conftest import make_text
    from minitron.data import pack
    from minitron.prune.importance import ImportanceConfig, compute_importance
    from minitron.prune.search import SearchConfig, search, target_of

    model = make_model("qwen2")
    blocks = pack([make_text(300, seed=8)], tokenizer, 32)
    scores = compute_importance(model, blocks[:8], ImportanceConfig(batch_size=4))
    cfg = SearchConfig(params=110_000, tolerance=0.15, round_to=8, max_candidates=1, axes=["hidden", "ffn"],
                       layer_widths=["ffn"])
    widths = []

    def train(student):
        widths.append([w.ffn for w in layerwise.layer_widths(student.config)])
        return student

    rows = search(model, scores, blocks[8:12], cfg, train=train, batch_size=4)
    assert widths and len(widths[0]) == 4
    pick = target_of(arch.Dims(**rows[0]["dims"]), cfg)
    assert pick.layer_widths == ["ffn"] and make_plan(model.config, scores, pick).per_layer["widths"]


def test_plan_estimate_says_how_per_layer_widths_are_counted(tokenizer, tmp_path):
    from minitron.pipeline import RunConfig
    from minitron.pipeline.config import load_config
    from minitron.pipeline.estimate import report, resolve_shapes

    teacher = tmp_path / "teacher"
    make_model("llama").save_pretrained(teacher)
    uniform = load_config(RunConfig, None, [f"model.teacher={teacher}", "model.device=cpu", "target.params=110000"])
    per = load_config(RunConfig, None, [f"model.teacher={teacher}", "model.device=cpu", "target.params=110000",
                                        "target.layer_widths=[ffn]"])
    text = report(per)
    assert "per-layer ffn: the uniform widths' totals; a single layer taken as wide as the source's" in text
    u, p = resolve_shapes(uniform), resolve_shapes(per)
    assert p["student"].params == u["student"].params and p["student"].layer_params > u["student"].layer_params
    # with a budget, the measurement's probes are part of the prune stage's estimated minutes
    from minitron.pipeline.budget import estimate_lines

    def prune_minutes(cfg):
        lines = estimate_lines(cfg, resolve_shapes(cfg), 1, False, tflops=1e-6)  # a slow device: tiny FLOPs show
        return float(next(x for x in lines if x.startswith("| prune")).split("|")[2])

    budget = ["budget.minutes=5", f"model.teacher={teacher}", "model.device=cpu", "target.params=110000",
              "data.seq_len=256"]
    assert prune_minutes(load_config(RunConfig, None, [*budget, "target.layer_widths=[ffn]"])) > prune_minutes(
        load_config(RunConfig, None, budget))


def test_a_per_layer_model_is_not_pruned_again_and_iterative_recipes_say_so(tmp_path):
    from minitron.pipeline import RunConfig
    from minitron.pipeline.config import ConfigError, load_config

    model, _ = per_layer_model("llama")
    with pytest.raises(PlanError, match="already has per-layer widths.*prune its uniform source"):
        make_plan(model.config, {}, Target(ffn=32))
    with pytest.raises(ConfigError, match="not pruned again: iterative.budgets"):
        load_config(RunConfig, None, ["iterative.budgets=[150000,120000]", "target.layer_widths=[ffn]"])


def test_measured_curves_zero_exactly_what_pruning_removes(tokenizer):
    """`measured`: a probe zeroes the output weights of a layer's dropped units, which gives the logits of that layer
    pruned (its MLP sliced to the kept neurons; its attention to the kept KV groups); the unit values follow the
    loss saved per unit, and the weights are restored after every probe."""
    import copy

    from minitron.arch.adapters import slice_linear

    model = make_model("llama")
    s = scores_for(model)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = arch.decoder_layers(model)[1]
    keep = torch.argsort(s["neurons"][1], descending=True)[:40].sort().values
    sliced = copy.deepcopy(model)
    mlp = arch.decoder_layers(sliced)[1].mlp
    slice_linear(mlp.gate_proj, out_idx=keep)
    slice_linear(mlp.up_proj, out_idx=keep)
    slice_linear(mlp.down_proj, in_idx=keep)
    with torch.no_grad(), P._zeroed(model, layer, s["neurons"][1], 40, "ffn"):
        torch.testing.assert_close(model(ids).logits, sliced(ids).logits, atol=1e-5, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a probe runs from its layer on, from what enters that layer: the same loss as the whole model
    from minitron.arch.models import lm_loss

    inputs = P.layer_inputs(model, ids, batch_size=1)
    for start in (0, 2, 3):
        assert abs(P.suffix_loss(model, start, inputs[start], ids, batch_size=1) - lm_loss(model, ids, 1)) < 1e-5
    d = arch.dims_of(model.config)
    curves = P.measure_curves(model, s, ids, arch.Dims(**{**d.to_dict(), "ffn": 64, "kv_heads": 1, "heads": 2}),
                              ["ffn", "kv_heads"], batch_size=2)
    assert curves["neuron_measured"].shape == (4, 128) and curves["kv_measured"].shape == (4, 2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    t = Target(hidden=48, ffn=64, heads=2, kv_heads=1, layer_widths=["ffn", "kv_heads"], layer_norm="measured")
    plan = make_plan(model.config, {**s, **curves}, t)
    assert sum(w["ffn"] for w in plan.per_layer["widths"]) == 4 * 64


@pytest.mark.parametrize("family", FAMS)
def test_a_probe_from_its_layer_on_gives_the_whole_models_loss(family):
    from minitron.arch.models import lm_loss

    model = make_model(family)
    ids = torch.randint(0, 384, (3, 40), generator=torch.Generator().manual_seed(1))
    inputs = P.layer_inputs(model, ids, batch_size=2)
    assert [x.shape for x in inputs] == [(3, 40, 64)] * 4
    for start in range(4):
        assert abs(P.suffix_loss(model, start, inputs[start], ids, batch_size=2) - lm_loss(model, ids, 2)) < 1e-5


def test_auto_dtype_reads_the_checkpoints_own(tokenizer, tmp_path):
    model, _ = per_layer_model("qwen2")
    save_model(model.to(torch.bfloat16), tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert next(load_model(str(tmp_path / "m"), dtype="auto")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(str(tmp_path / "m"))[0].parameters()).dtype == torch.float32


def test_no_probe_below_a_layers_floor(monkeypatch):
    """Widths under the floor are never given (a layer always keeps them), so they are not probed: one probe fewer
    per layer, the same values above the floor, and the floor's units ranked first (the layer's largest value)."""
    model = make_model("llama")
    s = scores_for(model)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(5))
    dims = arch.Dims(**{**arch.dims_of(model.config).to_dict(), "ffn": 64})
    calls = []
    probe = P.suffix_loss
    monkeypatch.setattr(P, "suffix_loss", lambda *a, **k: calls.append(1) or probe(*a, **k))
    full = P.measure_curves(model, s, ids, dims, ["ffn"], batch_size=2)["neuron_measured"]      # [4, 128]
    n_full = len(calls)
    low = P.floor_units(dims, 0.25, False, 8)
    assert low == {"ffn": 16, "kv_heads": 1} and P.floor_units(dims, 0.25, True, 8) == {"ffn": 0, "kv_heads": 0}
    floored = P.measure_curves(model, s, ids, dims, ["ffn"], batch_size=2, floors=low)["neuron_measured"]
    assert n_full == 4 * 4 and len(calls) - n_full == 4 * 3  # widths 0, 16, 32, 64 (128, the whole MLP: no probe)
    torch.testing.assert_close(floored[:, 16:], full[:, 16:])
    assert torch.equal(floored[:, :16], floored[:, 16:].max(dim=1, keepdim=True).values.expand(4, 16))
