"""benchmarks/ablations.py --preset smoke: every arm on a tiny random model, outputs, caching of arms."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from eval_fixtures import write_task_data

ARMS = ("minitron", "random_init", "random", "magnitude", "taylor", "lm_only", "depth_lm_block",
        "depth_bi_scattered", "corrected", "iterative", "full_logits", "kd_plus_lm")


@pytest.fixture(scope="module")
def ablations():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_preset(ablations, tmp_path):
    data = write_task_data(tmp_path / "data")
    out = tmp_path / "abl"
    argv = ["--preset", "smoke", "--out", str(out), "--set", "tasks=piqa", "depth_task=piqa", f"data_dir={data}"]
    rows = {(r["arm"], r["seed"]): r for r in ablations.main(argv)}
    assert {a for a, _ in rows} == set(ARMS) | {"teacher", "aggregation", "depth_curves"}
    teacher = rows["teacher", 0]
    target = json.loads((out / "preset.json").read_text())["params"]
    width = rows["minitron", 0]["dims"]
    for arm in ARMS:
        r = rows[arm, 0]
        assert r["params"] <= int(target) < teacher["params"], arm
        assert r["tokens"] == 2048 and len(r["curve"]) >= 2, arm
        assert r["eval"]["piqa"]["n"] == 2, arm  # the fixture's items, scored for every arm
        if not arm.startswith("depth"):  # every width arm ends at minitron's dims (iterative too)
            assert r["dims"] == width, arm
    # the KD variants differ from arm 1 only in the teacher signal and the loss
    kd = {a: json.loads((Path(rows[a, 0]["student"]) / "distill_config.json").read_text())
          for a in ("minitron", "full_logits", "kd_plus_lm", "lm_only")}
    assert [(kd[a]["topk_cache"] is None, kd[a]["kd_weight"], kd[a]["ce_weight"]) for a in kd] == \
        [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 1.0, 1.0), (True, 0.0, 1.0)]
    assert rows["full_logits", 0]["final"] != rows["minitron", 0]["final"]
    assert rows["depth_lm_block", 0]["dims"]["layers"] < teacher_layers(out)
    assert rows["depth_lm_block", 0]["dims"]["hidden"] == 64
    # the aggregation grid: 3 x 3 pruned models; mean/l2 is the Minitron default, as in the minitron arm
    grid = rows["aggregation", 0]["grid"]
    assert len(grid) == 9 and grid["mean/l2"] == pytest.approx(rows["minitron", 0]["after_prune"], rel=1e-4)
    curves = rows["depth_curves", 0]
    n = curves["block"]
    assert len(curves["lm_loss"][str(n)]) == 4 - n + 1 and len(curves["bi"]["1"]) == 4
    assert list(curves["task_drop"]) == [str(n)] and len(curves["task_drop"][str(n)]) == 4 - n + 1
    for name in ("results.jsonl", "results.md", "loss_vs_tokens.png", "depth_curves.png", "aggregation.png"):
        assert (out / name).is_file(), name
    assert "| minitron | 0 |" in (out / "results.md").read_text()
    # a rerun with another seed for one arm reuses every finished arm
    stamp = (out / "arms/minitron/s0/result.json").stat().st_mtime_ns
    rows2 = {(r["arm"], r["seed"]): r for r in ablations.main(argv[:4] + ["--arms", "random", "--seeds", "1"]
                                                               + argv[4:])}
    assert (out / "arms/minitron/s0/result.json").stat().st_mtime_ns == stamp
    assert rows2["random", 1]["dims"] == width and rows2["random", 1]["final"] != rows["random", 0]["final"]
    assert "- random: " in (out / "results.md").read_text() and "2 seeds" in (out / "results.md").read_text()
    # `--arms none` rebuilds the tables from what finished, running nothing
    (out / "results.md").unlink()
    rows3 = ablations.main(argv[:4] + ["--arms", "none"] + argv[4:])
    assert len(rows3) == len(rows2) and (out / "results.md").is_file()


def teacher_layers(out: Path) -> int:
    return json.loads((out / "smoke_teacher" / "config.json").read_text())["num_hidden_layers"]


def test_cpu_preset_trains_in_fp32(ablations):
    # bf16 autocast is 3x slower than fp32 on a CPU without native bf16 (measured; docs/distill.md)
    assert ablations.PRESETS["cpu"].autocast == "none" and ablations.PRESETS["gpu"].autocast == "bf16"


def test_override_parses_types(ablations):
    p = ablations.override(ablations.PRESETS["cpu"], ["tokens=4096", "tasks=piqa,arc_easy", "task_limit=none",
                                                      "lr=1e-3", "wikitext=false"])
    assert (p.tokens, p.tasks, p.task_limit, p.lr, p.wikitext) == (4096, ["piqa", "arc_easy"], None, 1e-3, False)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        ablations.override(p, ["nonsense=1"])
