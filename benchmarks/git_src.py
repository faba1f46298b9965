"""A commit's src/ taken with `git archive`, for the benchmarks that run old code next to new (memory_bench,
run_time_bench): a snapshot, so edits made to the checkout while a benchmark runs do not reach it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_at(commit: str, work: Path) -> Path:
    """`commit`'s src/ extracted once under work/src-<short sha>/ -> the folder to put on sys.path."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    where = work / f"src-{sha}"
    if not (where / "src" / "minitron").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where / "src"
