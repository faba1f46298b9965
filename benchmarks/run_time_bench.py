"""`minitron run` wall time before and after the token store, per stage, side by side in one run.

The old code is OLD_COMMIT's src/ (the last commit before the store landed in `minitron run`: every stage
read the corpus with read_texts + pack, tokenizing it again each time); the new code is this checkout's src/.
Both run the same recipe (recipes/default.yaml) with the same overrides that shorten distillation,
calibration and evaluation (a full default run takes ~75 minutes here, mostly distillation and evaluation,
which the store does not change; the data part does not depend on those budgets). Runs alternate old, new,
old, new, ... so a change in the machine's load falls on both.

Each run is a fresh process with its own MINITRON_CACHE (a fresh tmp dir), so the new code builds its token
store inside the timed run and no run reuses anything another made; the converted default model and the
default corpus (read-only assets) are shared by linking the user's cache's models/ and corpus/ into it, as
tests/conftest.py does. Per stage: the seconds inside pipeline.stage_* (and report.write_report); `data`:
the seconds inside tokenizing/reading the corpus (old: data.read_texts + data.pack; new: store.ensure_store
+ store_blocks.stream_blocks), which are also counted in their stages.

    .venv/bin/python benchmarks/run_time_bench.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from git_src import source_at  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "e1b5037"  # parent of 11d0c31, which made data.load_splits read the token store
STAGES = ["correction", "importance", "search", "block_scores", "prune", "distill", "eval", "export", "report"]
OVERRIDES = ["distill.tokens=2048", "importance.calib_samples=8", "importance.heldout_samples=2", "eval.limit=5",
             "eval.ppl_limit=1", "eval.speed_rounds=1"]  # what the store does not change, made small


def child(out: str, overrides: list[str]) -> None:
    """In the child (PYTHONPATH = the code under test): time every stage of `minitron run`, print RESULT."""
    t0 = time.perf_counter()
    import importlib

    def first(*names):  # the module under its path in the code under test (new paths first, then the flat ones)
        for n in names:
            try:
                return importlib.import_module(n)
            except ImportError:
                continue
        raise ImportError(names)

    pipeline = first("minitron.pipeline.stages", "minitron.pipeline")
    report = first("minitron.eval.report", "minitron.report")

    times = {s: 0.0 for s in STAGES}
    times["data"] = 0.0
    depth = [0]

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[key] += time.perf_counter() - t
        return wrapper

    def timed_data(fn):
        def wrapper(*a, **k):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    times["data"] += time.perf_counter() - t
        return wrapper

    for name, key in [("stage_correction", "correction"), ("stage_importance", "importance"),
                      ("stage_search", "search"), ("_ensure_block_scores", "block_scores"), ("stage_prune", "prune"),
                      ("stage_distill", "distill"), ("stage_eval", "eval"), ("stage_export", "export")]:
        if hasattr(pipeline, name):
            setattr(pipeline, name, timed(getattr(pipeline, name), key))
    report.write_report = timed(report.write_report, "report")
    for mods, name in [(("minitron.data.corpus", "minitron.data"), "read_texts"), (("minitron.data.corpus", "minitron.data"), "pack"),
                       (("minitron.data.store", "minitron.store"), "ensure_store"),
                       (("minitron.data.blocks", "minitron.store_blocks"), "stream_blocks")]:
        try:
            m = first(*mods)
        except ImportError:
            continue  # the old code has no store
        if hasattr(m, name):
            setattr(m, name, timed_data(getattr(m, name)))
    from minitron.cli import main

    main(["run", str(ROOT / "recipes" / "default.yaml"), f"out={out}", *overrides])
    times["total_in_process"] = time.perf_counter() - t0
    times["minitron"] = str(Path(pipeline.__file__).parent)  # which code ran
    print("RESULT " + json.dumps(times), flush=True)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def one_run(code: str, src: Path, work: Path, i: int, overrides: list[str]) -> dict:
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{code}{i}-", dir=work))
    user = Path(os.environ.get("MINITRON_CACHE") or Path.home() / ".cache" / "minitron")
    for name in ("models", "corpus", "tasks"):  # read-only assets shared (no token store: that is timed)
        if (user / name).is_dir():
            (cache / name).symlink_to(user / name, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(src), "MINITRON_CACHE": str(cache),
           "MINITRON_DATA_DIR": os.environ.get("MINITRON_DATA_DIR", str(ROOT.parent / "shared" / "data"))}
    log = work / f"{code}{i}.log"
    before = load()
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, __file__, "--child", str(work / f"run-{code}{i}"), *overrides],
                            env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(work)).returncode
    wall = time.perf_counter() - t
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if rc or not lines:
        raise SystemExit(f"{code} run {i} failed (rc {rc}); see {log}:\n{text[-3000:]}")
    return {"code": code, "run": i, "wall": wall, "load_before": before, "load_after": load(),
            **json.loads(lines[-1][len("RESULT "):])}


def table(rows: list[dict]) -> str:
    cols = [s for s in STAGES if any(r[s] > 0.05 for r in rows)]
    head = ["code", "run", "load (before/after)", *cols, "other", "total (wall)", "data (inside stages)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        other = r["wall"] - sum(r[c] for c in cols)
        out.append("| " + " | ".join([r["code"], str(r["run"]), f"{r['load_before']}/{r['load_after']}",
                                       *(f"{r[c]:.1f}" for c in cols), f"{other:.1f}", f"{r['wall']:.1f}",
                                       f"{r['data']:.1f}"]) + " |")
    by = {c: [r for r in rows if r["code"] == c] for c in ("old", "new")}
    if by["old"] and by["new"]:
        mean = {c: sum(r["wall"] for r in v) / len(v) for c, v in by.items()}
        data = {c: sum(r["data"] for r in v) / len(v) for c, v in by.items()}
        out.append("")
        out.append(f"mean total: old {mean['old']:.1f} s, new {mean['new']:.1f} s (saved {mean['old'] - mean['new']:.1f} s,"
                   f" {mean['new'] / mean['old']:.2f}x); mean data time: old {data['old']:.1f} s, new {data['new']:.1f} s")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--table":  # the table of a finished (or stopped) benchmark's rows
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each code (alternating old, new)")
    ap.add_argument("--work", default=None, help="work dir (default: a fresh tmp dir)")
    ap.add_argument("--codes", default="old,new")
    ap.add_argument("--new", default="HEAD", help="the commit whose src/ is the new code")
    ap.add_argument("--overrides", nargs="*", default=OVERRIDES)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="run-time-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    srcs = {"old": source_at(OLD_COMMIT, work), "new": source_at(args.new, work)}
    print(f"work {work}; overrides {' '.join(args.overrides)}; uptime: "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    rows = []
    for i in range(1, args.repeats + 1):
        for code in args.codes.split(","):
            rows.append(one_run(code, srcs[code], work, i, args.overrides))
            print(json.dumps(rows[-1]), flush=True)
            (work / "rows.json").write_text(json.dumps(rows, indent=1))  # `--table rows.json` prints it
    print(table(rows))


if __name__ == "__main__":
    main()
