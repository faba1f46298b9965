import pytest
import torch

from conftest import make_model, make_text
from minitron import arch
from minitron.data import pack
from minitron.prune.importance import ImportanceConfig, compute_importance
from minitron.prune.plan import PlanError, config_with_dims, count_params
from minitron.prune.search import SearchConfig, candidates, save_table, search


def test_candidates_in_budget():
    model = make_model("llama")
    cfg = SearchConfig(params=120_000, tolerance=0.1, round_to=8)
    cands = candidates(model.config, cfg)
    assert len(cands) >= 3
    for d in cands:
        assert 108_000 <= count_params(config_with_dims(model.config, d))["total"] <= 132_000
        assert d.heads % d.kv_heads == 0 and d.head_dim == 16 and d.hidden % d.heads == 0  # Llama reload rule
    frozen = candidates(model.config, SearchConfig(params=120_000, tolerance=0.1, round_to=8, axes=["hidden"]))
    assert all(d.ffn == 128 and d.layers == 4 and d.heads == 4 for d in frozen)
    with pytest.raises(PlanError, match="no candidate"):
        candidates(model.config, SearchConfig(params=1_000, tolerance=0.01))
    with pytest.raises(ValueError, match="unknown axes"):
        SearchConfig(axes=["depth"]).check()


def test_search_ranks_and_trains(tokenizer, tmp_path):
    model = make_model("qwen2")
    blocks = pack([make_text(300, seed=8)], tokenizer, 32)
    scores = compute_importance(model, blocks[:8], ImportanceConfig(batch_size=4))
    cfg = SearchConfig(params=110_000, tolerance=0.15, round_to=8, max_candidates=2)
    trained = []

    def train(student):
        trained.append(arch.dims_of(student.config))
        with torch.no_grad():  # stand-in for distillation: something that changes the loss
            arch.final_norm(student).weight.mul_(0.5)
        return student

    rows = search(model, scores, blocks[8:12], cfg, train=train, batch_size=4)
    assert len(trained) == 2 and all("loss_trained" in r for r in rows[:2])
    assert rows[0]["loss_trained"] <= rows[1]["loss_trained"]
    assert all("loss_trained" not in r for r in rows[2:])
    # depth candidates got their contiguous-block LM-loss scores computed on demand
    assert any(r["dropped_layers"] for r in rows)
    save_table(rows, tmp_path, cfg)
    assert (tmp_path / "search.png").is_file() and "| 1 |" in (tmp_path / "search.md").read_text()
