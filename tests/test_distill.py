"""Distillation loop on tiny models: learning, resume after SIGKILL, finished dirs, top-k cache,
gradient accumulation, 2-process gloo (DDP and FSDP2) against 1 process, and clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_model, make_text, make_tokenizer
from minitron.data import DataError
from minitron.distill import CheckpointError, DistillConfig, DistillError, correct, distill, read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """teacher (tiny llama, 4 layers, hidden 64), student (2 layers, hidden 32), corpus, same tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    tok = make_tokenizer()
    teacher = make_model("llama")
    with torch.no_grad():  # peaked, context-dependent teacher distributions (a random one is near uniform)
        teacher.lm_head.weight.mul_(8.0)
    for name, model in (("teacher", teacher), ("student", make_model("llama", seed=1, **SMALL))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "corpus").mkdir()
    for i in range(3):
        (root / "corpus" / f"doc{i}.txt").write_text(make_text(300, seed=10 + i))
    return root


def cfg_for(pair, out, **over) -> DistillConfig:
    kw = dict(teacher=str(pair / "teacher"), student=str(pair / "student"), data=str(pair / "corpus"),
              out=str(out), steps=8, seq_len=32, batch_size=4, eval_every=4, eval_batches=2, save_every=2,
              lr=3e-3, min_lr=3e-4, warmup_steps=1, progress=False)
    kw.update(over)
    return DistillConfig(**kw)


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def weights(out) -> dict:
    return load_file(str(Path(out) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)


def test_distill_lowers_kl_and_writes_hf_dir(pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = distill(cfg_for(pair, tmp_path / "run", steps=16))
    info = json.loads((out / "minitron_distill.json").read_text())
    assert info["finished"] and info["steps"] == 16 and info["tokens"] == 16 * 4 * 32
    # validation is held-out documents (minitron.data.split_blocks): the tiny student gains ~6% there
    assert info["final_eval"]["val_kl"] < 0.96 * info["first_eval"]["val_kl"]
    assert sum(losses(out)[-4:]) < 0.96 * sum(losses(out)[:4])
    m = read_metrics(out / "metrics.jsonl")
    assert len([r for r in m if "loss" in r]) == 16 and [r["step"] for r in m if "val_kl" in r] == [0, 4, 8, 12, 16]
    assert (out / "loss.png").stat().st_size > 1000 and not (out / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and AutoTokenizer.from_pretrained(out).vocab_size == 384
    # a second start says so and does not retrain
    before = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert distill(cfg_for(pair, tmp_path / "run", steps=16, lr=1e-2)) == out
    assert "already holds a finished run" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == before


KILL_SCRIPT = """
import os, signal, sys
import minitron.distill as D
import minitron.distill.checkpoint as C
kill_at = int(sys.argv[2])
orig = C._commit_checkpoint
def commit(tmp, final):
    if final.name == f"step-{kill_at:07d}":
        os.kill(os.getpid(), signal.SIGKILL)  # the temp dir is written, not yet renamed
    orig(tmp, final)
C._commit_checkpoint = commit
D.distill(D.DistillConfig(**__import__("json").loads(sys.argv[1])))
"""


def test_sigkill_then_resume_matches_uninterrupted(pair, tmp_path):
    ref = distill(cfg_for(pair, tmp_path / "ref", steps=10))
    cfg = cfg_for(pair, tmp_path / "killed", steps=10)
    args = json.dumps({k: v for k, v in cfg.__dict__.items()})
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, args, "6"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = Path(cfg.out)
    assert (out / "checkpoints" / "latest").read_text() == "step-0000004"
    assert len(losses(out)) == 6 and not (out / "minitron_distill.json").exists()
    with pytest.raises(DistillError, match="--resume"):
        distill(cfg)
    with pytest.raises(DistillError, match="differ"):
        distill(cfg_for(pair, out, steps=10, lr=1e-3, resume=True))
    cfg.resume = True
    distill(cfg)
    assert len(losses(out)) == 10
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(ref)), rtol=1e-5, atol=1e-6)
    assert_same_weights(out, ref)


def test_plan_steps_fits_training_evaluations_and_saving(tmp_path):
    from minitron.distill.loop import SAVE_BYTES_PER_S, plan_steps
    from minitron.distill.parallel import Dist

    cfg = DistillConfig(student="s", out=str(tmp_path), seconds=100.0, eval_every=4, save_every=0)

    def plan(eval_s, n_trained=None):
        t_call = __import__("time").perf_counter() - 9.99  # 10 s already spent (loading, first evaluation, probe)
        return plan_steps(tmp_path, cfg, Dist(), t_call, step_s=1.0, eval_s=eval_s, done=4, tokens_per_step=256,
                          n_params=int(SAVE_BYTES_PER_S), n_trained=n_trained)  # saving: 1 + 4 s

    # left = 100 - 10 - 5 - 0.2 (final evaluation) = 84.8 s at 1 s per step + 0.2 s / 4 steps of evaluation
    assert plan(0.2) == (4 + 80, 4)
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["total_steps"] == 84 and saved["tokens"] == 84 * 256 and saved["tok_per_s"] == 256.0
    assert saved["eval_every"] == 4
    # evaluations of 2 s every 4 steps would take 44 s of 100: spaced to 3 between the first and the last (10%)
    assert plan(2.0) == (4 + 76, 22)  # 83 s at 1 + 2 / 22 s per step
    assert plan(4.0) == (4 + 81, 0)   # the first and the last alone take 8 s: no evaluation between them
    # checkpoints every 4 steps: weights 4 bytes a parameter, AdamW states 8 bytes a trained one (frozen: none)
    cfg.save_every = 4
    assert plan(0.2) == (4 + 19, 4)  # 84.8 s at 1 + 0.05 + (1 + 12) / 4 s per step
    assert plan(0.2, n_trained=int(SAVE_BYTES_PER_S) // 2) == (4 + 25, 4)  # at 1 + 0.05 + (1 + 4 + 4) / 4 s per step


def test_time_budget_plans_after_the_probe_and_resumes_with_the_plan(pair, tmp_path):
    from minitron.distill.loop import lr_at

    cfg = cfg_for(pair, tmp_path / "run", steps=None, seconds=600.0, probe_steps=3, warmup_steps=None,
                  save_every=2, eval_every=0)
    with pytest.raises(DistillError, match="one budget"):
        cfg_for(pair, tmp_path / "x", seconds=4.0)  # steps too
    args = json.dumps({k: v for k, v in cfg.__dict__.items()})
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, args, "4"], env=ENV, capture_output=True, text=True)
    out = Path(cfg.out)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed at step 4's checkpoint, after the plan (step 3)
    plan = json.loads((out / "budget.json").read_text())
    assert plan["probe_steps"] == 3 and plan["total_steps"] > 100, plan   # tiny steps: many fit in 600 s
    plan["total_steps"], plan["eval_every"] = 9, 3  # what the resumed run must follow instead of planning again
    (out / "budget.json").write_text(json.dumps(plan))
    cfg.resume = True
    distill(cfg)                                                         # resumes with the plan, not a new one
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, plan["total_steps"] + 1))
    assert [r["step"] for r in rows if "val_kl" in r] == [0, 3, 6, 9]  # every 3 steps as planned, not eval_every 0
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[:3] == pytest.approx([cfg.lr / 3, 2 * cfg.lr / 3, cfg.lr])  # the warm-up is the probe
    assert lrs == pytest.approx([lr_at(i, cfg, plan["total_steps"]) for i in range(plan["total_steps"])])  # cosine
    assert json.loads((out / "minitron_distill.json").read_text())["steps"] == plan["total_steps"]


def test_time_budget_plans_again_a_third_and_two_thirds_of_the_way_and_keeps_to_it(pair, tmp_path):
    """The probe's first steps run slower than later ones: a third and two thirds of the way the steps are planned
    again from the steps timed since, the first plan kept in budget.json, and the run does the last plan's steps."""
    cfg = cfg_for(pair, tmp_path / "run", steps=None, seconds=10.0, probe_steps=3, warmup_steps=None,
                  save_every=0, eval_every=0)
    distill(cfg)
    plan = json.loads((Path(cfg.out) / "budget.json").read_text())
    one, two = plan["replans"]
    assert one["at_step"] == 3 + (one["total_steps_before"] - 3) // 3 and plan["probe_steps"] == 3
    # the second from the first's plan (its total is the second's total_steps_before), half of what it left
    assert two["at_step"] == one["at_step"] + (two["total_steps_before"] - one["at_step"]) // 2
    assert "replanned" not in plan and two["at_step"] < plan["total_steps"]  # the last plan is replans[-1]
    rows = read_metrics(Path(cfg.out) / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, plan["total_steps"] + 1))
    assert json.loads((Path(cfg.out) / "minitron_distill.json").read_text())["steps"] == plan["total_steps"]


def test_grad_accum_matches_bigger_batch(pair, tmp_path):
    a = distill(cfg_for(pair, tmp_path / "a", steps=4, batch_size=4, grad_accum=1))
    b = distill(cfg_for(pair, tmp_path / "b", steps=4, batch_size=2, grad_accum=2))
    torch.testing.assert_close(torch.tensor(losses(a)), torch.tensor(losses(b)), rtol=1e-5, atol=1e-6)
    assert_same_weights(a, b)


def test_topk_cache_full_k_matches_logits_and_is_reused(pair, tmp_path):
    full = distill(cfg_for(pair, tmp_path / "full", steps=4, temperature=2.0))
    cache = tmp_path / "cache"
    topk = distill(cfg_for(pair, tmp_path / "topk", steps=4, temperature=2.0, topk_cache=str(cache), topk=384))
    torch.testing.assert_close(torch.tensor(losses(topk)), torch.tensor(losses(full)), rtol=1e-4, atol=1e-6)
    # the cache holds fp16 log-probs: AdamW's near-sign steps on near-zero gradients (rare tokens' rows) may
    # differ by up to ~2 lr; each tensor stays within 2e-2 (relative, L2; lm_head, the largest, 0.8% here)
    for name, (a, b) in {k: (v, weights(full)[k]) for k, v in weights(topk).items()}.items():
        assert ((a - b).norm() / b.norm()).item() < 2e-2, name
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["k"] == 384 and meta["temperature"] == 2.0
    stamp = (cache / "meta.json").stat().st_mtime_ns
    small = distill(cfg_for(pair, tmp_path / "topk-again", steps=4, temperature=2.0, topk_cache=str(cache),
                            topk=384))
    assert (cache / "meta.json").stat().st_mtime_ns == stamp and losses(small) == losses(topk)
    # other settings, or the same teacher name with other weights: rebuilt (saying why), never reused
    distill(cfg_for(pair, tmp_path / "topk-k8", steps=4, temperature=2.0, topk_cache=str(cache), topk=8))
    meta8 = json.loads((cache / "meta.json").read_text())
    assert meta8["k"] == 8 and meta8["teacher_id"] == meta["teacher_id"]
    copy = tmp_path / "teacher-copy"
    shutil.copytree(pair / "teacher", copy)  # same files (mtimes kept): the same teacher, the cache is reused
    stamp8 = (cache / "meta.json").stat().st_mtime_ns
    distill(cfg_for(pair, tmp_path / "topk-copy", steps=4, temperature=2.0, topk_cache=str(cache), topk=8,
                    teacher=str(copy)))
    assert (cache / "meta.json").stat().st_mtime_ns == stamp8
    teacher = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1.5)
    teacher.save_pretrained(copy)  # same dir, new weights (e.g. corrected in place): rebuilt
    distill(cfg_for(pair, tmp_path / "topk-new-teacher", steps=4, temperature=2.0, topk_cache=str(cache), topk=8,
                    teacher=str(copy)))
    assert json.loads((cache / "meta.json").read_text())["teacher_id"] != meta8["teacher_id"]


def test_release_teacher_evaluates_from_top_k(pair, tmp_path, monkeypatch):
    """release_teacher: after the cache is built the teacher is never run again (it is freed), and the
    validation KL comes from its top-k + rest buckets: with k = vocab that is the full KL of a kept teacher."""
    import minitron.distill.student as student_mod

    cache = str(tmp_path / "cache")
    kept = distill(cfg_for(pair, tmp_path / "kept", steps=4, topk_cache=cache, topk=384))
    calls = []
    monkeypatch.setattr(student_mod, "teacher_pass", lambda *a, **k: calls.append(1))
    freed = distill(cfg_for(pair, tmp_path / "freed", steps=4, topk_cache=cache, topk=384, release_teacher=True))
    assert calls == []
    evals = [r for r in read_metrics(freed / "metrics.jsonl") if "val_lm_loss" in r]
    kept_evals = [r for r in read_metrics(kept / "metrics.jsonl") if "val_lm_loss" in r]
    assert all(r["val_kl"] is None for r in evals) and len(evals) == len(kept_evals) == 2
    torch.testing.assert_close(torch.tensor([r["val_kl_topk"] for r in evals]),
                               torch.tensor([r["val_kl"] for r in kept_evals]), rtol=1e-4, atol=1e-6)
    assert losses(freed) == losses(kept)
    with pytest.raises(DistillError, match="release_teacher"):
        cfg_for(pair, tmp_path / "no-cache", release_teacher=True)


def test_evaluation_runs_without_autograd():
    """Validation forwards build no graph (a graph per validation batch would hold its activations)."""
    from minitron.distill.parallel import Dist
    from minitron.distill.student import evaluate

    grad_modes = []

    class Recorder:  # stands in for the trained module: records the grad mode of each forward
        def eval(self):
            pass

        def train(self):
            pass

        def __call__(self, ids, *args, **kwargs):
            grad_modes.append(torch.is_grad_enabled())
            return (torch.zeros(()),) * 3

    cfg = DistillConfig(student="s", out="o", steps=1, batch_size=2, eval_batches=2)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731 - evaluate calls it per batch
    ev = evaluate(Recorder(), None, torch.zeros(4, 8, dtype=torch.long), cfg, Dist(), "cpu", no_autocast)
    assert grad_modes == [False, False] and ev["val_lm_loss"] == 0.0


def test_topk_cache_small_k_learns(pair, tmp_path):
    out = distill(cfg_for(pair, tmp_path / "k64", steps=16, topk_cache=str(tmp_path / "c64"), topk=64))
    info = json.loads((out / "minitron_distill.json").read_text())
    assert info["final_eval"]["val_kl"] < 0.97 * info["first_eval"]["val_kl"]  # full-vocabulary KL, held out
    assert sum(losses(out)[-4:]) < 0.95 * sum(losses(out)[:4])


def test_hidden_loss_with_projection_and_bf16_checkpointing(pair, tmp_path):
    out = distill(cfg_for(pair, tmp_path / "hid", steps=6, hidden_loss="cosine", hidden_weight=0.5,
                          autocast="bf16", grad_checkpointing=True))
    m = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["hidden_loss"] > 0 for r in m) and m[-1]["hidden_loss"] < m[0]["hidden_loss"]
    for r in m:
        assert abs(r["loss"] - (r["logit_loss"] + 0.5 * r["hidden_loss"])) < 1e-4
    with pytest.raises(DistillError, match="layer_map"):
        distill(cfg_for(pair, tmp_path / "hid-bad", hidden_loss="mse", layer_map=[0, 9]))


def test_hidden_loss_maps_the_layers_the_plan_kept(pair, tmp_path):
    """A pruned student's plan.json (written by minitron prune) sets the hidden-state loss' teacher layers: the
    layers it kept, not an even spread; a plan cut from a model of another depth is ignored."""
    student = tmp_path / "student"
    shutil.copytree(pair / "student", student)
    plan = {"source": {"layers": 4}, "kept_layers": [0, 2]}  # layers 1 and 3 of the 4-layer teacher dropped
    (student / "plan.json").write_text(json.dumps(plan))
    out = distill(cfg_for(pair, tmp_path / "kept", student=str(student), steps=2, hidden_loss="cosine"))
    assert json.loads((out / "minitron_distill.json").read_text())["layer_map"] == [0, 2]
    (student / "plan.json").write_text(json.dumps({**plan, "source": {"layers": 6}}))  # an iterative step's plan
    out = distill(cfg_for(pair, tmp_path / "spread", student=str(student), steps=2, hidden_loss="cosine"))
    assert json.loads((out / "minitron_distill.json").read_text())["layer_map"] == [1, 3]  # default_layer_map(2, 4)


def test_correct_lowers_lm_loss(pair, tmp_path):
    out = correct(str(pair / "student"), str(pair / "corpus"), str(tmp_path / "corr"), steps=10, seq_len=32,
                  batch_size=4, eval_every=0, lr=1e-2, progress=False)
    info = json.loads((out / "minitron_distill.json").read_text())
    assert info["final_eval"]["val_kl"] is None
    assert info["final_eval"]["val_lm_loss"] < info["first_eval"]["val_lm_loss"] - 0.05


def test_bad_inputs_raise_clear_errors(pair, tmp_path):
    other = tmp_path / "other-vocab"
    model = make_model("llama", vocab=400, **SMALL)
    model.save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    with pytest.raises(DistillError, match="vocabulary mismatch"):
        distill(cfg_for(pair, tmp_path / "v", student=str(other)))
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one batch of blocks. " * 3)  # 90 tokens: 2 blocks
    with pytest.raises(DataError, match="corpus too short for one batch"):
        distill(cfg_for(pair, tmp_path / "s", data=str(short)))
    with pytest.raises(DistillError, match="budget"):
        DistillConfig(student="x", out="y")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        distill(cfg_for(pair, tmp_path / "nothing", resume=True))
    # a corrupt checkpoint
    cfg = cfg_for(pair, tmp_path / "corrupt", steps=6)
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.__dict__), "4"], env=ENV, check=False,
                   capture_output=True)
    ckpt = tmp_path / "corrupt" / "checkpoints" / "step-0000002"
    for shard in ckpt.glob("*.distcp"):  # torch.distributed.checkpoint's data files
        shard.write_bytes(b"not a checkpoint")
    cfg.resume = True
    with pytest.raises(CheckpointError, match="corrupt"):
        distill(cfg)


DIST_SCRIPT = """
import json, sys
from minitron.distill import DistillConfig, distill
distill(DistillConfig(**json.loads(sys.argv[1])))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(pair, tmp_path, mode):
    """2 gloo ranks with batch 2 == 1 process with batch 4. FSDP2 is also SIGKILLed at step 4 and resumed."""
    one = distill(cfg_for(pair, tmp_path / "one", steps=6, batch_size=4, eval_every=3))
    cfg = cfg_for(pair, tmp_path / mode, steps=6, batch_size=2, eval_every=3, distributed=mode)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    if mode == "fsdp":
        (tmp_path / "kill.py").write_text(KILL_SCRIPT)
        proc = subprocess.run([*torchrun, str(tmp_path / "kill.py"), json.dumps(cfg.__dict__), "4"], env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and (Path(cfg.out) / "checkpoints" / "latest").read_text() == "step-0000002"
        cfg.resume = True
    (tmp_path / "run.py").write_text(DIST_SCRIPT)
    proc = subprocess.run([*torchrun, str(tmp_path / "run.py"), json.dumps(cfg.__dict__)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = Path(cfg.out)
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-4, atol=1e-6)
    ev1 = [r["val_kl"] for r in read_metrics(one / "metrics.jsonl") if "val_kl" in r]
    ev2 = [r["val_kl"] for r in read_metrics(two / "metrics.jsonl") if "val_kl" in r]
    torch.testing.assert_close(torch.tensor(ev2), torch.tensor(ev1), rtol=1e-4, atol=1e-6)
    assert_same_weights(two, one, atol=1e-5)


@pytest.mark.slow
def test_real_teacher_sliced_student_kl_drops(tmp_path):
    """Default teacher (SmolLM2-135M) -> its first 8 layers as the student, a few steps on the default corpus."""
    from torch import nn

    from minitron.arch import decoder_layers, set_decoder_layers
    from minitron.arch.models import load_model

    teacher, tok = load_model("default")
    set_decoder_layers(teacher, nn.ModuleList(list(decoder_layers(teacher))[:8]))
    teacher.config.num_hidden_layers = 8
    teacher.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    out = distill(DistillConfig(teacher="default", student=str(tmp_path / "student"), data="default",
                                out=str(tmp_path / "run"), steps=6, seq_len=128, batch_size=4, max_blocks=96,
                                eval_every=0, eval_batches=1, lr=3e-4, progress=False))
    info = json.loads((out / "minitron_distill.json").read_text())
    assert info["final_eval"]["val_kl"] < 0.9 * info["first_eval"]["val_kl"]


def test_heldout_corpora_and_split_seed(pair, tmp_path):
    """Extra held-out corpora are logged at every evaluation; another training seed keeps the validation split."""
    other = tmp_path / "other.txt"
    other.write_text(make_text(200, seed=99))
    a = distill(cfg_for(pair, tmp_path / "a", steps=4, heldout=[str(other)], seed=0))
    b = distill(cfg_for(pair, tmp_path / "b", steps=4, heldout=[str(other)], seed=1))
    evals_a = [r for r in read_metrics(a / "metrics.jsonl") if "val_lm_loss" in r]
    evals_b = [r for r in read_metrics(b / "metrics.jsonl") if "val_lm_loss" in r]
    key = f"val_lm_loss:{other}"
    assert [r["step"] for r in evals_a] == [0, 4] and all(r[key] > 0 for r in evals_a)
    # step 0: same student, same validation blocks (split_seed), so the same losses under both seeds
    assert evals_a[0]["val_lm_loss"] == pytest.approx(evals_b[0]["val_lm_loss"], rel=1e-6)
    assert evals_a[0][key] == pytest.approx(evals_b[0][key], rel=1e-6)
    # different data order: the trained students differ
    assert evals_a[1]["val_lm_loss"] != pytest.approx(evals_b[1]["val_lm_loss"], rel=1e-6)
    # the logged value is the student's LM loss on the first eval_batches x batch_size blocks of that corpus
    from minitron.arch.models import lm_loss, load_model
    from minitron.data import pack, read_texts

    student, tok = load_model(str(pair / "student"))
    blocks = pack(read_texts(str(other)), tok, 32, max_blocks=8)
    assert evals_a[0][key] == pytest.approx(lm_loss(student, blocks), rel=1e-4)


def test_fsdp_checkpoint_resumes_at_another_world_size(pair, tmp_path):
    """2 FSDP2 ranks (batch 2) SIGKILLed at step 4, resumed by 1 process (batch 4: the same global batch) from
    the sharded torch.distributed.checkpoint: the same final weights as an uninterrupted 1-process run."""
    one = distill(cfg_for(pair, tmp_path / "one", steps=6, batch_size=4, eval_every=3))
    cfg = cfg_for(pair, tmp_path / "resharded", steps=6, batch_size=2, eval_every=3, distributed="fsdp")
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    proc = subprocess.run([*torchrun, str(tmp_path / "kill.py"), json.dumps(cfg.__dict__), "4"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    ckpt = Path(cfg.out) / "checkpoints" / "step-0000002"
    assert proc.returncode != 0 and (Path(cfg.out) / "checkpoints" / "latest").read_text() == ckpt.name
    assert len(list(ckpt.glob("*.distcp"))) == 2  # each rank wrote its own shard; nothing was gathered
    with pytest.raises(DistillError, match="global batch"):  # another global batch would change the data order
        distill(cfg_for(pair, cfg.out, steps=6, batch_size=2, eval_every=3, distributed="fsdp", resume=True))
    two_then_one = distill(cfg_for(pair, cfg.out, steps=6, batch_size=4, eval_every=3, distributed="fsdp",
                                   resume=True))
    torch.testing.assert_close(torch.tensor(losses(two_then_one)), torch.tensor(losses(one)), rtol=1e-4, atol=1e-6)
    assert_same_weights(two_then_one, one, atol=1e-5)


def test_freeze_embeddings_trains_all_but_the_embedding_and_lm_head(pair, tmp_path):
    """freeze_embeddings: the token embedding and the LM head come out bit-identical while every other weight
    moves and the loss still falls."""
    out = distill(cfg_for(pair, tmp_path / "fe", steps=6, freeze_embeddings=True, eval_every=0))
    before, after = load_file(str(pair / "student" / "model.safetensors")), weights(out)
    frozen = [k for k in after if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("proj.weight"))
    assert sum(losses(out)[-2:]) < sum(losses(out)[:2])


def test_bf16_compute_keeps_fp32_master_weights(pair, tmp_path):
    """dtype=bfloat16 trains fp32 master weights with bf16 compute: updates far below bf16's resolution at
    |w| ~ 0.02 (lr 1e-6) still move the weights, which pure bf16 parameters would round away."""
    out = distill(cfg_for(pair, tmp_path / "bf16", steps=3, lr=1e-6, min_lr=1e-6, dtype="bfloat16"))
    info = json.loads((out / "minitron_distill.json").read_text())
    assert info["precision"] == {"master": "torch.float32", "compute": "torch.bfloat16", "teacher": "torch.bfloat16"}
    before = load_file(str(pair / "student" / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    key = next(k for k in after if k.endswith("mlp.up_proj.weight"))
    assert after[key].dtype == torch.float32
    delta = (after[key] - before[key]).abs()
    bf16_step = before[key].abs() * 2.0**-8  # half a bf16 ulp: smaller updates vanish in bf16 weights
    assert 0 < delta.max() < 1e-4 and bool((delta[delta > 0] < bf16_step[delta > 0]).any())


def test_collectives_refuse_tensors_off_the_training_device():
    """Dist checks every collective's tensor against the training device (NCCL serves only CUDA tensors):
    a CPU tensor while training on another device is a clear error, not a crash inside NCCL."""
    from minitron.distill.parallel import Dist

    d = Dist(0, 1, "none", torch.device("meta"))
    with pytest.raises(RuntimeError, match="NCCL serves only CUDA tensors"):
        d.sum(torch.zeros(3))
    assert d.sum(d.tensor([1.0, 2.0])).device.type == "meta"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_collective_runs_on_the_training_device(pair, tmp_path, mode):
    """2 gloo ranks under the collective audit (minitron.arch.audit): every tensor, object transport and barrier of every
    collective (DDP's and FSDP2's inside torch, DCP's, DTensor's included) is on the training device."""
    cfg = cfg_for(pair, tmp_path / mode, steps=2, batch_size=2, eval_every=1, distributed=mode, device="cpu")
    (tmp_path / "run.py").write_text(DIST_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(tmp_path / "run.py"), json.dumps(cfg.__dict__)], capture_output=True,
                          env={**ENV, "MINITRON_AUDIT_COLLECTIVES": str(tmp_path / "audit")}, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"audit.rank{rank}.json").read_text())
        ops = {c["op"] for c in rec["calls"]}
        assert rec["device"] == "cpu" and rec["violations"] == []
        # DDP's bucketed gradient all-reduce runs in its C++ reducer, on the parameters' device; FSDP2's are seen
        assert {"all_reduce", "barrier"} <= ops and (mode == "ddp" or {"broadcast_object_list", "reduce_scatter_single",
                                                                        "all_gather_single"} <= ops), ops


def test_autocast_auto_takes_the_faster_measured_and_keeps_it_on_resume(pair, tmp_path, monkeypatch):
    """autocast: auto times the student in fp32 and under bf16 autocast and trains in the faster (here forced
    each way by a fake clock); distill_config.json records the choice and the timings, the precision follows it,
    and a resumed run keeps the saved choice instead of measuring again."""
    from minitron.distill import precision as prec_mod

    for fast, compute in (("bf16", "torch.bfloat16"), ("fp32", "torch.float32")):
        calls = []

        def fake(model, ids, bf16, fast=fast, calls=calls):
            calls.append((tuple(ids.shape), bf16))
            return 0.1 if (bf16 == (fast == "bf16")) else 0.3

        monkeypatch.setattr(prec_mod, "_pass_seconds", fake)
        out = tmp_path / fast
        cfg = cfg_for(pair, out, steps=4, save_every=2, autocast="auto")
        with pytest.raises(SystemExit):  # stop after the first checkpoint, as a killed run would
            _stop_after_checkpoint(monkeypatch, lambda cfg=cfg: distill(cfg))
        assert calls == [((1, 32), False), ((1, 32), True)] * (prec_mod.TIMED_PASSES + 1)
        chosen = json.loads((out / "distill_config.json").read_text())["autocast_chosen"]
        assert chosen["autocast"] == ("bf16" if fast == "bf16" else "none") and chosen["how"] == "measured"
        assert {chosen["fp32_s"], chosen["bf16_s"]} == {0.1, 0.3}
        calls.clear()
        monkeypatch.undo()
        distill(cfg_for(pair, out, steps=4, save_every=2, autocast="auto", resume=True))
        assert calls == []  # not measured again
        assert json.loads((out / "minitron_distill.json").read_text())["precision"]["compute"] == compute


def _stop_after_checkpoint(monkeypatch, run):
    """Run `run` until the first checkpoint has been written, then raise SystemExit."""
    from minitron.distill import loop

    real = loop.save_checkpoint

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise SystemExit

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    run()


def test_autocast_choice_on_a_gpu_and_when_given():
    from minitron.distill.parallel import Dist
    from minitron.distill.precision import choose_autocast, precision

    model = torch.nn.Linear(2, 2)
    cfg = DistillConfig(student="s", out="o", steps=1, autocast="bf16")
    assert choose_autocast(cfg, model, torch.device("cpu"), Dist()) == {"autocast": "bf16", "how": "given"}
    cfg.autocast = "auto"
    saved = {"autocast": "none", "how": "measured", "fp32_s": 0.1, "bf16_s": 0.2}
    assert choose_autocast(cfg, model, torch.device("cpu"), Dist(), saved)["autocast"] == "none"
    p = precision(cfg, torch.device("cpu"), "bf16")
    assert p["compute"] == torch.bfloat16 and p["teacher"] == torch.bfloat16 and p["master"] == torch.float32
    assert precision(cfg, torch.device("cpu"), "none")["compute"] == torch.float32
    with pytest.raises(DistillError, match="none, bf16 or auto"):
        DistillConfig(student="s", out="o", steps=1, autocast="fp16")


def test_measure_autocast_times_both_modes_and_clears_gradients():
    from minitron.distill.precision import measure_autocast

    model = make_model("llama", seed=1, **SMALL)
    timed = measure_autocast(model, 16, torch.device("cpu"))
    assert timed["fp32_s"] > 0 and timed["bf16_s"] > 0
    assert all(p.grad is None for p in model.parameters())
