"""The whole recipe, shrunk to a tiny random model: end to end, resume, --from, overrides, bad recipes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import make_model
from eval_fixtures import write_task_data
from minitron.cli import main
from minitron.pipeline import RunConfig, run
from minitron.pipeline.config import ConfigError, load_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, corpus_dir):
    root = tmp_path_factory.mktemp("pipe")
    teacher = root / "teacher"
    make_model("llama").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    write_task_data(root / "data")
    return root, teacher, corpus_dir


def tiny_overrides(root, teacher, corpus, out, **extra):
    base = {"out": str(out), "model.teacher": str(teacher), "model.device": "cpu", "data.corpus": str(corpus),
            "data.seq_len": 32, "data.data_dir": str(root / "data"), "importance.calib_samples": 8,
            "importance.heldout_samples": 4, "importance.batch_size": 4, "target.params": 120000,
            "distill.tokens": 1024, "distill.batch_size": 4, "distill.eval_every": 4, "distill.save_every": 2,
            "eval.tasks": f"piqa,loss:{corpus}", "eval.limit": 4, "eval.batch_size": 4}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_recipe_end_to_end(setup, tmp_path):
    root, teacher, corpus = setup
    out = tmp_path / "run"
    cfg = load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out))
    run(cfg)
    for stage in ("importance/scores.safetensors", "prune/plan.json", "distill/metrics.jsonl", "eval/results.json",
                  "export/config.json", "export/README.md", "config.yaml", "report.md"):
        assert (out / stage).is_file(), stage
    student = AutoModelForCausalLM.from_pretrained(out / "export")
    plan = json.loads((out / "prune" / "plan.json").read_text())
    assert sum(p.numel() for p in student.parameters()) == plan["params_after"]["total"] <= 120000
    results = json.loads((out / "eval" / "results.json").read_text())
    assert len(results["models"]) == 2
    report = (out / "report.md").read_text()
    assert "## Evaluation" in report and "## Pruning" in report and "loss.png" in report
    assert "Minitron student" in (out / "export" / "README.md").read_text()
    # a rerun skips every finished stage
    stamp = (out / "prune" / "plan.json").stat().st_mtime_ns
    run(cfg)
    assert (out / "prune" / "plan.json").stat().st_mtime_ns == stamp
    # --from distill redoes distill and later stages, keeps prune
    before = (out / "eval" / "results.json").stat().st_mtime_ns
    run(cfg, from_stage="distill")
    assert (out / "prune" / "plan.json").stat().st_mtime_ns == stamp
    assert (out / "eval" / "results.json").stat().st_mtime_ns != before
    # run_log.jsonl: one start / stages / end per invocation; the README section is written from the last one
    from minitron.arch.runlog import commit, last_invocation
    from minitron.eval.report import BEGIN, END, readme_section, write_readme_section

    log = [json.loads(line) for line in (out / "run_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log].count("start") == 3 == [r["event"] for r in log].count("end")
    last = last_invocation(out)
    assert last[0]["commit"] == commit() and last[0]["cpus"] >= 1
    assert {r["stage"] for r in last if r["event"] == "stage"} >= {"importance", "prune", "distill", "eval", "export"}
    section = readme_section(out)
    assert section.startswith("### Measured on this machine (") and f"commit {commit()}" in section
    assert " distill " in section and " eval " in section and "| student |" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold figures\n{END}\n\n## after\n")
    write_readme_section(out, readme)
    text = readme.read_text()
    assert "old figures" not in text and section in text and text.endswith("## after\n")


HYBRID_TARGETS = {  # Mamba2: explicit dims (hidden x expand = heads x head_dim); NemotronH: a budget + Mamba heads
    "mamba2": {"target.hidden": 32, "target.mamba_heads": 4, "target.layers": 2},
    "nemotron_h": {"target.params": 80000, "target.mamba_heads": 4, "target.layers": 4,
                   "target.depth_types": "[mamba,mlp]"},
}


@pytest.mark.parametrize("family", sorted(HYBRID_TARGETS))
def test_hybrid_recipe_end_to_end(setup, tokenizer, tmp_path, family):
    """`minitron run` on a tiny Mamba2 and a tiny NemotronH: importance (with its Mamba panel) -> plan (LM-loss
    depth) -> prune -> distill -> eval (held-out LM loss and a zero-shot task) -> HF export that reloads with
    from_pretrained at the planned size and generates; report.md and the model card name the Mamba dims."""
    from test_hybrid import make_mamba2
    from test_hybrid import make_model as make_nemotron_h

    root, _, corpus = setup
    teacher = tmp_path / family
    (make_mamba2() if family == "mamba2" else make_nemotron_h()).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "run"
    run(load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out, **{
        "target.params": None, **HYBRID_TARGETS[family], "distill.tokens": 512, "eval.ppl_limit": 2})))
    for stage in ("importance/importance.png", "prune/importance.png", "prune/plan.json", "distill/metrics.jsonl",
                  "eval/results.json", "export/config.json", "export/README.md", "report.md"):
        assert (out / stage).is_file(), stage
    plan = json.loads((out / "prune" / "plan.json").read_text())
    assert plan["target"]["mamba_heads"] == 4 and len(plan["dropped_layers"]) == 1
    student = AutoModelForCausalLM.from_pretrained(out / "export")
    assert sum(p.numel() for p in student.parameters()) == plan["params_after"]["total"]
    assert student.generate(tokenizer("the model", return_tensors="pt").input_ids, max_new_tokens=4,
                            do_sample=False).shape[1] > 2
    results = json.loads((out / "eval" / "results.json").read_text())
    assert all(f"loss:{corpus}" in m["tasks"] and "piqa" in m["tasks"] for m in results["models"].values())
    assert "## Evaluation" in (out / "report.md").read_text()
    assert "| Mamba heads | Mamba head dim |" in (out / "export" / "README.md").read_text()
    load_config(RunConfig, None, ["target.mamba_heads=4"])  # a Mamba axis alone is something to prune


def test_budget_plans_distillation_from_what_it_measured(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("minitron.pipeline.budget.MIN_DISTILL_S", 2.0)  # the tiny run: a few seconds are plenty
    root, teacher, corpus = setup
    over = {"budget.minutes": 0.75, "eval.tasks": f"piqa,loss:{corpus},speed", "eval.speed_rounds": 2}
    out = tmp_path / "run"
    cfg = load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out, **over))
    run(cfg)
    plan = json.loads((out / "budget.json").read_text())
    assert plan["budget_s"] == 45.0 and plan["spent_s"] > plan["spent_before_distill_s"] > 0
    # budget = what was spent before distillation + what evaluation and export were given + distillation
    assert plan["spent_before_distill_s"] + sum(plan["reserved"].values()) + plan["distill_s"] == pytest.approx(45, abs=0.2)
    assert plan["reserved"]["speed_s"] > 0 and 0 < plan["student_share"] < 1
    done = json.loads((out / "distill" / "minitron_distill.json").read_text())
    assert plan["distill"]["total_steps"] == done["steps"] and done["tokens"] != 1024  # the budget sized it
    assert "## Budget" in (out / "report.md").read_text()
    # the teacher's scores: computed once before distillation (cached), and what the evaluation reports for it
    from minitron.pipeline.evaluation import teacher_scores

    results = json.loads((out / "eval" / "results.json").read_text())
    capsys.readouterr()
    entry = teacher_scores(cfg, str(teacher))  # the next run with this teacher reuses them
    assert "the teacher's scores on piqa" in capsys.readouterr().out and entry["speed_round_s"] > 0
    for task in ("piqa", f"loss:{corpus}"):
        assert results["models"][str(teacher)]["tasks"][task] == entry["tasks"][task]
    # a rerun that finds everything finished keeps the plan as it was; a recipe without a budget drops it
    before = (out / "budget.json").read_text()
    run(cfg)
    assert (out / "budget.json").read_text() == before
    run(load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out, **{**over, "budget.minutes": None})))
    assert not (out / "budget.json").exists() and "## Budget" not in (out / "report.md").read_text()
    # a budget too small for any distillation fails naming the fix
    with pytest.raises(ConfigError, match="raise budget.minutes"):
        run(load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, tmp_path / "tiny",
                                                        **{**over, "budget.minutes": 0.02})))


def test_budget_section_names_every_plan_of_the_distillation():
    """The report's Budget section: the probe's plan, then each later plan with its step and step time."""
    from minitron.eval.report import budget_lines

    b = {"budget_s": 1080.0, "spent_before_distill_s": 298.0, "student_share": 0.66, "teacher_eval_s": 132.0,
         "reserved": {"student_eval_s": 87.0, "speed_s": 98.0, "export_s": 4.0}, "distill_s": 593.0,
         "distill": {"probe_steps": 4, "step_s": 5.21, "tok_per_s": 197.0, "total_steps": 117, "tokens": 119808}}
    assert "and planned 117 steps: 119,808 tokens." in "\n".join(budget_lines(b))
    one, two = ({"at_step": 34, "step_s": 4.48, "total_steps_before": 94},
                {"at_step": 60, "step_s": 4.0, "total_steps_before": 110})
    b["distill"].update(replans=[one, two])
    assert ("planned 94 steps, then 110 at step 34 from the steps since (4.48 s each), then 117 at step 60 from "
            "the steps since (4.00 s each): 119,808 tokens.") in "\n".join(budget_lines(b))
    b["distill"] = {**b["distill"], "replans": None, "replanned": one}  # a run recorded before `replans`
    assert "planned 94 steps, then 117 at step 34 from the steps since (4.48 s each): 119" in "\n".join(budget_lines(b))


def test_iterative_and_search(setup, tmp_path):
    root, teacher, corpus = setup
    out = tmp_path / "iter"
    run(load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out, **{
        "iterative.budgets": "150000,110000", "eval.tasks": "speed"})))
    p1 = json.loads((out / "step1/prune/plan.json").read_text())
    p2 = json.loads((out / "step2/prune/plan.json").read_text())
    assert p1["params_after"]["total"] <= 150000 and p2["params_after"]["total"] <= 110000
    assert p2["params_before"] == p1["params_after"]  # step 2 starts from step 1's distilled student
    out = tmp_path / "search"
    run(load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out, **{
        "search.enabled": "true", "search.params": 110000, "search.tolerance": 0.2, "search.max_candidates": 2,
        "search.train_tokens": 256, "eval.tasks": "speed"})))
    table = json.loads((out / "search/search.json").read_text())["rows"]
    plan = json.loads((out / "prune/plan.json").read_text())
    assert {k: plan["target"][k] for k in ("hidden", "ffn", "heads", "layers")} == \
        {k: table[0]["dims"][k] for k in ("hidden", "ffn", "heads", "layers")}
    assert "loss_trained" in table[0] and "## Architecture search" in (out / "report.md").read_text()


def test_kill_during_distill_then_resume(setup, tmp_path, capsys):
    root, teacher, corpus = setup
    out = tmp_path / "killed"
    args = ["run", *tiny_overrides(root, teacher, corpus, out, **{"distill.tokens": 8192, "eval.tasks": "speed"})]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from minitron.cli import main; sys.exit(main(sys.argv[1:]))",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    latest = out / "distill" / "checkpoints" / "latest"  # a committed checkpoint (step-N.tmp is one being written)
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.is_file(), "no checkpoint was written before the kill"
    assert not (out / "export").exists()
    capsys.readouterr()
    # resumes distill from its checkpoint, then finishes; eval_every / save_every / distributed are settings
    # distillation resumes across (RESUMABLE_CHANGES), so changing them does not restart it
    resumed = ["run", *tiny_overrides(root, teacher, corpus, out, **{
        "distill.tokens": 8192, "eval.tasks": "speed", "distill.eval_every": 8, "distill.save_every": 4,
        "distill.distributed": "none"})]
    assert main(resumed) == 0
    printed = capsys.readouterr().out
    assert "distill: redoing" not in printed and f"resumed {out / 'distill'} at step" in printed
    steps = [json.loads(line)["step"] for line in (out / "distill/metrics.jsonl").read_text().splitlines()
             if "\"lr\"" in line]
    assert steps == list(range(1, 65)) and (out / "export/config.json").is_file()  # 8192 tokens / 128 per step


def test_bad_recipes(tmp_path):
    (tmp_path / "r.yaml").write_text("distill:\n  tokenz: 5\n")
    with pytest.raises(ConfigError, match="unknown key.*distill.tokenz"):
        load_config(RunConfig, tmp_path / "r.yaml")
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(RunConfig, None, ["distill.tokens=lots"])
    with pytest.raises(Exception, match="prunes nothing"):
        load_config(RunConfig, None, [])
    assert main(["run", "out=" + str(tmp_path / "x"), "target.hiden=3"]) == 2
    from minitron.eval.tasks import TaskError
    with pytest.raises(TaskError, match="wikitext2 needs"):  # before any work, not after distillation
        run(load_config(RunConfig, None, ["target.params=70M", f"data.data_dir={tmp_path}", "eval.tasks=wikitext2",
                                          f"out={tmp_path / 'y'}"]))
    assert not (tmp_path / "y").exists()
    for recipe in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
        load_config(RunConfig, recipe)  # every shipped recipe parses and passes its checks


def _stage_mtime(out, path):
    return (out / path).stat().st_mtime_ns


def test_rerun_with_new_settings_redoes_what_changed(setup, tmp_path, capsys):
    """The stale-result cases of issue 14, through the CLI: a new target, then a new distill budget."""
    root, teacher, corpus = setup
    out = tmp_path / "rerun"
    fast = {"eval.tasks": f"loss:{corpus}", "eval.ppl_limit": 2}
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **fast)]) == 0
    imp, prune1 = _stage_mtime(out, "importance/scores.safetensors"), json.loads((out / "prune/plan.json").read_text())
    capsys.readouterr()
    # same recipe: everything skipped
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **fast)]) == 0
    assert "prune: up to date" in capsys.readouterr().out
    # a new budget: importance kept, prune and every later stage redone, the message names the setting
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **{**fast, "target.params": 100000})]) == 0
    printed = capsys.readouterr().out
    assert "prune: redoing" in printed and "target.params: 120000.0 -> 100000.0" in printed
    assert "importance: up to date" in printed and _stage_mtime(out, "importance/scores.safetensors") == imp
    plan = json.loads((out / "prune/plan.json").read_text())
    assert plan["params_after"]["total"] <= 100000 < prune1["params_after"]["total"]
    student = AutoModelForCausalLM.from_pretrained(out / "export")
    assert sum(p.numel() for p in student.parameters()) == plan["params_after"]["total"]
    assert "params: 100000" in (out / "config.yaml").read_text()
    assert f"{plan['params_after']['total'] / 1e6:.2f}M" in (out / "report.md").read_text()
    assert f"{plan['params_after']['total'] / 1e6:.2f}M" in (out / "export/README.md").read_text()
    # a new distillation budget: prune kept, distill redone with the new token count
    stamp = _stage_mtime(out, "prune/plan.json")
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **{**fast, "target.params": 100000,
                                                                          "distill.tokens": 512})]) == 0
    assert "distill.tokens: 1024 -> 512" in capsys.readouterr().out
    assert _stage_mtime(out, "prune/plan.json") == stamp
    assert json.loads((out / "distill/minitron_distill.json").read_text())["tokens"] == 512
    assert "512 tokens" in (out / "export/README.md").read_text()


def test_resumable_distill_settings_keep_a_finished_distill(setup, tmp_path, capsys):
    """eval_every / save_every / distributed change how distillation runs, not what it trains
    (distill.config.RESUMABLE_CHANGES): a finished distill stays up to date when they change, and so does a
    distill folder whose stage.json still holds them (written before the record left them out)."""
    from dataclasses import asdict

    from minitron.data.fingerprint import make_record, read_record, write_record
    from minitron.pipeline import stage_distill

    root, teacher, corpus = setup
    out = tmp_path / "resumable"
    fast = {"eval.tasks": f"loss:{corpus}", "eval.ppl_limit": 2, "distill.tokens": 512}
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **fast)]) == 0
    stamps = {p: _stage_mtime(out, p) for p in ("distill/minitron_distill.json", "eval/results.json")}
    capsys.readouterr()
    changed = {**fast, "distill.eval_every": 3, "distill.save_every": 0, "distill.distributed": "none"}
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **changed)]) == 0
    printed = capsys.readouterr().out
    assert "distill: up to date" in printed and "eval: up to date" in printed and "redoing" not in printed
    assert {p: _stage_mtime(out, p) for p in stamps} == stamps
    assert "eval_every" not in read_record(out / "distill")["settings"]["distill"]

    # a record from before: the same settings plus the resumable ones -> still up to date, record kept as it is
    old = read_record(out / "distill")
    cfg = load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, out, **changed))
    old["settings"]["distill"] = asdict(cfg.distill)
    old = make_record("distill", old["settings"], old["inputs"])
    write_record(out / "distill", old)
    assert stage_distill(cfg, out / "distill", str(teacher), out / "prune", 512) == out / "distill"
    assert "distill: up to date" in capsys.readouterr().out
    assert read_record(out / "distill") == old and _stage_mtime(out, "distill/minitron_distill.json") == \
        stamps["distill/minitron_distill.json"]
    # ... while a setting that changes training still redoes it, naming that setting alone
    from minitron.pipeline import up_to_date

    resumable = ("eval_every", "save_every", "distributed")
    settings = {**old["settings"], "distill": {k: v for k, v in old["settings"]["distill"].items()
                                               if k not in resumable}}
    settings["distill"]["lr"] = 1.0
    assert not up_to_date(out / "distill", make_record("distill", settings, old["inputs"]), "minitron_distill.json",
                          tuple(f"distill.{k}" for k in resumable))
    printed = capsys.readouterr().out
    assert "distill.lr: 0.0001 -> 1.0" in printed and "eval_every" not in printed


BLOCK_SCORES_SCRIPT = """
import json, sys
from pathlib import Path
import minitron.prune.importance as imp
from minitron.arch import ranks
from minitron.pipeline.config import load_config
from minitron.pipeline.stages import RunConfig, _ensure_block_scores
from minitron.prune.plan import Target
calls = []
real = imp.layer_lm_loss
def counted(*a, **k):
    calls.append(1)
    return real(*a, **k)
imp.layer_lm_loss = counted
cfg = load_config(RunConfig, None, json.loads(sys.argv[1]))
ranks.join("cpu")
path = _ensure_block_scores(cfg, Path(sys.argv[2]), cfg.model.teacher, Target(layers=2))
Path(sys.argv[3]).joinpath(f"rank{ranks.rank()}.json").write_text(json.dumps({"calls": len(calls), "path": str(path)}))
ranks.leave()
"""


def _scores_without_blocks(folder):
    import torch

    from minitron.prune.importance import save_scores

    scores = {"heads": torch.rand(4, 4), "kv_groups": torch.rand(4, 2), "neurons": torch.rand(4, 128),
              "channels": torch.rand(64), "layer_bi": torch.rand(4), "block_bi.1": torch.rand(4)}
    save_scores(scores, folder, {"criterion": "activation"})
    return scores


def test_block_scores_rank0_alone_and_atomic(setup, tmp_path, monkeypatch):
    """_ensure_block_scores (a searched depth target's LM-loss block scores) under torchrun: rank 0 alone
    computes and writes them, the other rank waits and gets the path; the write is atomic, so a failed write
    leaves the scores file as it was."""
    import os

    import torch

    import minitron.prune.importance as imp
    from minitron.pipeline.stages import _ensure_block_scores
    from minitron.prune.importance import load_scores
    from minitron.prune.plan import Target

    root, teacher, corpus = setup
    args = tiny_overrides(root, teacher, corpus, tmp_path / "o")
    folder = tmp_path / "importance"
    before = _scores_without_blocks(folder)
    script = tmp_path / "blocks.py"
    script.write_text(BLOCK_SCORES_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, str(script), json.dumps(args), str(folder), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["calls"] for g in got] == [1, 0]  # rank 1 neither computed nor wrote
    assert got[0]["path"] == got[1]["path"] == str(folder / "scores.safetensors")
    scores, meta = load_scores(folder)
    assert "block_lm_loss.2" in scores and meta == {"criterion": "activation"}
    torch.testing.assert_close(scores["heads"], before["heads"])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp left behind

    # a write that fails half way leaves the scores file as it was
    folder2 = tmp_path / "importance2"
    _scores_without_blocks(folder2)
    good = (folder2 / "scores.safetensors").read_bytes()

    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk went away")

    monkeypatch.setattr(imp, "save_file", broken)
    cfg = load_config(RunConfig, None, args)
    with pytest.raises(OSError, match="disk went away"):
        _ensure_block_scores(cfg, folder2, str(teacher), Target(layers=2))
    assert (folder2 / "scores.safetensors").read_bytes() == good
    assert "block_lm_loss.2" not in load_scores(folder2)[0]


def test_cache_follows_the_corrected_teacher(setup, tmp_path, capsys):
    """A top-k cache built from the uncorrected teacher is never reused once correction is on."""
    from minitron.data.fingerprint import content_id, model_identity

    root, teacher, corpus = setup
    out = tmp_path / "corr"
    kw = {"eval.tasks": f"loss:{corpus}", "eval.ppl_limit": 2, "distill.topk": 16}
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **kw)]) == 0
    meta = json.loads((out / "teacher_topk/meta.json").read_text())
    assert meta["teacher_id"] == content_id(model_identity(str(teacher)))
    capsys.readouterr()
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **{**kw, "correction.enabled": "true",
                                                                         "correction.tokens": 512})]) == 0
    printed = capsys.readouterr().out
    assert "distill: redoing" in printed and "rebuilding it" in printed
    meta = json.loads((out / "teacher_topk/meta.json").read_text())
    assert meta["teacher_id"] == content_id(model_identity(str(out / "correction")))
    assert json.loads((out / "distill/distill_config.json").read_text())["teacher"] == str(out / "correction")
    card = (out / "export/README.md").read_text()
    assert "teacher correction" in card and "base_model" not in card  # a local dir has no hub id


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "random"])
def test_every_criterion_runs_in_run_and_search(setup, tmp_path, criterion):
    root, teacher, corpus = setup
    out = tmp_path / criterion
    assert main(["run", *tiny_overrides(root, teacher, corpus, out, **{
        "importance.criterion": criterion, "eval.tasks": "speed", "eval.speed_rounds": 1,
        "distill.tokens": 256})]) == 0
    for path in ("importance/scores.json", "prune/scores.json"):
        assert json.loads((out / path).read_text())["meta"]["criterion"] == criterion
    assert json.loads((out / "prune/prune_metrics.json").read_text())["criterion"] == criterion
    if criterion == "taylor":
        s_out = tmp_path / "search-taylor"
        assert main(["search", *tiny_overrides(root, teacher, corpus, s_out, **{
            "importance.criterion": criterion, "search.params": 110000, "search.tolerance": 0.2})]) == 0
        assert json.loads((s_out / "importance/scores.json").read_text())["meta"]["criterion"] == "taylor"
        assert json.loads((s_out / "search/search.json").read_text())["rows"]


def test_unsupported_architecture_fails_before_loading_weights(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM as Auto

    from conftest import make_tokenizer

    bad = tmp_path / "gpt2"
    Auto.from_config(__import__("transformers").GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=384)
                     ).save_pretrained(bad)
    make_tokenizer().save_pretrained(bad)

    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Auto, "from_pretrained", boom)
    assert main(["run", f"out={tmp_path / 'o'}", f"model.teacher={bad}", "target.params=1000",
                 "eval.tasks=speed"]) == 2
    assert "not supported" in capsys.readouterr().err
    assert main(["run", f"out={tmp_path / 'o2'}", "model.teacher=" + str(bad.parent / "missing"),
                 "target.params=1000", "eval.tasks=speed"]) == 2


RUN_SCRIPT = """
import json, sys
from minitron.pipeline.config import load_config
from minitron.pipeline import RunConfig, run
run(load_config(RunConfig, None, json.loads(sys.argv[1])))
"""


def test_run_under_torchrun_matches_one_process(setup, tmp_path):
    """`torchrun --nproc_per_node 2 ... run` (gloo): calibration split over the ranks, pruning on rank 0, DDP
    distillation, evaluation and export on rank 0; the same scores, plan and student as one process with the
    same global batch (2 ranks x batch 2 = batch 4). A search that has not run yet is refused under torchrun
    with the two-step command (`minitron search` first, in one process)."""
    import os

    import torch
    from safetensors.torch import load_file

    root, teacher, corpus = setup
    one = tmp_path / "one"
    run(load_config(RunConfig, None, tiny_overrides(root, teacher, corpus, one)))
    two = tmp_path / "two"
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    args = tiny_overrides(root, teacher, corpus, two, **{"distill.batch_size": 2})
    proc = subprocess.run([*torchrun, str(script), json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    s1, s2 = load_file(one / "importance" / "scores.safetensors"), load_file(two / "importance" / "scores.safetensors")
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6)
    plan = lambda d: {k: v for k, v in json.loads((d / "prune" / "plan.json").read_text()).items() if "loss" not in k}  # noqa: E731
    assert plan(two) == plan(one)
    w1, w2 = load_file(one / "export" / "model.safetensors"), load_file(two / "export" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert (two / "report.md").is_file() and (two / "eval" / "results.json").is_file()
    assert proc.stdout.count("[minitron] done") == 1  # rank 0 alone evaluates, exports and reports

    searched = tiny_overrides(root, teacher, corpus, tmp_path / "search", **{"search.enabled": "true"})
    proc = subprocess.run([*torchrun, str(script), json.dumps(searched)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "run `minitron search RECIPE` first" in proc.stderr
