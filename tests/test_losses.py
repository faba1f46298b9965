"""Chunked losses equal the naive full-logit losses (values and gradients); top-k cache; hidden loss."""

import pytest
import torch

from minitron.distill.losses import (
    LossConfig,
    chunked_distill_loss,
    default_layer_map,
    divergence,
    hidden_state_loss,
    naive_distill_loss,
    topk_logprobs,
    with_rest_bucket,
)

N, C, CT, V = 37, 16, 24, 50


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=torch.float64).requires_grad_()
    w = (0.5 * torch.randn(V, C, generator=g, dtype=torch.float64)).requires_grad_()
    ht = torch.randn(N, CT, generator=g, dtype=torch.float64)
    wt = 0.5 * torch.randn(V, CT, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, generator=g) > 0.2).float()
    labels = torch.randint(0, V, (N,), generator=g)
    return h, w, ht, wt, mask, labels


@pytest.mark.parametrize("loss,temperature,ce", [("fkl", 1.0, 0.0), ("fkl", 2.0, 0.3), ("rkl", 1.5, 0.0),
                                                 ("jsd", 1.0, 0.5)])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_equals_naive_values_and_grads(loss, temperature, ce, chunk):
    cfg = LossConfig(loss=loss, temperature=temperature, ce_weight=ce, chunk_size=chunk)
    h, w, ht, wt, mask, labels = _inputs()
    norm = mask.sum() + 3  # any normalizer (e.g. tokens of other micro-batches)
    ours = chunked_distill_loss(h, w, mask, cfg, norm, labels=labels, teacher_hidden=(ht, wt))
    ours.backward()
    g_ours = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = naive_distill_loss(h @ w.T, mask, cfg, norm, labels=labels, t_logits=ht @ wt.T)
    ref.backward()
    assert ours.item() > 0
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours[0], h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_ours[1], w.grad, rtol=1e-4, atol=1e-7)
    assert h.grad[mask == 0].abs().max() == 0  # padding gets no gradient


def test_fkl_matches_torch_kl_div_and_zero_for_equal():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, V, generator=g), torch.randn(5, V, generator=g)
    s_lp, t_lp = s.log_softmax(-1), t.log_softmax(-1)
    ref = torch.nn.functional.kl_div(s_lp, t_lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(divergence(s_lp, t_lp, "fkl"), ref)
    torch.testing.assert_close(divergence(t_lp, s_lp, "rkl"), ref)
    for kind in ("fkl", "rkl", "jsd"):
        assert divergence(t_lp, t_lp, kind).abs().max() < 1e-6
    assert (divergence(s_lp, t_lp, "jsd") > 0).all()


def test_temperature_scaling_and_normalizer():
    h, w, ht, wt, mask, labels = _inputs(2)
    a = chunked_distill_loss(h, w, mask, LossConfig(temperature=1.0), mask.sum(), teacher_hidden=(ht, wt))
    b = chunked_distill_loss(h, w, mask, LossConfig(temperature=1.0), 2 * mask.sum(), teacher_hidden=(ht, wt))
    torch.testing.assert_close(a, 2 * b)
    # T^2 scaling: at large T the scaled KL tends to a finite nonzero limit instead of vanishing
    hi = chunked_distill_loss(h, w, mask, LossConfig(temperature=50.0), mask.sum(), teacher_hidden=(ht, wt))
    hi2 = chunked_distill_loss(h, w, mask, LossConfig(temperature=100.0), mask.sum(), teacher_hidden=(ht, wt))
    assert 0 < hi.item() and abs(hi.item() / hi2.item() - 1) < 0.01


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_topk_with_k_equal_vocab_is_full_loss(loss):
    cfg = LossConfig(loss=loss, temperature=1.5, chunk_size=8)
    h, w, ht, wt, mask, _ = _inputs(3)
    full = chunked_distill_loss(h, w, mask, cfg, mask.sum(), teacher_hidden=(ht, wt))
    idx, lp = topk_logprobs(ht @ wt.T, V, temperature=1.5)
    cached = chunked_distill_loss(h, w, mask, cfg, mask.sum(), teacher_topk=(idx, lp))
    torch.testing.assert_close(cached.double(), full.double(), rtol=1e-5, atol=1e-6)


def test_topk_rest_bucket_and_smaller_k():
    h, w, ht, wt, mask, _ = _inputs(4)
    cfg = LossConfig(chunk_size=16)
    t_logits = ht @ wt.T
    lp5 = topk_logprobs(t_logits, 5)[1]
    full_b = with_rest_bucket(lp5)
    assert torch.allclose(full_b.exp().sum(-1), torch.ones(N, dtype=torch.float32), atol=1e-5)
    losses = []
    for k in (1, 5, 20, V):
        idx, lp = topk_logprobs(t_logits, k)
        losses.append(chunked_distill_loss(h, w, mask, cfg, mask.sum(), teacher_topk=(idx, lp)).item())
    # coarser bucketings never exceed the full KL (data-processing inequality), and approach it with k
    assert all(a <= b + 1e-6 for a, b in zip(losses, losses[1:], strict=False))
    # the student equal to the teacher gets zero loss from the cache too
    idx, lp = topk_logprobs(t_logits, 5)
    zero = chunked_distill_loss(ht.float(), wt.float(), mask, cfg, mask.sum(), teacher_topk=(idx, lp))
    assert zero.item() < 1e-5


@pytest.mark.parametrize("loss,temperature,ce", [("fkl", 1.0, 0.0), ("fkl", 2.0, 0.5), ("rkl", 1.0, 0.0)])
def test_topk_gradients_match_naive(loss, temperature, ce):
    h, w, ht, wt, mask, labels = _inputs(5)
    cfg = LossConfig(loss=loss, temperature=temperature, ce_weight=ce, chunk_size=7)
    idx, lp = topk_logprobs(ht @ wt.T, 6, temperature)
    ours = chunked_distill_loss(h, w, mask, cfg, mask.sum(), labels=labels, teacher_topk=(idx, lp))
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = naive_distill_loss(h @ w.T, mask, cfg, mask.sum(), labels=labels, t_topk=(idx, lp))
    ref.backward()
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-7)


def test_ce_only_is_cross_entropy():
    h, w, _, _, mask, labels = _inputs(6)
    cfg = LossConfig(kd_weight=0.0, ce_weight=1.0)
    ours = chunked_distill_loss(h, w, mask, cfg, mask.sum(), labels=labels)
    ce = torch.nn.functional.cross_entropy((h @ w.T)[mask.bool()], labels[mask.bool()])
    torch.testing.assert_close(ours.double(), ce.double())


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig(loss="kl")
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0)
    with pytest.raises(ValueError, match="nothing to train"):
        LossConfig(kd_weight=0, ce_weight=0)
    h, w, ht, _, mask, _ = _inputs()
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_distill_loss(h, w, mask, LossConfig(), 1, teacher_hidden=(ht, torch.randn(V + 1, CT)))


def test_hidden_loss_and_layer_map():
    s = torch.randn(10, 8)
    mask = torch.ones(10)
    assert hidden_state_loss(s, 3 * s, mask, "cosine", 10).abs() < 1e-6
    assert hidden_state_loss(s, s, mask, "mse", 10) == 0
    assert hidden_state_loss(s, -s, mask, "cosine", 10).item() == pytest.approx(2.0)
    assert default_layer_map(2, 4) == [1, 3]
    assert default_layer_map(4, 4) == [0, 1, 2, 3]
    assert default_layer_map(15, 30)[-1] == 29


AUTOCAST_PEAK = """
import resource, torch
from minitron.distill.losses import LossConfig, chunked_distill_loss
torch.manual_seed(0)
V, C, N = 32000, 512, 512  # w: 62.5 MiB fp32, 31 MiB per bf16 copy; 32 chunks of 16 tokens
w = torch.randn(V, C, requires_grad=True)
h = torch.randn(N, C, requires_grad=True)
idx, lp = torch.randint(0, V, (N, 8)), torch.log_softmax(torch.randn(N, 8), -1) - 1
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.autocast("cpu", dtype=torch.bfloat16):
    loss = chunked_distill_loss(h, w, torch.ones(N), LossConfig(chunk_size=16), N, teacher_topk=(idx, lp))
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_autocast_casts_lm_head_once_not_per_chunk():
    """Under bf16 autocast the loss used to keep one bf16 copy of the LM head per chunk (autocast's weight
    cache, 1.27 GiB here); cast once, the peak grows by w's gradient and one copy (~240 MiB)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", AUTOCAST_PEAK], capture_output=True, text=True, check=True)
    assert float(out.stdout.split()[-1]) < 450, out.stdout


def test_autocast_loss_and_grads_match_fp32():
    """The loss under bf16 autocast equals the fp32 loss to bf16 precision, gradients included."""
    torch.manual_seed(0)
    h, w = torch.randn(64, 32, requires_grad=True), torch.randn(100, 32, requires_grad=True)
    th, tw = torch.randn(64, 16), torch.randn(100, 16)
    cfg, mask = LossConfig(chunk_size=16), torch.ones(64)
    ref = chunked_distill_loss(h, w, mask, cfg, 64, teacher_hidden=(th, tw))
    gh, gw = torch.autograd.grad(ref, [h, w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_distill_loss(h, w, mask, cfg, 64, teacher_hidden=(th, tw))
    bh, bw = torch.autograd.grad(got, [h, w])
    assert got.dtype == torch.float32 and bw.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=0.05)
    assert torch.allclose(bh, gh, atol=0.05 * gh.abs().max()) and torch.allclose(bw, gw, atol=0.05 * gw.abs().max())


@pytest.mark.parametrize("loss", ["fkl", "rkl"])  # fkl: closed-form gradient; rkl: autograd per chunk
@pytest.mark.parametrize("ce", [0.0, 0.3])
def test_logit_map_softcap_and_scale_match_naive(loss, ce):
    """With a logit map (Gemma2's soft-cap, Granite's scaling) the chunked loss and its gradients equal the
    naive loss on the mapped logits of student and teacher."""
    from minitron.distill.losses import map_logits

    torch.manual_seed(0)
    N, C, V = 40, 16, 50
    h, w = torch.randn(N, C, requires_grad=True), (3 * torch.randn(V, C)).requires_grad_()
    th, tw = torch.randn(N, 8), 3 * torch.randn(V, 8)
    labels, mask = torch.randint(0, V, (N,)), (torch.rand(N) > 0.2).float()
    s_map, t_map = (2.0, 5.0), (1.0, 5.0)
    cfg = LossConfig(loss=loss, ce_weight=ce, chunk_size=16)
    got = chunked_distill_loss(h, w, mask, cfg, 37.0, labels, teacher_hidden=(th, tw, t_map), logit_map=s_map)
    gh, gw = torch.autograd.grad(got, [h, w])
    s_logits = map_logits(h @ w.T, s_map)[0]
    ref = naive_distill_loss(s_logits, mask, cfg, 37.0, labels, t_logits=map_logits(th @ tw.T, t_map)[0])
    rh, rw = torch.autograd.grad(ref, [h, w])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)
    plain = chunked_distill_loss(h, w, mask, cfg, 37.0, labels, teacher_hidden=(th, tw))
    assert abs(plain.item() - got.item()) > 1e-3  # the map matters at these logit sizes
