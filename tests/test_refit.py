"""The prune stage's least-squares refit of o_proj / down_proj toward the teacher's residual stream."""

import json

import pytest
import torch

from minitron.arch import adapters as arch
from minitron.arch.tiny import make_model, make_text
from minitron.pipeline.config import ConfigError, load_config
from minitron.pipeline.recipe import RunConfig
from minitron.prune.plan import Target, make_plan
from minitron.prune.refit import RefitConfig, _stream_start, refit
from minitron.prune.trim import PruneConfig, prune, pruned_copy


def _ids(tokenizer, n: int = 8, t: int = 32) -> torch.Tensor:
    ids = tokenizer(make_text(200), return_tensors="pt").input_ids[0]
    return ids[: n * t].reshape(n, t)                                                   # [N*T] -> [N, T]


def _scores(model) -> dict[str, torch.Tensor]:
    d = arch.dims_of(model.config)
    torch.manual_seed(1)
    return {"heads": torch.rand(d.layers, d.heads), "kv_groups": torch.rand(d.layers, d.kv_heads),
            "neurons": torch.rand(d.layers, d.ffn), "channels": torch.rand(d.hidden),
            "layer_bi": torch.rand(d.layers)}


@torch.no_grad()
def _final_gap(student, teacher, plan, ids) -> float:
    """Distance of the student's last-layer output from the teacher's (kept hidden channels) on ids."""
    def last(model):
        seen = []
        h = arch.decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: seen.append(arch.layer_output(o)))
        arch.backbone(model)(input_ids=ids, use_cache=False)
        h.remove()
        return seen[0]

    return float((last(student) - last(teacher)[..., plan.hidden]).norm())


@pytest.mark.parametrize("bias", [False, True])
def test_an_untrimmed_student_is_left_as_it_is(tokenizer, bias):
    """With nothing pruned the teacher's own weights are the exact fit: the refit must not move them (this pins
    the targets: residual before each sub-layer, streams aligned layer by layer, biases kept out of the fit)."""
    teacher = make_model("llama", attention_bias=bias, mlp_bias=bias)
    plan = make_plan(teacher.config, _scores(teacher), Target())
    student = pruned_copy(teacher, plan)
    rows = refit(student, teacher, plan.kept_layers, plan.hidden, _ids(tokenizer), RefitConfig(samples=8))
    assert [r["part"] for r in rows] == ["attn", "mlp"] * 4
    assert all(r["error_before"] < 1e-3 for r in rows)  # relative; fp32 round-off of the trace formula
    for a, b in zip(student.parameters(), teacher.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "nemotron"])
def test_refit_brings_the_student_closer_to_the_teacher(family, tokenizer):
    teacher = make_model(family)
    plan = make_plan(teacher.config, _scores(teacher), Target(hidden=48, ffn=64, heads=2, kv_heads=1, layers=3,
                                                                layer_metric="bi", contiguous=False))
    student = pruned_copy(teacher, plan)
    ids = _ids(tokenizer)
    gap = _final_gap(student, teacher, plan, ids)
    rows = refit(student, teacher, plan.kept_layers, plan.hidden, ids, RefitConfig(samples=8, batch_size=4))
    assert len(rows) == 6 and {r["part"] for r in rows} == {"attn", "mlp"}
    # the ridge solution never fits worse than the trimmed weights it is pulled toward
    assert all(r["error_after"] <= r["error_before"] + 1e-6 for r in rows)
    assert sum(r["error_after"] for r in rows) < 0.9 * sum(r["error_before"] for r in rows)
    assert _final_gap(student, teacher, plan, ids) < gap
    mlp_only = pruned_copy(teacher, plan)
    assert [r["part"] for r in refit(mlp_only, teacher, plan.kept_layers, plan.hidden, ids,
                                     RefitConfig(parts="mlp", samples=8))] == ["mlp"] * 3


def test_the_stream_starts_as_the_family_scales_its_embedding(tokenizer):
    model = make_model("gemma3_text")  # embeddings scaled by sqrt(hidden) inside the embedding module
    ids = _ids(tokenizer, 2)
    assert torch.allclose(_stream_start(model, ids), arch.embedding(model)(ids))


def test_families_with_output_norms_or_multipliers_are_left_trimmed(tokenizer):
    for family in ("gemma3_text", "granite"):
        teacher = make_model(family)
        plan = make_plan(teacher.config, _scores(teacher), Target(ffn=64))
        student = pruned_copy(teacher, plan)
        before = [p.clone() for p in student.parameters()]
        assert refit(student, teacher, plan.kept_layers, plan.hidden, _ids(tokenizer), RefitConfig()) == []
        assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_a_wrong_adapter_claim_is_caught(tokenizer, monkeypatch):
    """Granite scales what each sub-layer adds (residual_multiplier): claiming residual outputs must fail loudly,
    not fit the wrong target."""
    teacher = make_model("granite")
    plan = make_plan(teacher.config, _scores(teacher), Target(ffn=64))
    monkeypatch.setattr(arch, "residual_outputs", lambda model: True)
    with pytest.raises(RuntimeError, match="residual_outputs"):
        refit(pruned_copy(teacher, plan), teacher, plan.kept_layers, plan.hidden, _ids(tokenizer), RefitConfig())


def test_the_refit_is_off_by_default():
    assert PruneConfig().refit == "none" and RunConfig().prune.refit == "none"


def test_prune_records_the_refit(tiny_model_dir, corpus_dir, tmp_path, family):
    out = prune(PruneConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"), calib_data=str(corpus_dir),
                            calib_samples=8, heldout_samples=2, seq_len=32, batch_size=4, device="cpu",
                            target=Target(ffn=96, layers=3), refit="attn+mlp", refit_samples=4))
    refit_metrics = json.loads((out / "prune_metrics.json").read_text())["refit"]
    if arch.residual_outputs(make_model(family).config):
        assert refit_metrics["parts"] == "attn+mlp" and len(refit_metrics["projections"]) == 6
        assert refit_metrics["heldout_loss_trimmed"] > 0
    else:
        assert refit_metrics["parts"] == "none" and "not added" in refit_metrics["why"]


def test_bad_refit_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="refit parts 'all' unknown"):
        RefitConfig(parts="all").check()
    with pytest.raises(ValueError, match="refit parts 'all' unknown"):  # refused before the model is looked for
        prune(PruneConfig(model=str(tmp_path / "missing"), out=str(tmp_path / "out"), refit="all"))
    with pytest.raises(ConfigError, match="prune: refit needs samples >= 1"):
        load_config(RunConfig, None, ["target.params=70M", "prune.refit_samples=0"]).check()
