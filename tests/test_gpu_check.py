"""benchmarks/gpu_check.py in its reduced mode (the CPU, a tiny Llama): the GPU check's whole path runs in CI, so it
cannot rot before a GPU runs it: importance, prune, a distillation in the GPU recipe's settings under torchrun
(FSDP2 over 1 rank, bf16 autocast, checkpointing, top-k cache, release_teacher) killed after its first checkpoint
and resumed, then eval / export / report, each stage's measured and estimated peak and the collective audit."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return ""


def test_reduced_gpu_check_runs_every_stage_and_resumes(tmp_path):
    work = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--reduced", "--work", str(work)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # the killed stage leaves no process behind (torchrun's worker outlived a kill of the agent's group once)
    assert not [cmd for cmd in map(_cmdline, Path("/proc").glob("[0-9]*/cmdline")) if str(work) in cmd]
    summary = json.loads((work / "gpu_check.json").read_text())
    assert summary["mode"] == "reduced" and summary["ok"]
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert not failed, failed
    names = {c["name"] for c in summary["checks"]}
    assert {"killed after a checkpoint", "resumed from the checkpoint, not from 0", "FSDP2 over one rank",
            "the final run skipped the finished stages", "distill-killed: collectives audited, 0 violations",
            "distill-resumed: collectives audited, 0 violations"} <= names
    rows = {r["stage"]: r for r in summary["rows"]}
    assert list(rows) == ["importance", "prune", "distill-killed", "distill-resumed", "eval"]
    for r in rows.values():  # every stage measured and estimated
        assert r["measured"] > 0 and r["estimate"] > 0 and r["ratio"] > 0 and r["wall"] > 0, r
    results = summary["results"]
    ckpt = results["distill-killed"]["checkpoint_step"]
    assert results["distill-killed"]["killed_by_check"] and 0 < ckpt < summary["steps"]
    assert f"resumed at step {ckpt} of {summary['steps']}" in rows["distill-resumed"]["notes"]
    for stage in ("distill-killed", "distill-resumed"):
        assert "0 violations" in rows[stage]["notes"] and rows[stage]["tok_per_s"] > 0
        audit = json.loads((work / f"audit-{stage}.rank0.json").read_text())
        assert audit["device"] == "cpu" and audit["violations"] == [] and audit["calls"]
    # the printed table is the file's, and says what passed
    text = (work / "gpu_check.md").read_text()
    assert text.strip() in proc.stdout and "GPU check: PASSED" in text
    for label in ("importance", "prune", "distill (killed after its checkpoint)", "distill (resumed)",
                  "eval + export + report"):
        assert f"| {label} |" in text


def test_steady_rate_leaves_out_the_warm_up():
    """tok_per_s in metrics.jsonl is cumulative since the process's loop began; the table's rate is that of the
    steps after the warm-up: here 10 slow steps of 1 s then 90 of 0.5 s, 1000 tokens each -> 2000 tok/s."""
    from gpu_check import steady_rate

    elapsed, records = 0.0, {}
    for step in range(1, 101):
        elapsed += 1.0 if step <= 10 else 0.5
        records[step] = {"step": step, "tok_per_s": step * 1000 / elapsed}
    assert abs(steady_rate(records, 0, 100, 1000) - 2000) < 1e-6
    resumed = {s: {"step": s, "tok_per_s": (s - 50) * 1000 / ((s - 50) * 0.25)} for s in range(51, 61)}
    assert abs(steady_rate(resumed, 50, 60, 1000) - 4000) < 1e-6
    assert steady_rate(records, 0, 200, 1000) is None
