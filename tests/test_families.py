"""Dense families beyond the Llama layout: OLMo2 (norms after attention and MLP only; q_norm / k_norm over
the whole q / k projections, sliced with the heads), Gemma2 (soft-capped logits and attention, scaled
embeddings), Granite (embedding, residual, attention and logits multipliers). Own-dims identity and
silent hidden channels are in test_exactness.py; here: silent neurons and heads, the prune stage's output
reloading and generating, the held-out loss through the family's logit transform, and distillation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_and_generates, distill_pair, make_model, make_text
from minitron import arch
from minitron.arch.models import lm_loss
from minitron.prune import PruneConfig, apply_plan, prune
from minitron.prune.plan import PrunePlan, Target, make_plan

DENSE = ["olmo2", "gemma2", "granite"]


@pytest.fixture(params=DENSE)
def dense_family(request):
    return request.param


def _ids(tokenizer, n=4):
    return tokenizer(make_text(n), return_tensors="pt").input_ids  # [1, T]


def _scores(d: arch.Dims) -> dict[str, torch.Tensor]:
    return {"heads": torch.rand(d.layers, d.heads), "kv_groups": torch.rand(d.layers, d.kv_heads),
            "neurons": torch.rand(d.layers, d.ffn), "channels": torch.rand(d.hidden)}


def test_silent_neurons_prune_exactly(dense_family, tokenizer):
    """MLP neurons whose down_proj column is zero carry nothing: pruning exactly those keeps the logits."""
    model = make_model(dense_family)
    d = arch.dims_of(model.config)
    scores = _scores(d)
    with torch.no_grad():
        for i, layer in enumerate(arch.decoder_layers(model)):
            drop = torch.randperm(d.ffn)[:32]
            arch.mlp_output(model, layer).weight[:, drop] = 0  # [C, F]
            scores["neurons"][i, drop] = -1.0
        ids = _ids(tokenizer)
        ref = model(ids).logits
        got = apply_plan(copy.deepcopy(model), make_plan(model.config, scores, Target(ffn=d.ffn - 32)))(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_silent_kv_group_prunes_exactly(family, tokenizer):
    """A KV group whose query heads write nothing (their o_proj columns zero) is dropped with its heads and the
    logits stay (Gemma2's attention soft-cap and Granite's attention multiplier act per head). OLMo2 is left
    out: its q_norm / k_norm normalize over all heads, so dropping any head changes the others."""
    model = make_model(family)
    d = arch.dims_of(model.config)
    scores = _scores(d)
    scores["kv_groups"][:, 1] = -1.0  # group 1 (query heads 2, 3) ranks last
    with torch.no_grad():
        for layer in arch.decoder_layers(model):
            arch.attn_output(model, layer).weight[:, 2 * d.head_dim:] = 0  # [C, H*D]: heads 2, 3 silent
        ids = _ids(tokenizer)
        ref = model(ids).logits
        plan = make_plan(model.config, scores, Target(heads=2, kv_heads=1))
        got = apply_plan(copy.deepcopy(model), plan)(ids).logits
    assert all(h == [0, 1] for h in plan.heads.values())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_prune_stage_output_reloads_and_generates(dense_family, tokenizer, corpus_dir, tmp_path):
    """Hidden, MLP, heads, KV groups and depth through the prune stage: a plain HF dir (OLMo2's q_norm/k_norm
    sliced with the heads) that from_pretrained loads with the in-memory logits and that generates the same with
    and without a KV cache."""
    src = tmp_path / "src"
    make_model(dense_family).save_pretrained(src)
    tokenizer.save_pretrained(src)
    target = Target(hidden=48, ffn=96, heads=2, kv_heads=1, layers=3, layer_metric="bi")
    out = prune(PruneConfig(model=str(src), out=str(tmp_path / "out"), calib_data=str(corpus_dir), calib_samples=8,
                            heldout_samples=2, seq_len=32, batch_size=4, device="cpu", target=target))
    plan = PrunePlan.load(out / "plan.json")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    c = reloaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.num_hidden_layers) == (48, 96, 2, 1, 3)
    assert sum(p.numel() for p in reloaded.parameters()) == plan.params_after["total"]
    if dense_family == "olmo2":
        attn = arch.attention(reloaded, arch.decoder_layers(reloaded)[0])
        assert attn.q_norm.weight.shape == (2 * 16,) and attn.k_norm.weight.shape == (16,)
    if dense_family == "granite":
        assert (c.embedding_multiplier, c.residual_multiplier, c.logits_scaling) == (3.0, 0.5, 4.0)
    assert_same_and_generates(reloaded, apply_plan(make_model(dense_family), plan), _ids(tokenizer, 3))
    metrics = json.loads((out / "prune_metrics.json").read_text())
    assert metrics["heldout_loss_after"] > 0


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_lm_loss_goes_through_the_logit_transform(family, tokenizer):
    """models.lm_loss (chunked, from hidden states) equals the cross-entropy of the model's own logits: Gemma2's
    final soft-cap and Granite's logits scaling are applied (arch.final_logits)."""
    model = make_model(family)
    ids = _ids(tokenizer)
    with torch.no_grad():
        arch.lm_head(model).weight.mul_(20.0)  # raw logits of several units, where a soft-cap of 3 bends them
        logits = model(ids).logits[0, :-1]  # [T-1, V]
        raw = arch.lm_head(model)(arch.backbone(model)(input_ids=ids).last_hidden_state)[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item()
    assert abs(lm_loss(model, ids) - ref) < 1e-5
    assert abs(torch.nn.functional.cross_entropy(raw.float(), ids[0, 1:]).item() - ref) > 1e-3  # the transform matters


def test_distill_a_pruned_student(dense_family, tokenizer, corpus_dir, tmp_path):
    """Each family's pruned copy distills from it: the run finishes, lowers the validation KL and reloads."""
    teacher = make_model(dense_family)
    with torch.no_grad():  # peaked teacher distributions (a random one is near uniform)
        arch.lm_head(teacher).weight.mul_(8.0)
    d = arch.dims_of(teacher.config)
    student = apply_plan(copy.deepcopy(teacher), make_plan(teacher.config, _scores(d), Target(hidden=32, ffn=64, layers=2,
                                                                              drop_layers=[1, 2])))
    out, info = distill_pair(teacher, student, tokenizer, corpus_dir, tmp_path)
    assert info["finished"] and info["steps"] == 6
    assert info["final_eval"]["val_kl"] < info["first_eval"]["val_kl"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_distillation_loss_goes_through_the_logit_transform(family, tokenizer):
    """Distillation compares the logits the models give: the student's cross-entropy in the training loss equals
    models.lm_loss, and its KL to a top-k cache (k = V) of itself is 0, with Gemma2's soft-cap and Granite's
    scaling applied to student, teacher and cache alike."""
    from minitron.distill.losses import LossConfig
    from minitron.distill.student import Student, teacher_pass
    from minitron.distill.topk_cache import teacher_topk

    model = make_model(family).eval()
    ids = _ids(tokenizer)
    att = torch.ones_like(ids)
    n = ids.shape[1] - 1
    with torch.no_grad():
        arch.lm_head(model).weight.mul_(20.0)  # logits large enough for the soft-cap to bend them
        student = Student(model, None, None, "none")
        ce = student(ids, att, LossConfig(kd_weight=0.0, ce_weight=1.0), n)[1]
        assert abs(ce.item() - lm_loss(model, ids)) < 1e-5
        idx, lp = teacher_topk(model, ids, model.config.vocab_size, 1.0)  # [1, T-1, V]
        kl = student(ids, att, LossConfig(), n, teacher_topk=(idx[0], lp[0]))[1]
        kl_hidden = student(ids, att, LossConfig(), n, teacher_hidden=teacher_pass(model, None, ids, att)[0])[1]
    assert abs(kl.item()) < 1e-5 and abs(kl_hidden.item()) < 1e-5
