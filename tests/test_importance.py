import pytest
import torch

from conftest import make_model, make_text
from minitron import arch
from minitron.data import pack
from minitron.prune.importance import (
    BatchStat,
    ImportanceConfig,
    compute_importance,
    load_scores,
    random_scores,
    save_scores,
    seq_aggregate,
)


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return pack([make_text(400, seed=3)], tokenizer, 32)[:12]  # [12, 32]


def test_seq_aggregate_ignores_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = x.clone()
    y[0, 3:] = 1e6  # garbage at padded positions
    for how in ("mean", "l2", "max", "var"):
        assert torch.allclose(seq_aggregate(x, mask, how), seq_aggregate(y, mask, how))
    assert torch.allclose(seq_aggregate(x, mask, "mean")[0], x[0, :3].abs().mean(0))
    assert torch.allclose(seq_aggregate(x, mask, "var")[1], x[1].var(0, unbiased=False), atol=1e-6)


def test_batch_stat_reductions():
    s1, s2 = torch.rand(3, 4), torch.rand(2, 4)
    stat = BatchStat()
    stat.add(s1)
    stat.add(s2)
    s = torch.cat([s1, s2])
    assert torch.allclose(stat.result("l2"), s.square().sum(0).sqrt())
    assert torch.allclose(stat.result("mean"), s.mean(0))
    assert torch.allclose(stat.result("max"), s.amax(0))
    assert torch.allclose(stat.result("var"), s.var(0, unbiased=False), atol=1e-6)


def test_score_shapes_and_block_importance(family, blocks):
    model = make_model(family)
    d = arch.dims_of(model.config)
    scores = compute_importance(model, blocks, ImportanceConfig(batch_size=4, lm_loss_layers=True,
                                                                lm_loss_block_sizes=[2]), heldout=blocks[:2])
    assert scores["heads"].shape == (d.layers, d.heads)
    assert scores["kv_groups"].shape == (d.layers, d.kv_heads)
    assert scores["neurons"].shape == (d.layers, d.ffn)
    assert scores["channels"].shape == (d.hidden,)
    assert scores["block_bi.2"].shape == (d.layers - 1,)
    assert scores["block_lm_loss.2"].shape == (d.layers - 1,)
    assert ((scores["layer_bi"] >= 0) & (scores["layer_bi"] <= 2)).all()
    # BI of layer 0 by hand: 1 - cos(input, output) averaged over tokens
    with torch.no_grad():
        out = model(blocks, output_hidden_states=True, use_cache=False)
    h0, h1 = out.hidden_states[0].flatten(0, 1), out.hidden_states[1].flatten(0, 1)
    manual = (1 - torch.nn.functional.cosine_similarity(h0, h1, dim=-1)).mean()
    assert torch.allclose(scores["layer_bi"][0], manual, atol=1e-4)


def test_zeroed_units_score_lowest(blocks):
    model = make_model("llama", num_key_value_heads=4)  # MHA: one V per head, so a head can be silenced
    with torch.no_grad():
        layer = arch.decoder_layers(model)[1]
        layer.self_attn.v_proj.weight[2 * 16:3 * 16] = 0  # head 2 of layer 1 outputs zeros
        layer.mlp.gate_proj.weight[7] = 0
        layer.mlp.up_proj.weight[7] = 0  # neuron 7 of layer 1: act(0) * 0 = 0
        for lyr in arch.decoder_layers(model):
            for norm in arch.channel_norms(model, lyr):
                norm.weight[5] = 0  # hidden channel 5 silenced at every hooked norm
    scores = compute_importance(model, blocks, ImportanceConfig(batch_size=6))
    assert int(scores["heads"][1].argmin()) == 2
    assert int(scores["kv_groups"][1].argmin()) == 2
    assert int(scores["neurons"][1].argmin()) == 7
    assert int(scores["channels"].argmin()) == 5
    assert scores["neurons"][1, 7] == 0


def test_padding_never_enters(blocks):
    model = make_model("qwen2")
    padded = blocks.clone()
    mask = torch.ones_like(padded)
    mask[:, 20:] = 0
    padded[:, 20:] = 3  # junk tokens after the end, right-padded
    a = compute_importance(model, blocks[:, :20], ImportanceConfig(batch_size=4))
    b = compute_importance(model, padded, ImportanceConfig(batch_size=4), attention_mask=mask)
    for key in ("heads", "neurons", "channels", "layer_bi"):
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


def test_aggregations_differ_and_bad_name(blocks):
    model = make_model("llama")
    a = compute_importance(model, blocks, ImportanceConfig(seq_agg="mean", batch_agg="l2", batch_size=6))
    b = compute_importance(model, blocks, ImportanceConfig(seq_agg="max", batch_agg="mean", batch_size=6))
    assert not torch.allclose(a["neurons"], b["neurons"])
    with pytest.raises(ValueError, match="seq_agg"):
        compute_importance(model, blocks, ImportanceConfig(seq_agg="median"))


def test_scores_roundtrip(tmp_path, blocks):
    scores = compute_importance(make_model("mistral"), blocks, ImportanceConfig(batch_size=6))
    save_scores(scores, tmp_path, {"note": "x"})
    back, meta = load_scores(tmp_path / "scores.safetensors")
    assert meta == {"note": "x"}
    assert set(back) == set(scores) and all(torch.equal(back[k], scores[k]) for k in scores)
    assert (tmp_path / "scores.json").is_file()
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable scores file"):
        load_scores(tmp_path / "bad.safetensors")
    rnd = random_scores(scores, seed=1)
    assert rnd["heads"].shape == scores["heads"].shape and not torch.equal(rnd["heads"], scores["heads"])


def test_identity_layer_scores(blocks):
    """A layer whose attention and MLP outputs are zero is the identity: lowest BI (0), and removing it
    does not change the LM loss."""
    model = make_model("llama")
    with torch.no_grad():
        layer = arch.decoder_layers(model)[2]
        arch.attn_output(model, layer).weight.zero_()
        arch.mlp_output(model, layer).weight.zero_()
    scores = compute_importance(model, blocks, ImportanceConfig(batch_size=6, lm_loss_layers=True),
                                heldout=blocks[:4])
    assert int(scores["layer_bi"].argmin()) == 2 and scores["layer_bi"][2] < 1e-6
    # removing it leaves the loss unchanged; removing any other layer of this random model changes it
    assert abs(float(scores["layer_lm_loss"][2])) < 1e-6
    assert all(abs(float(scores["layer_lm_loss"][i])) > 1e-4 for i in (0, 1, 3))
