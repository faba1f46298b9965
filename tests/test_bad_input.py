"""The bad-input catalogue: every command fed something wrong must exit 2 with one clear error that names
the problem and the fix, and must leave no output (and no temp dir) where a finished one is expected.

Each case is driven through the CLI as a user types it (`minitron.cli.main([...])`), on tiny models
(minitron.arch.tiny) and the tiny corpus. Cases:

models
  1. unknown architecture (a model_type transformers does not know)
  2. an architecture transformers knows but minitron does not prune (gpt2), refused before weights load
  3. a model dir with config.json but no weight file
  4. a truncated model.safetensors
  5. a --model path that does not exist (a typo), not mistaken for a hub id
  6. NaN/inf in a model dir's weights: prune, distill (student) and distill (teacher) refuse, naming the tensor
  7. an unknown --dtype
data
  8. an empty corpus
  9. a corpus shorter than one block
 10. fewer corpus blocks than --calib-samples
 11. a --calib-data path that does not exist
targets (all refused from the config alone, before any weight is loaded)
 12. target larger than the source (--hidden, --params)
 13. heads not a multiple of KV heads
 14. hidden not a multiple of heads where the family needs it (llama)
 15. --drop-layers out of range, or unreadable
 16. a scores file from another model (prune --scores)
 16b. per-layer widths for a family llama.cpp's deci / vLLM's nemotron-nas cannot run (gemma3), or an unknown axis
evaluation tasks
 17. unknown task (eval, and a recipe's eval.tasks)
 18. task data missing while offline
distillation
 19. teacher/student vocabulary mismatch
 20. --resume with changed settings (and a rerun with the same settings resumes and finishes)
 21. an unfinished run without --resume; --resume with no checkpoint
 22. NaN in a distill checkpoint
recipes
 23. unknown recipe key (in the YAML and in a dotted override)
 24. wrong type in a recipe
 25. `run` killed after a stage, rerun with a changed setting: the stale stage is redone (or refused), not reused
 26. unknown --from stage
outputs
 27. --out that is a file (prune, distill, run)
 28. disk full while writing a stage (weights or a JSON file): says so, leaves neither the folder nor temp dirs
 29. killed mid-stage (an exception inside the stage), then rerun: nothing left, the rerun succeeds
 30. killed outright (SIGKILL) while writing, then rerun: the stale temp dir is removed, the rerun succeeds
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from minitron.arch.tiny import make_model, make_text, make_tokenizer
from minitron.cli import main

FAMILY = "llama"  # hidden must be a multiple of heads here (case 14)
FAST = ["--calib-samples", "4", "--seq-len", "32", "--heldout-samples", "2", "--batch-size", "4", "--device", "cpu"]


# ---- fixtures and helpers --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (d / f"doc{i}.txt").write_text(make_text(300, seed=10 + i))
    return d


def save_model(path: Path, tok, family: str = FAMILY, **over) -> Path:
    make_model(family, **over).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return save_model(tmp_path_factory.mktemp("models") / "tiny-llama", tok)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, model_dir, corpus):
    """One finished prune (its scores.safetensors is reused by case 16)."""
    out = tmp_path_factory.mktemp("pruned") / "p"
    assert main(["prune", "--model", str(model_dir), "--calib-data", str(corpus), "--out", str(out),
                 "--hidden", "48", *FAST]) == 0
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `minitron argv...`; return (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_error(rc: int, err: str, *phrases: str) -> None:
    """Exit code 2 and every phrase (case-insensitive) in the one-line error."""
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    low = err.lower()
    missing = [p for p in phrases if p.lower() not in low]
    assert not missing, f"error lacks {missing}:\n{err}"


def assert_nothing_at(out: Path) -> None:
    """No output where a finished one is expected, and no temp dir of it beside it."""
    out = Path(out)
    assert not out.exists(), f"{out} was left behind: {sorted(p.name for p in out.iterdir()) if out.is_dir() else 'a file'}"
    if out.parent.is_dir():
        temps = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp"))
        assert not temps, f"temp dirs left beside {out}: {temps}"


def prune_args(model: Path, corpus: Path, out: Path, *target: str) -> list[str]:
    return ["prune", "--model", model, "--calib-data", corpus, "--out", out, *target, *FAST]


class WeightsLoaded(BaseException):
    """Raised by the patched from_pretrained: a check that needs only the config loaded the weights."""


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load model weights fails the test: the check must run on the config alone."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise WeightsLoaded("weights were loaded before the config/target check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def distill_args(teacher: Path, student: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", teacher, "--student", student, "--data", corpus, "--out", out, "--steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--eval-every", "0", "--save-every", "1",
            "--device", "cpu", "--no-progress", *extra]


def killed_distill(monkeypatch, model_dir: Path, corpus: Path, out: Path) -> list[str]:
    """A distillation killed after its step-1 checkpoint (before it finished); returns its arguments."""
    import minitron.distill as D
    import minitron.distill.loop as loop

    args = distill_args(model_dir, model_dir, corpus, out)

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "finish", killed)
        with pytest.raises(KeyboardInterrupt):
            main([str(a) for a in args])
    assert (out / "checkpoints" / "latest").is_file() and not (out / D.FINISHED).exists()
    return args


def write_recipe(path: Path, model: Path, corpus: Path, out: Path, **sections) -> Path:
    recipe = {"out": str(out), "model": {"teacher": str(model), "device": "cpu"},
              "data": {"corpus": str(corpus), "seq_len": 32},
              "importance": {"calib_samples": 4, "heldout_samples": 2, "batch_size": 4},
              "target": {"hidden": 48}, "distill": {"tokens": 128, "batch_size": 2, "eval_every": 0, "save_every": 1},
              "eval": {"tasks": [f"loss:{corpus}"], "ppl_limit": 2, "batch_size": 4}}
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) \
            else value
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---- models ------------------------------------------------------------------------------------------

def test_unknown_architecture(tmp_path, model_dir, corpus, capsys):
    bad = copy_model(model_dir, tmp_path / "frob")
    config = json.loads((bad / "config.json").read_text())
    config.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(bad, corpus, out, "--hidden", "48"))
    assert_error(rc, err, "frobnicator", "unsupported architecture", "llama", "qwen2")
    assert_nothing_at(out)


def test_unsupported_family_refused_before_loading(tmp_path, tok, corpus, capsys, no_weight_loading):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(gpt2, corpus, out, "--hidden", "48"))
    assert_error(rc, err, "gpt2", "not supported", "supported families", "llama")
    assert_nothing_at(out)


def test_config_without_weights(tmp_path, model_dir, corpus, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, bare)
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(bare, corpus, out, "--hidden", "48"))
    assert_error(rc, err, str(bare), "no weights", "model.safetensors", "save_pretrained")
    assert_nothing_at(out)


def test_truncated_safetensors(tmp_path, model_dir, corpus, capsys):
    cut = copy_model(model_dir, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(cut, corpus, out, "--hidden", "48"))
    assert_error(rc, err, str(weights), "truncated or corrupt", "again", "save_pretrained")
    assert_nothing_at(out)


def test_model_path_that_does_not_exist(tmp_path, corpus, capsys):
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(missing, corpus, out, "--hidden", "48"))
    assert_error(rc, err, str(missing), "does not exist", "check the path")
    assert "repo id" not in err.lower()  # not read as a hub id
    assert_nothing_at(out)


def _poison(model: Path, key: str) -> None:
    weights = model / "model.safetensors"
    sd = load_file(str(weights))
    sd[key][0, 0] = float("nan")
    sd[key][1, 1] = float("inf")
    save_file(sd, str(weights), metadata={"format": "pt"})


NAN_KEY = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("where", ["prune", "distill-student", "distill-teacher"])
def test_nan_weights_in_model_dir(tmp_path, model_dir, corpus, capsys, where):
    bad = copy_model(model_dir, tmp_path / "nan-model")
    _poison(bad, NAN_KEY)
    out = tmp_path / "out"
    if where == "prune":
        argv = prune_args(bad, corpus, out, "--hidden", "48")
    elif where == "distill-student":
        argv = distill_args(model_dir, bad, corpus, out)
    else:
        argv = distill_args(bad, model_dir, corpus, out)
    rc, err = cli(capsys, *argv)
    assert_error(rc, err, NAN_KEY, "NaN/inf", "2 of", "earlier good checkpoint", "re-export")
    assert_nothing_at(out)


def test_unknown_dtype(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model_dir, corpus, out, "--hidden", "48"), "--dtype", "float8")
    assert_error(rc, err, "float8", "dtype", "use one of", "bfloat16")
    assert_nothing_at(out)


# ---- data --------------------------------------------------------------------------------------------

def test_empty_corpus(tmp_path, model_dir, capsys):
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("   \n\n")
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model_dir, empty, out, "--hidden", "48"))
    assert_error(rc, err, str(empty), "no text", "text, jsonl, json, parquet or arrow")
    assert_nothing_at(out)


def test_corpus_shorter_than_one_block(tmp_path, model_dir, capsys):
    short = tmp_path / "short.txt"
    short.write_text("The model prunes heads.")
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model_dir, short, out, "--hidden", "48"))
    assert_error(rc, err, "too short", "one block of 32", "more text", "smaller --seq-len")
    assert_nothing_at(out)


def test_fewer_blocks_than_calib_samples(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model_dir, corpus, out, "--hidden", "48"), "--calib-samples", "100000")
    assert_error(rc, err, "100000 samples", "lower --calib-samples")
    assert_nothing_at(out)


def test_corpus_path_that_does_not_exist(tmp_path, model_dir, capsys):
    missing = tmp_path / "no-such-corpus"
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model_dir, missing, out, "--hidden", "48"))
    assert rc == 2, err
    assert str(missing) in err
    low = err.lower()
    assert any(p in low for p in ("does not exist", "not found", "no such file")), err  # the problem
    assert "--calib-data" in err or "--data" in err, err                                # the fix
    assert_nothing_at(out)


# ---- targets: checked on the config, before any weight is loaded ---------------------------------------

@pytest.mark.parametrize("target, phrases", [
    (["--hidden", "128"], ["hidden=128", "larger than the source", "64", "only shrinks"]),
    (["--params", "10M"], ["not smaller than the model", "smaller --params"]),
    (["--heads", "3"], ["3 query heads", "multiple of kv_heads"]),
    (["--hidden", "62"], ["hidden=62", "not a multiple of heads=4", "llama", "e.g. 60"]),
    (["--drop-layers", "2-4"], ["--drop-layers", "layer 4", "has 4", "0-based"]),
    (["--drop-layers", "two"], ["cannot read layer list", "e.g. 16-29"]),
], ids=["larger-hidden", "larger-params", "heads-vs-kv", "hidden-vs-heads", "drop-out-of-range", "drop-unreadable"])
def test_bad_target(tmp_path, model_dir, corpus, capsys, no_weight_loading, target, phrases):
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model_dir, corpus, out, *target))
    assert_error(rc, err, *phrases)
    assert_nothing_at(out)


@pytest.mark.parametrize("family, target, phrases", [
    ("gemma3_text", ["--ffn", "64", "--layer-widths", "ffn"], ["Llama-math families only", "gemma3_text",
                                                             "uniform widths"]),
    ("llama", ["--ffn", "64", "--layer-widths", "heads"], ["layer_widths", "choose one or both of ffn, kv_heads"]),
], ids=["per-layer-family", "per-layer-axis"])
def test_bad_per_layer_target(tmp_path, tok, corpus, capsys, no_weight_loading, family, target, phrases):
    model = save_model(tmp_path / family, tok, family)
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(model, corpus, out, *target))
    assert_error(rc, err, *phrases)
    assert_nothing_at(out)


def test_scores_from_another_model(tmp_path, tok, pruned, corpus, capsys):
    other = save_model(tmp_path / "two-layer", tok, layers=2)
    out = tmp_path / "out"
    rc, err = cli(capsys, *prune_args(other, corpus, out, "--hidden", "48"), "--scores", pruned / "scores.safetensors")
    assert_error(rc, err, "scores.safetensors", "measured on a model of dims", "drop --scores")
    assert_nothing_at(out)


# ---- evaluation tasks --------------------------------------------------------------------------------

def test_unknown_task(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "eval"
    rc, err = cli(capsys, "eval", "--model", model_dir, "--tasks", "piqa_typo", "--out", out, "--device", "cpu")
    assert_error(rc, err, "unknown task 'piqa_typo'", "known tasks", "piqa", "wikitext2")
    assert_nothing_at(out)
    run_out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, corpus, run_out, eval={"tasks": ["piqa_typo"]})
    rc, err = cli(capsys, "run", recipe)
    assert_error(rc, err, "unknown task 'piqa_typo'", "known tasks")
    assert_nothing_at(run_out)


def test_task_data_missing_offline(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))  # no task fetched earlier
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "eval"
    rc, err = cli(capsys, "eval", "--model", model_dir, "--tasks", "piqa", "--data-dir", data, "--out", out,
                  "--device", "cpu")
    assert_error(rc, err, "task 'piqa'", str(data / "piqa" / "valid.jsonl"), "put", "offline")
    assert_nothing_at(out)


# ---- distillation ------------------------------------------------------------------------------------

def test_vocab_mismatch(tmp_path, tok, model_dir, corpus, capsys):
    student = save_model(tmp_path / "vocab512", tok, vocab=512)
    out = tmp_path / "out"
    rc, err = cli(capsys, *distill_args(model_dir, student, corpus, out))
    assert_error(rc, err, "vocabulary mismatch", "384", "512", "same tokenizer", "prune the student from this teacher")
    assert_nothing_at(out)


def test_resume_with_changed_settings_then_same(tmp_path, model_dir, corpus, capsys, monkeypatch):
    out = tmp_path / "distill"
    args = killed_distill(monkeypatch, model_dir, corpus, out)
    ckpt = sorted((out / "checkpoints").glob("step-*"))
    rc, err = cli(capsys, *args, "--resume", "--lr", "0.001")
    assert_error(rc, err, "--resume", "differ", "'lr'", "same settings", "another --out")
    assert sorted((out / "checkpoints").glob("step-*")) == ckpt  # the checkpoint is kept for a proper resume
    assert not (out / "minitron_distill.json").exists()
    rc, err = cli(capsys, *args, "--resume")  # killed mid-stage, rerun with the same settings: resumes, finishes
    assert rc == 0, err
    assert json.loads((out / "minitron_distill.json").read_text())["steps"] == 2


def test_unfinished_run_needs_resume_and_resume_needs_checkpoint(tmp_path, model_dir, corpus, capsys, monkeypatch):
    out = tmp_path / "distill"
    args = killed_distill(monkeypatch, model_dir, corpus, out)
    rc, err = cli(capsys, *args)
    assert_error(rc, err, "unfinished run", "pass --resume", "another --out")
    fresh = tmp_path / "fresh"
    rc, err = cli(capsys, *distill_args(model_dir, model_dir, corpus, fresh), "--resume")
    assert_error(rc, err, "--resume", "no checkpoint", "start without --resume")
    assert_nothing_at(fresh)


def test_nan_in_distill_checkpoint(tmp_path, model_dir, corpus, capsys, monkeypatch):
    """A checkpoint written by a run whose weights went NaN (injected into the saved state) is refused."""
    import minitron.distill.checkpoint as C

    out = tmp_path / "distill"
    orig = C._dcp_state
    poisoned = {}

    def with_nan(model, optim):
        state = orig(model, optim)
        key = next(k for k in state["model"] if k.endswith("mlp.up_proj.weight"))
        state["model"][key] = state["model"][key].detach().clone()
        state["model"][key][0, 0] = float("nan")
        poisoned["key"] = key
        return state

    with monkeypatch.context() as m:
        m.setattr(C, "_dcp_state", with_nan)
        args = killed_distill(monkeypatch, model_dir, corpus, out)
    ckpt = next((out / "checkpoints").glob("step-*"))
    rc, err = cli(capsys, *args, "--resume")
    assert_error(rc, err, str(ckpt), poisoned["key"], "NaN/inf", "diverged", "without --resume")
    assert not (out / "minitron_distill.json").exists()


# ---- recipes -----------------------------------------------------------------------------------------

def test_unknown_recipe_key(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, corpus, out, distil={"tokens": 5})
    rc, err = cli(capsys, "run", recipe)
    assert_error(rc, err, "unknown key", "distil", "known keys", "distill")
    good = write_recipe(tmp_path / "good.yaml", model_dir, corpus, out)
    rc, err = cli(capsys, "run", good, "distill.tokenz=5")
    assert_error(rc, err, "unknown key 'tokenz'", "known", "tokens")
    assert_nothing_at(out)


def test_wrong_type_in_recipe(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, corpus, out, distill={"tokens": "lots"})
    rc, err = cli(capsys, "run", recipe)
    assert_error(rc, err, "distill.tokens", "expected an integer", "lots")
    rc, err = cli(capsys, "run", write_recipe(tmp_path / "g.yaml", model_dir, corpus, out), "correction.enabled=maybe")
    assert_error(rc, err, "correction.enabled", "expected true/false", "maybe")
    assert_nothing_at(out)


def test_run_killed_then_rerun_with_changed_settings(tmp_path, model_dir, corpus, capsys, monkeypatch):
    """`minitron run` killed after its prune stage, rerun with another target: the stale prune folder must not be
    reused silently (redone, or refused with a message naming the change and --from)."""
    import minitron.pipeline.stages as P

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, corpus, out)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "stage_distill", killed)  # every run below stops where distillation would start
    with pytest.raises(KeyboardInterrupt):
        main(["run", str(recipe)])
    assert json.loads((out / "prune" / "plan.json").read_text())["target"]["hidden"] == 48
    capsys.readouterr()
    try:
        rc = main(["run", str(recipe), "target.hidden=32"])
    except KeyboardInterrupt:  # reached distillation again: the prune stage must have been redone
        assert json.loads((out / "prune" / "plan.json").read_text())["target"]["hidden"] == 32
    else:
        assert_error(rc, capsys.readouterr().err, "target.hidden", "--from")
    assert not list(out.rglob(".*.tmp-*"))


def test_unknown_from_stage(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "run"
    rc, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml", model_dir, corpus, out), "--from", "distil")
    assert_error(rc, err, "unknown stage 'distil'", "stages:", "distill")
    assert not out.exists() or not any(p.is_dir() for p in out.iterdir())  # no stage was started


# ---- outputs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "distill", "run"])
def test_out_is_a_file(tmp_path, model_dir, corpus, capsys, command):
    out = tmp_path / "results"
    out.write_text("my notes\n")
    if command == "prune":
        argv = prune_args(model_dir, corpus, out, "--hidden", "48")
    elif command == "distill":
        argv = distill_args(model_dir, model_dir, corpus, out)
    else:
        argv = ["run", write_recipe(tmp_path / "r.yaml", model_dir, corpus, out)]
    rc, err = cli(capsys, *argv)
    assert_error(rc, err, str(out), "is a file", "another")
    assert out.read_text() == "my notes\n"  # the user's file is untouched


def _disk_full_on_weights(monkeypatch):
    import transformers.modeling_utils as mu

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(mu, "safe_save_file", full)


def _disk_full_on_json(monkeypatch):
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if ".tmp-" in self.parent.name:  # only inside atomic_dir's temp dir
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("writer", [_disk_full_on_weights, _disk_full_on_json], ids=["weights", "json"])
def test_disk_full_while_writing_a_stage(tmp_path, model_dir, corpus, capsys, monkeypatch, writer):
    out = tmp_path / "out"
    writer(monkeypatch)
    rc, err = cli(capsys, *prune_args(model_dir, corpus, out, "--hidden", "48"))
    assert_error(rc, err, "disk is full", str(out), "free", "rerun")
    assert_nothing_at(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_killed_mid_stage_then_rerun(tmp_path, model_dir, corpus, capsys, monkeypatch):
    import minitron.prune.trim as P

    out = tmp_path / "out"
    argv = [str(a) for a in prune_args(model_dir, corpus, out, "--hidden", "48")]
    with monkeypatch.context() as m:  # the weights are already in the temp dir when the kill arrives
        m.setattr(P, "plot_blocks", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    assert_nothing_at(out)
    rc, err = cli(capsys, *argv)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and (out / "plan.json").is_file()
    assert_no_temps(out)


def assert_no_temps(out: Path) -> None:
    temps = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp"))
    assert not temps, temps


def test_sigkill_mid_write_then_rerun(tmp_path, model_dir, corpus, capsys):
    out = tmp_path / "out"
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom minitron.arch.files import atomic_dir\n"
            "cm = atomic_dir(Path(sys.argv[1]))\ntmp = cm.__enter__()\n"
            "(tmp / 'model.safetensors').write_bytes(b'half a file')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not out.exists() and len(list(tmp_path.glob(".out.tmp-*"))) == 1  # what a hard kill leaves
    rc, err = cli(capsys, *prune_args(model_dir, corpus, out, "--hidden", "48"))
    assert rc == 0, err
    assert (out / "model.safetensors").is_file()
    assert_no_temps(out)
