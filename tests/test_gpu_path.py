"""The GPU recipes' code path on CPU: FSDP2 + bf16 autocast + activation checkpointing + top-k cache +
release_teacher under 2 gloo ranks (what recipes/gpu-8b-8gpu.yaml runs), checked against one process, with
every collective audited (minitron.arch.audit); and the pieces of that path on their own: the sharded load, the
loss's GEMM dtypes and host syncs, no KV cache in training forwards, the collective timeout, the torch floor."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitron.distill import DistillConfig, DistillError, distill, read_metrics
from test_distill import ENV, cfg_for, losses, pair  # noqa: F401 (pair is a fixture)

GPU_PATH = dict(autocast="bf16", teacher_dtype="bfloat16", grad_checkpointing=True, topk=16, release_teacher=True,
                grad_accum=2, eval_every=2, save_every=0)

RANK_SCRIPT = """
import json, sys
import torch
import minitron.distill.loop as loop
import minitron.distill.student as student
from minitron.distill import DistillConfig, distill
cfg = DistillConfig(**json.loads(sys.argv[1]))
rank = int(__import__("os").environ.get("RANK", "0"))
seen = []
def recording(*args, **kw):
    topk, norm = args[7] if len(args) > 7 else kw.get("teacher_topk"), args[4]
    if isinstance(norm, torch.Tensor):  # a training step (validation passes 1.0)
        seen.append({"logp": str(topk[1].dtype) if topk is not None else None, "normalizer": str(norm.dtype)})
    return real(*args, **kw)
real, student.chunked_distill_loss = student.chunked_distill_loss, recording
load = loop.load_model
def guarded(name, *a, **k):  # only rank 0 may read the student's full weights
    assert rank == 0 or name != cfg.student, f"rank {rank} loaded the whole student"
    return load(name, *a, **k)
loop.load_model = guarded
distill(cfg)
json.dump(seen, open(sys.argv[2] + f".rank{rank}", "w"))
"""


def torchrun(script: Path, *args, nproc: int = 2, env=None) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=600)


def test_gpu_recipe_path_two_ranks_equals_one_process(pair, tmp_path):  # noqa: F811
    """FSDP2 x 2 gloo ranks in the GPU recipe's settings == 1 process (the same global batch), and:
    - top-k cache reads outside autocast (1 process used to crash: 'Unexpected floating ScalarType');
    - the loss receives the cache's fp16 log-probs and an fp32 normalizer (FSDP2 used to cast them to bf16);
    - no rank but 0 loads the student's full weights (meta-device build, shards filled from rank 0);
    - every collective's tensors, object transport and barriers are on the training device (audit);
    - gradients are reduce-scattered once per optimizer step, not once per micro-batch."""
    one = distill(cfg_for(pair, tmp_path / "one", steps=4, batch_size=4, topk_cache=str(tmp_path / "c1"), **GPU_PATH))
    cfg = cfg_for(pair, tmp_path / "two", steps=4, batch_size=2, distributed="fsdp", device="cpu",
                  topk_cache=str(tmp_path / "c2"), **GPU_PATH)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    audit = tmp_path / "audit"
    proc = torchrun(tmp_path / "rank.py", json.dumps(cfg.__dict__), str(tmp_path / "seen"),
                    env={**ENV, "MINITRON_AUDIT_COLLECTIVES": str(audit)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # bf16 compute on both sides; the sums run in another order
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(one)), rtol=2e-2, atol=1e-3)
    ev = [[r["val_kl_topk"] for r in read_metrics(p / "metrics.jsonl") if "val_kl_topk" in r]
          for p in (one, tmp_path / "two")]
    torch.testing.assert_close(torch.tensor(ev[1]), torch.tensor(ev[0]), rtol=2e-2, atol=1e-3)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen.rank{rank}").read_text())
        train = [s for s in seen if s["logp"] is not None]
        assert train and all(s == {"logp": "torch.float16", "normalizer": "torch.float32"} for s in train), seen
        rec = json.loads((tmp_path / f"audit.rank{rank}.json").read_text())
        assert rec["device"] == "cpu" and rec["violations"] == []
        ops = {c["op"] for c in rec["calls"]}
        assert {"all_reduce", "barrier", "broadcast_object_list", "all_gather_single", "reduce_scatter_single",
                "broadcast"} <= ops, ops
        assert any(op.startswith("funcol.") for op in ops), ops  # DTensor's own (the grad norm)
        scatters = [c for c in rec["calls"] if c["op"] == "reduce_scatter_single"]
        assert len(scatters) == 4 * 3  # 4 steps x (2 layers + the root), though each step has 2 micro-batches


def test_audit_flags_tensors_off_the_training_device():
    """The audit's check itself: a CPU tensor or object transport recorded while the run trains on a GPU
    is a violation, with the call that made it."""
    from minitron.arch.audit import Audit

    a = Audit(torch.device("cuda", 1))
    a.calls = [{"op": "all_reduce", "kind": "tensor", "devices": ["cuda:1"], "caller": "loop.py:1"},
               {"op": "all_reduce", "kind": "tensor", "devices": ["cpu"], "caller": "importance.py:2"},
               {"op": "broadcast_object_list", "kind": "object", "devices": ["cuda:0"], "caller": "ranks.py:3"}]
    assert [c["caller"] for c in a.violations()] == ["importance.py:2", "ranks.py:3"]
    assert Audit(torch.device("cpu")).expected() == "cpu"


def _count_dispatch(fn, ops: set[str]) -> dict:
    """Run fn() and count the aten ops named in `ops`, with the dtypes of their first two inputs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: dict = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ops:
                key = (name, *(str(a.dtype) for a in args[:2] if isinstance(a, torch.Tensor)))
                seen[key] = seen.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return seen


def test_loss_gradient_gemms_run_in_the_autocast_dtype_without_host_syncs():
    """Under bf16 autocast every matmul of the chunked loss (logits and both gradient GEMMs) runs in bf16, and
    no chunk asks the host whether it has valid tokens (a GPU sync per 512 tokens)."""
    from minitron.distill.losses import LossConfig, chunked_distill_loss

    torch.manual_seed(0)
    h, w = torch.randn(64, 32, requires_grad=True), torch.randn(100, 32, requires_grad=True)
    idx, lp = torch.randint(0, 100, (64, 8)), torch.log_softmax(torch.randn(64, 8), -1) - 1

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_distill_loss(h, w, torch.ones(64), LossConfig(chunk_size=16), 64, teacher_topk=(idx, lp))
        loss.backward()

    seen = _count_dispatch(run, {"mm", "matmul", "addmm", "_local_scalar_dense", "is_nonzero"})
    mms = {k: n for k, n in seen.items() if k[0] in ("mm", "matmul", "addmm")}
    assert mms and all(k[1:] == ("torch.bfloat16", "torch.bfloat16") for k in mms), mms
    assert sum(n for k, n in mms.items()) == 3 * 4  # 4 chunks x (logits, grad_h, grad_w)
    assert not any(k[0] in ("_local_scalar_dense", "is_nonzero") for k in seen), seen


def test_training_forwards_build_no_kv_cache(pair, tmp_path, monkeypatch):  # noqa: F811
    """Teacher, student and validation forwards run with use_cache=False: no DynamicCache is ever built
    (at 4 x 4096 on an 8B Llama a KV cache is ~2 GiB per forward that the estimate does not hold)."""
    import transformers.models.llama.modeling_llama as llama

    built = []

    class Counting(llama.DynamicCache):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(llama, "DynamicCache", Counting)
    distill(cfg_for(pair, tmp_path / "full", steps=2, eval_every=1))
    distill(cfg_for(pair, tmp_path / "topk", steps=2, eval_every=1, topk_cache=str(tmp_path / "c"), topk=8,
                    release_teacher=True))
    assert built == []


def test_standalone_distill_joins_with_the_long_timeout(monkeypatch):
    """`minitron distill` / `correct` under torchrun join with ranks.WAIT (6 h), not NCCL's 10 minutes: rank 0
    writes the whole model (32 GB for an 8B correction) while the others wait in a barrier."""
    import torch.distributed as dist

    from minitron.arch import ranks
    from minitron.distill.parallel import init_distributed

    got = {}

    def fake_init(backend, **kw):
        got.update(backend=backend, **kw)
        raise RuntimeError("stop here")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        init_distributed(DistillConfig(student="s", out="o", steps=1, distributed="fsdp", device="cpu"))
    assert got == {"backend": "gloo", "timeout": ranks.WAIT}


def test_fsdp_refused_on_a_torch_without_fsdp2():
    """pyproject's torch floor is FSDP2's (public fully_shard / MixedPrecisionPolicy from 2.6), and an older
    torch is refused before any model is loaded."""
    from minitron.distill.parallel import TORCH_FOR, check_torch_for

    with pytest.raises(DistillError, match=r"needs torch >= 2\.6"):
        check_torch_for("fsdp", "2.5.1+cu124")
    check_torch_for("fsdp", "2.6.0")
    check_torch_for("ddp", "2.4.0")
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert floor and (int(floor[1]), int(floor[2])) == max(TORCH_FOR.values())


def test_fsdp_of_one_rank_under_torchrun(pair, tmp_path):  # noqa: F811
    """`distributed: fsdp` under torchrun with one process runs FSDP2 over a world of 1 (the multi-GPU recipe's
    path on one GPU) and equals the unsharded run."""
    one = distill(cfg_for(pair, tmp_path / "one", steps=3, topk_cache=str(tmp_path / "c1"), **GPU_PATH))
    cfg = cfg_for(pair, tmp_path / "fsdp1", steps=3, distributed="fsdp", device="cpu",
                  topk_cache=str(tmp_path / "c2"), **GPU_PATH)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    proc = torchrun(tmp_path / "rank.py", json.dumps(cfg.__dict__), str(tmp_path / "seen"), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "fsdp1" / "distill_config.json").read_text())
    assert info["distributed"] == "fsdp" and os.path.exists(tmp_path / "seen.rank0")
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "fsdp1")), torch.tensor(losses(one)), rtol=2e-2,
                               atol=1e-3)


def test_checkpointing_on_transformers_with_only_the_old_name():
    """transformers 5.17 (GPU images) has only gradient_checkpointing_enable; newer 5.x
    activation_checkpointing_enable (the old name deprecated): arch.enable_checkpointing calls what there is."""
    from minitron.arch import enable_checkpointing

    calls = []

    class Old:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    class New(Old):
        def activation_checkpointing_enable(self, kwargs=None):
            calls.append(("new", kwargs))

    enable_checkpointing(Old())
    enable_checkpointing(New())
    assert calls == [("old", {"use_reentrant": False}), ("new", {"use_reentrant": False})]
