"""Scoring in bounded memory (issue 16): the chunked LM loss equals the model's own loss for every family
(Gemma3's logit soft-cap included), Block Importance without stacking equals the stacked formula for the
sizes asked, candidates pruned in place equal pruned deep copies and leave the model bit-identical, and
importance over 2 gloo ranks equals 1 process."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAMILIES, make_model
from minitron import arch
from minitron.arch.models import lm_loss, token_nll_sum
from minitron.eval.harness import token_nll
from minitron.prune import apply_plan, loss_after_pruning, pruned_copy, pruned_in_place
from minitron.prune.importance import ImportanceConfig, compute_importance
from minitron.prune.plan import PlanError, Target, make_plan
from minitron.prune.search import SearchConfig, depth_block_sizes, search

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _ids(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, t), generator=torch.Generator().manual_seed(seed))  # [N, T]


def _right_padded(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)  # [N, T]
    for r in range(1, ids.shape[0]):  # row r ends 3 r tokens early (at least 2 tokens kept)
        mask[r, max(ids.shape[1] - 3 * r, 2):] = 0
    return mask


def _model(family: str):
    if family == "gemma3_softcap":  # a cap small enough to change every logit of this random model
        model = make_model("gemma3_text", final_logit_softcapping=0.05)
        with torch.no_grad():
            arch.lm_head(model).weight.mul_(20.0)
        return model
    return make_model(family)


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3_softcap"])
def test_chunked_loss_equals_model_loss(family):
    model = _model(family)
    ids = _ids()
    mask = _right_padded(ids)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss.double()  # mean over predicted tokens
        for chunk in (1, 7, 4096):
            total, count = token_nll_sum(model, ids, mask, chunk)
            assert count == int((labels[:, 1:] != -100).sum()) and total.dtype == torch.float64
            torch.testing.assert_close(total / count, ref, rtol=2e-6, atol=0)
        plain = model(input_ids=ids, labels=ids).loss.double()
    torch.testing.assert_close(torch.tensor(lm_loss(model, ids, 4, chunk_size=5), dtype=torch.float64), plain,
                               rtol=2e-6, atol=0)
    total, count = token_nll(model, ids, batch_size=4)
    assert count == ids[:, 1:].numel()
    assert abs(total / count - float(plain)) <= 2e-6 * float(plain)


def test_softcap_is_applied():
    model = _model("gemma3_softcap")
    ids = _ids()
    with torch.no_grad():
        hidden = arch.backbone(model)(input_ids=ids).last_hidden_state  # [B, T, C]
        raw = arch.lm_head(model)(hidden)  # [B, T, V]
        assert torch.equal(arch.logits_of_hidden(model, hidden), model(input_ids=ids).logits)
        assert not torch.allclose(raw, model(input_ids=ids).logits, atol=1e-2)


def _stacked_bi(model, ids, mask, sizes):
    """The former formula: every layer's input and the last output stacked, fp32 Gram of unit states."""
    hidden, handles = [], []
    layers = arch.decoder_layers(model)
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k: hidden.append(a[0] if a else k["hidden_states"]), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: hidden.append(arch.layer_output(out))))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    valid = mask.bool().flatten()
    unit = torch.stack([torch.nn.functional.normalize(h.float().flatten(0, 1)[valid], dim=-1) for h in hidden])
    gram = unit.flatten(1) @ unit.flatten(1).T  # [L+1, L+1]
    n = valid.sum()
    return {k: (n - torch.diagonal(gram, offset=k)) / n for k in sizes}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_block_bi_streamed_equals_stacked(family):
    model = make_model(family)
    ids = _ids(8, 20)
    mask = _right_padded(ids)
    scores = compute_importance(model, ids, ImportanceConfig(batch_size=3, bi_block_sizes=[3, 2]), attention_mask=mask)
    assert sorted(k for k in scores if k.startswith("block_bi.")) == ["block_bi.1", "block_bi.2", "block_bi.3"]
    ref = _stacked_bi(model, ids, mask, [1, 2, 3])
    for n in (1, 2, 3):
        torch.testing.assert_close(scores[f"block_bi.{n}"], ref[n], rtol=1e-5, atol=1e-6)
    assert torch.equal(scores["layer_bi"], scores["block_bi.1"])
    # the LM-loss sizes measured get their BI too (the block plots show both)
    both = compute_importance(model, ids[:4], ImportanceConfig(batch_size=4, lm_loss_layers=True,
                                                               lm_loss_block_sizes=[2]), heldout=ids[4:6])
    assert "block_bi.2" in both and "block_lm_loss.2" in both and "block_bi.3" not in both


def _plan(model, layers: int | None = None):
    d = arch.dims_of(model.config)
    g = torch.Generator().manual_seed(1)
    scores = {"heads": torch.rand(d.layers, d.heads, generator=g), "kv_groups": torch.rand(d.layers, d.kv_heads, generator=g),
              "neurons": torch.rand(d.layers, d.ffn, generator=g), "channels": torch.rand(d.hidden, generator=g),
              "block_bi.1": torch.rand(d.layers, generator=g), "layer_bi": torch.rand(d.layers, generator=g)}
    return make_plan(model.config, scores, Target(hidden=48, ffn=96, heads=2, kv_heads=1,
                                                  layers=layers or d.layers - 1, layer_metric="bi", contiguous=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_in_place_equals_deepcopy_and_restores(family):
    model = make_model(family)
    ids = _ids(4, 16)
    plan = _plan(model)
    before_logits = model(input_ids=ids).logits
    before_state = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    before_config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    deep = apply_plan(copy.deepcopy(model), plan)
    with pruned_in_place(model, plan) as pruned:
        assert torch.equal(pruned(input_ids=ids).logits, deep(input_ids=ids).logits)
    assert loss_after_pruning(model, plan, ids, 2) == lm_loss(deep, ids, 2)
    # the model is bit-identical afterwards: the same tensor objects, values, config and logits
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before_state.keys()
    for k, (obj, value) in before_state.items():
        assert after[k] is obj and torch.equal(after[k], value), k
    assert json.dumps(model.config.to_dict(), sort_keys=True, default=str) == before_config
    assert torch.equal(model(input_ids=ids).logits, before_logits)
    # an independent pruned copy: equal to the deep copy's, sharing no storage with the model
    student = pruned_copy(model, plan)
    assert torch.equal(student(input_ids=ids).logits, deep(input_ids=ids).logits)
    ptrs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not ptrs & {t.untyped_storage().data_ptr() for t in (*student.parameters(), *student.buffers())}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert torch.equal(model(input_ids=ids).logits, before_logits)


DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
from safetensors.torch import save_file
from minitron.prune.importance import ImportanceConfig, compute_importance
from minitron.arch.tiny import make_model
dist.init_process_group("gloo")
ids, mask = torch.load(sys.argv[1])
out = {}
for seq, batch in (("mean", "l2"), ("max", "max")):
    for n in (ids.shape[0], 3):  # 3 blocks: rank 1 gets no batch at all
        cfg = ImportanceConfig(seq, batch, batch_size=4, bi_block_sizes=[2])
        s = compute_importance(make_model("qwen2"), ids[:n], cfg, attention_mask=mask[:n])
        out.update({f"{seq}/{batch}/{n}/{k}": v.clone() for k, v in s.items()})
if dist.get_rank() == 0:
    save_file(out, sys.argv[2])
dist.destroy_process_group()
"""


def test_importance_two_gloo_ranks_equal_one_process(tmp_path):
    """Rank r scores batches r, r + 2, ...; the all-reduced statistics give 1 process's scores (also when a
    rank has no batch), for sums (mean / l2) and maxima."""
    ids = _ids(10, 20, seed=3)
    mask = _right_padded(ids)
    torch.save((ids, mask), tmp_path / "blocks.pt")
    (tmp_path / "run.py").write_text(DIST_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, str(tmp_path / "run.py"), str(tmp_path / "blocks.pt"), str(tmp_path / "two.st")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = load_file(str(tmp_path / "two.st"))
    for seq, batch in (("mean", "l2"), ("max", "max")):
        for n in (ids.shape[0], 3):
            cfg = ImportanceConfig(seq, batch, batch_size=4, bi_block_sizes=[2])
            one = compute_importance(make_model("qwen2"), ids[:n], cfg, attention_mask=mask[:n])
            prefix = f"{seq}/{batch}/{n}/"
            assert {prefix + k for k in one} == {k for k in two if k.startswith(prefix)}
            for k, v in one.items():
                torch.testing.assert_close(two[prefix + k], v, rtol=1e-5, atol=1e-6)


def test_search_by_bi_measures_its_block_sizes():
    """A search by Block Importance needs block_bi.n for every n its depth candidates drop: it says so when
    the scores lack one, and search.depth_block_sizes names them for the importance pass."""
    model = make_model("qwen2")
    ids = _ids(12, 32)
    cfg = SearchConfig(params=100_000, tolerance=0.2, round_to=8, layer_metric="bi", axes=["hidden", "layers"],
                       layer_fractions=[0.5, 0.75, 1.0])
    sizes = depth_block_sizes(model.config, cfg)
    assert 2 in sizes
    with pytest.raises(PlanError, match="bi_block_sizes"):
        search(model, compute_importance(model, ids[:8], ImportanceConfig(batch_size=4)), ids[8:], cfg, batch_size=4)
    scores = compute_importance(model, ids[:8], ImportanceConfig(batch_size=4, bi_block_sizes=sizes))
    rows = search(model, scores, ids[8:], cfg, batch_size=4)
    assert any(len(r["dropped_layers"]) == 2 for r in rows)
