import torch

from conftest import make_model, make_text
from minitron import arch
from minitron.data import pack
from minitron.prune.criteria import magnitude_scores, taylor_scores


def test_magnitude_by_hand(family):
    model = make_model(family)
    s = magnitude_scores(model)
    d = arch.dims_of(model.config)
    assert s["heads"].shape == (d.layers, d.heads) and s["kv_groups"].shape == (d.layers, d.kv_heads)
    assert s["neurons"].shape == (d.layers, d.ffn) and s["channels"].shape == (d.hidden,)
    if family == "llama":
        layer = arch.decoder_layers(model)[0]
        mlp = layer.mlp
        j = 5
        manual = (mlp.gate_proj.weight[j].square().sum() + mlp.up_proj.weight[j].square().sum()
                  + mlp.down_proj.weight[:, j].square().sum()).sqrt()
        assert torch.allclose(s["neurons"][0, j], manual, rtol=1e-5)
        a = layer.self_attn
        h = 1
        manual = (a.q_proj.weight[16:32].square().sum() + a.o_proj.weight[:, 16:32].square().sum()).sqrt()
        assert torch.allclose(s["heads"][0, h], manual, rtol=1e-5)


def test_zeroed_neuron_is_least_important():
    model = make_model("qwen2")
    with torch.no_grad():
        mlp = arch.decoder_layers(model)[1].mlp
        mlp.gate_proj.weight[9] = 0
        mlp.up_proj.weight[9] = 0
        mlp.down_proj.weight[:, 9] = 0
    assert int(magnitude_scores(model)["neurons"][1].argmin()) == 9


def test_taylor(tokenizer):
    model = make_model("mistral")
    blocks = pack([make_text(200, seed=2)], tokenizer, 32)[:4]
    s = taylor_scores(model, blocks, batch_size=2)
    assert s["neurons"].shape == (4, 128) and (s["neurons"] >= 0).all() and s["heads"].sum() > 0
    assert all(p.grad is None for p in model.parameters())  # gradients cleaned up
    with torch.no_grad():  # a neuron whose output weights are zero has zero first-order importance
        arch.decoder_layers(model)[0].mlp.down_proj.weight[:, 3] = 0
        arch.decoder_layers(model)[0].mlp.up_proj.weight[3] = 0
    assert taylor_scores(model, blocks, batch_size=2)["neurons"][0, 3] == 0


def test_taylor_equals_hand_computation(tokenizer):
    """|w * dL/dw| of the mean LM loss, summed by hand over each unit's weights (Llama: no biases, untied)."""
    model = make_model("llama")
    blocks = pack([make_text(200, seed=3)], tokenizer, 32)[:4]
    s = taylor_scores(model, blocks, batch_size=4)
    model.zero_grad()
    model(input_ids=blocks, labels=blocks, use_cache=False).loss.backward()
    e = {name: (p * p.grad).abs().detach() for name, p in model.named_parameters()}  # element-wise score
    hd, group = 16, 2
    for i in range(4):
        pre = f"model.layers.{i}."
        neurons = (e[pre + "mlp.gate_proj.weight"].sum(1) + e[pre + "mlp.up_proj.weight"].sum(1)
                   + e[pre + "mlp.down_proj.weight"].sum(0))  # [F]
        q_rows = e[pre + "self_attn.q_proj.weight"].sum(1) + e[pre + "self_attn.o_proj.weight"].sum(0)  # [H*D]
        heads = q_rows.view(4, hd).sum(1)  # [H*D] -> [H, D] -> [H]
        kv_rows = e[pre + "self_attn.k_proj.weight"].sum(1) + e[pre + "self_attn.v_proj.weight"].sum(1)  # [K*D]
        kv = kv_rows.view(2, hd).sum(1) + heads.view(2, group).sum(1)  # own k/v rows + its query heads
        torch.testing.assert_close(s["neurons"][i], neurons, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(s["heads"][i], heads, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(s["kv_groups"][i], kv, rtol=1e-4, atol=1e-7)
    channels = torch.zeros(64)
    for name, x in e.items():  # the hidden axis: columns of inputs/embeddings, rows of outputs, norm weights
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            channels += x.sum(1)
        elif x.ndim == 2:
            channels += x.sum(0)
        else:
            channels += x
    torch.testing.assert_close(s["channels"], channels, rtol=1e-4, atol=1e-6)


# ---- hybrid / Mamba models: the Mamba axes ------------------------------------------------------------

def test_magnitude_mamba_axes_by_hand():
    """NemotronH: an inner channel's magnitude is the L2 of its x row of in_proj and its out_proj column;
    mamba_heads [L, H] / mamba_head_dim [L, P] are the L2 of those over head-dim channels / heads (as the
    activation scores); layers without a mixer part score zero there; a head with zero weights ranks last."""
    from test_hybrid import H, P
    from test_hybrid import make_model as make_hybrid

    model = make_hybrid()
    s = magnitude_scores(model)
    assert s["mamba_channels"].shape == (5, H * P) and s["mamba_heads"].shape == (5, H)
    assert s["heads"].shape == (5, 4) and s["neurons"].shape == (5, 128)
    p = arch.mamba_parts(model, arch.decoder_layers(model)[3])
    x_rows = p.in_proj.weight[H * P:2 * H * P].square().sum(1)  # [I]
    by_hand = (x_rows + p.out_proj.weight.square().sum(0)).sqrt()  # [I]
    torch.testing.assert_close(s["mamba_channels"][3], by_hand)
    torch.testing.assert_close(s["mamba_heads"][3], by_hand.view(H, P).norm(dim=1))  # [I] -> [H, P] -> [H]
    torch.testing.assert_close(s["mamba_head_dim"][3], by_hand.view(H, P).norm(dim=0))
    assert torch.all(s["mamba_heads"][[1, 2, 4]] == 0) and torch.all(s["heads"][[0, 1, 3, 4]] == 0)
    assert torch.all(s["neurons"][[0, 2, 3]] == 0) and torch.all(s["mamba_heads"][[0, 3]] > 0)
    with torch.no_grad():
        p.in_proj.weight[H * P + 5 * P:H * P + 6 * P] = 0  # head 5's x rows
        p.out_proj.weight[:, 5 * P:6 * P] = 0  # and its out_proj columns
    assert int(magnitude_scores(model)["mamba_heads"][3].argmin()) == 5


def test_taylor_and_magnitude_plan_mamba_heads(tokenizer):
    """taylor and magnitude score the Mamba axes of NemotronH and Mamba2 (no longer refused on hybrids): a head
    whose x rows and out_proj columns are zero has zero first-order importance; score_model's scores plan a
    Mamba-head target."""
    from minitron.prune.importance import ImportanceConfig, score_model
    from minitron.prune.plan import Target, make_plan
    from test_hybrid import _calib, make_mamba2
    from test_hybrid import make_model as make_hybrid

    calib = _calib(tokenizer)[:4]
    for model, (layers, heads, dim) in ((make_hybrid(), (5, 8, 8)), (make_mamba2(), (3, 8, 16))):
        p = arch.mamba_parts(model, arch.decoder_layers(model)[0])
        inner = heads * dim
        with torch.no_grad():
            p.in_proj.weight[inner + 2 * dim:inner + 3 * dim] = 0  # head 2's x rows
            p.out_proj.weight[:, 2 * dim:3 * dim] = 0
        t = taylor_scores(model, calib, batch_size=2)
        assert t["mamba_heads"].shape == (layers, heads) and (t["mamba_channels"] >= 0).all()
        assert t["mamba_heads"][0, 2] == 0 and t["mamba_heads"][0].sum() > 0
        assert all(p.grad is None for p in model.parameters())
        for criterion in ("taylor", "magnitude"):
            scores, meta = score_model(model, calib, calib[:2], ImportanceConfig(batch_size=2), criterion)
            assert meta["criterion"] == criterion
            plan = make_plan(model.config, scores, Target(mamba_heads=4))
            assert 2 not in plan.mamba_heads[0]
