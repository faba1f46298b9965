"""Teacher top-k cache at scale: only the budget's blocks, 16-bit log-probs within a stated tolerance of fp32,
per-rank shards under 2 gloo processes equal to the one-process cache, and old or other caches never misread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from minitron.distill import topk_cache as tc
from minitron.distill.loop import global_block_ids
from minitron.distill.losses import LossConfig, naive_distill_loss

SRC = str(Path(__file__).resolve().parents[1] / "src")
T, K = 16, 8


@pytest.fixture(scope="module")
def teacher():
    """A tiny llama (vocab 384) with peaked, context-dependent distributions (a random one is near uniform)."""
    m = make_model("llama", layers=2)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    return m.eval()


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, T), generator=torch.Generator().manual_seed(seed))               # [N, T]


def build(path, teacher, train, steps, per_step, batch_size=2, k=K, **kw):
    return tc.open_or_build(path, teacher, train, k, 1.0, "tiny", batch_size, "cpu", steps=steps, per_step=per_step,
                            seed=3, **kw)


def test_schedule_is_the_trainers_order():
    """schedule() replays distill.loop.global_block_ids and the ranks' batch slices (two epochs here)."""
    n, steps, batch, accum, world, seed = 11, 5, 2, 2, 2, 7
    per_step = batch * accum * world
    first: dict[int, int] = {}
    for step in range(steps):
        ids = global_block_ids(step, n, per_step, seed)
        for micro in range(accum):
            for rank in range(world):
                off = (micro * world + rank) * batch
                for b in ids[off:off + batch]:
                    first.setdefault(b, rank)
    got_blocks, got_ranks = tc.schedule(n, steps, per_step, batch, world, seed)
    assert got_blocks.tolist() == sorted(first) and got_ranks.tolist() == [first[b] for b in sorted(first)]


def test_budget_caches_only_its_blocks_and_bytes_per_token(teacher, tmp_path, capsys):
    train = blocks(40)
    cache = build(tmp_path / "c", teacher, train, steps=2, per_step=4)  # a budget of 8 blocks of 40
    meta = json.loads((tmp_path / "c/meta.json").read_text())
    assert meta["blocks"] == 8 and meta["n_train_blocks"] == 40 and len(cache.rows) == 8
    assert meta["index_dtype"] == "uint16" and meta["logp_dtype"] == "float16" and meta["format"] == tc.FORMAT
    idx, lp = cache.get(cache.rows[:3].tolist())
    assert idx.shape == lp.shape == (3, T - 1, K) and lp.dtype == torch.float16 and idx.dtype == torch.int32
    with pytest.raises(tc.CacheError, match="does not hold train blocks"):
        cache.get([int(np.setdiff1d(np.arange(40), cache.rows)[0])])
    # bytes on disk: k * (2 + 2) bytes per predicting position; a shard's header is well under 1 KiB
    shard = tmp_path / "c/r000-00000.safetensors"
    assert meta["bytes_per_token"] == K * 4 * (T - 1) / T
    assert 0 < shard.stat().st_size - meta["bytes_per_token"] * 8 * T < 1024
    # the same budget reuses it; a larger one rebuilds it, saying why
    stamp = (tmp_path / "c/meta.json").stat().st_mtime_ns
    build(tmp_path / "c", teacher, train, steps=2, per_step=4)
    assert (tmp_path / "c/meta.json").stat().st_mtime_ns == stamp
    build(tmp_path / "c", teacher, train, steps=3, per_step=4)
    assert "smaller budget (8 blocks; this run reads 12)" in capsys.readouterr().out
    assert tc.index_dtype(65536) == torch.uint16 and tc.index_dtype(65537) == torch.int32


def test_killed_build_resumes_from_its_finished_shards(teacher, tmp_path, monkeypatch, capsys):
    """A build killed after 2 of its 4 shards resumes: only the 2 missing shards are computed, and the cache
    equals an uninterrupted build's; another plan (here another k) starts afresh instead."""
    monkeypatch.setattr(tc, "SHARD_BLOCKS", 2)
    train = blocks(40)
    whole = build(tmp_path / "whole", teacher, train, steps=2, per_step=4)  # 8 blocks: 4 shards of 2
    real, calls = tc.teacher_topk, []

    def counting(*a, fail_after=None, **kw):
        calls.append(1)
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(tc, "teacher_topk", lambda *a, **kw: counting(*a, fail_after=2, **kw))
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c", teacher, train, steps=2, per_step=4)  # batch 2: one call per shard
    assert len(list((tmp_path / ".c.building").glob("r000-*.safetensors"))) == 2
    calls.clear()
    monkeypatch.setattr(tc, "teacher_topk", counting)
    cache = build(tmp_path / "c", teacher, train, steps=2, per_step=4)
    assert len(calls) == 2 and "resuming the interrupted top-k cache build" in capsys.readouterr().out
    ids = whole.rows.tolist()
    for a, b in zip(cache.get(ids), whole.get(ids), strict=True):
        assert torch.equal(a, b)
    # a kill under another plan: its shards are not reused
    calls.clear()
    monkeypatch.setattr(tc, "teacher_topk", lambda *a, **kw: counting(*a, fail_after=2, **kw))
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "d", teacher, train, steps=2, per_step=4)
    calls.clear()
    monkeypatch.setattr(tc, "teacher_topk", counting)
    build(tmp_path / "d", teacher, train, steps=2, per_step=4, k=4)
    assert len(calls) == 4


def test_16bit_logprobs_loss_within_tolerance_of_fp32(teacher, tmp_path):
    """The loss (forward KL with the rest bucket) from the fp16 cache is within 1e-3 (relative) of the loss from
    fp32 log-probs of the same teacher, and its gradient within 1e-2 (measured on SmolLM2's real logits:
    1.4e-5 and 2.3e-4, docs/data.md)."""
    train = blocks(12, seed=1)
    cache = build(tmp_path / "c", teacher, train, steps=1, per_step=4, k=64)
    rows = cache.rows.tolist()
    idx16, lp16 = cache.get(rows)                                                    # [B, T-1, k]
    idx32, lp32 = tc.teacher_topk(teacher, train[rows], 64, 1.0)                     # [B, T-1, k]
    assert torch.equal(idx16, idx32)
    assert (lp16.float() - lp32).abs().max() < 2e-2  # fp16 rounding of log-probs in about [-16, 0]
    student = torch.randn(idx32.shape[0] * (T - 1), 384, generator=torch.Generator().manual_seed(2))  # [N, V]
    n = student.shape[0]

    def loss_grad(idx, lp):
        s = student.clone().requires_grad_(True)
        loss = naive_distill_loss(s, torch.ones(n), LossConfig(), n,
                                  t_topk=(idx.reshape(n, -1), lp.reshape(n, -1)))  # [N, k]
        loss.backward()
        return loss.item(), s.grad

    (l16, g16), (l32, g32) = loss_grad(idx16, lp16), loss_grad(idx32, lp32)
    assert abs(l16 - l32) / l32 < 1e-3 and ((g16 - g32).norm() / g32.norm()).item() < 1e-2


def test_old_format_other_k_and_no_teacher(teacher, tmp_path, capsys):
    train = blocks(20, seed=2)
    old = tmp_path / "old"
    old.mkdir()  # a format-1 cache: fp32, every block, no format key
    (old / "meta.json").write_text(json.dumps({"k": K, "temperature": 1.0, "seq_len": T, "n_blocks": 20,
                                               "teacher": "tiny", "shard_blocks": 256, "fingerprint": "x"}))
    expect = tc.cache_meta(train, K, 1.0, "tiny")
    with pytest.raises(tc.CacheError, match="cache format 1 .* reads format 2"):
        tc.TopkCache(old, expect)
    with pytest.raises(tc.CacheError, match="no teacher to build it"):
        build(old, None, train, steps=1, per_step=4)
    build(old, teacher, train, steps=1, per_step=4)
    assert "in cache format 1" in capsys.readouterr().out and json.loads((old / "meta.json").read_text())["format"] == 2
    build(old, teacher, train, steps=1, per_step=4, k=4)
    assert "cached vs wanted: {'k': (8, 4)}" in capsys.readouterr().out
    with pytest.raises(tc.CacheError, match="another teacher, data or settings"):
        tc.TopkCache(old, tc.cache_meta(blocks(20, seed=9), 4, 1.0, "tiny"))


RANK_SCRIPT = """
import sys
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from minitron.distill.topk_cache import open_or_build
dist.init_process_group("gloo")
teacher = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
train = torch.load(sys.argv[2])
open_or_build(sys.argv[3], teacher, train, 8, 1.0, "tiny", 1, "cpu", steps=6, per_step=2, seed=3,
              rank=dist.get_rank(), world=dist.get_world_size(), barrier=dist.barrier)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_build_disjoint_shards_equal_to_one_process(teacher, tmp_path):
    """2 ranks (batch 1, 6 steps: 12 of 20 blocks) each compute the blocks they read; the two shards are disjoint
    and together hold exactly the one-process cache of the same 12 blocks, value for value."""
    train = blocks(20, seed=4)
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save(train, tmp_path / "train.pt")
    (tmp_path / "r.py").write_text(RANK_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(tmp_path / "r.py"), str(tmp_path / "teacher"), str(tmp_path / "train.pt"),
                           str(tmp_path / "two")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one = build(tmp_path / "one", teacher, train, steps=12, per_step=1, batch_size=1)
    r0, r1 = (np.load(tmp_path / f"two/r00{r}-blocks.npy") for r in (0, 1))
    assert len(r0) and len(r1) and not set(r0) & set(r1)
    assert sorted([*r0, *r1]) == one.rows.tolist() and len(one.rows) == 12
    blocks_of_rank, ranks = tc.schedule(20, 6, 2, 1, 2, 3)
    assert r0.tolist() == blocks_of_rank[ranks == 0].tolist()  # each rank cached the blocks it reads
    two = tc.TopkCache(tmp_path / "two", tc.cache_meta(train, K, 1.0, "tiny"))
    for a, b in zip(two.get(one.rows.tolist()), one.get(one.rows.tolist()), strict=True):
        assert torch.equal(a, b)
