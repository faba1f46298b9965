"""What each `minitron run` invocation did, in <out>/run_log.jsonl (one JSON object per line, rank 0 only): a
`start` record with the code and machine that ran (minitron version and git commit, torch, CPU count, device), one
record per stage with its wall seconds, and an `end` record with the total. The README's measured section is
written from it and the stages' artifacts (minitron.eval.report.readme_section), so its figures say when and by
which commit they were made."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from minitron.arch import ranks

LOG = "run_log.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def commit() -> str:
    """The git commit of the code that runs (short sha, `-dirty` with uncommitted changes), or `unknown`."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here.parents[1])], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append(out: Path, record: dict) -> None:
    """One line of out/run_log.jsonl (rank 0 only)."""
    if not ranks.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def start(out: Path, device: str) -> float:
    """The start record; returns the start time (perf_counter)."""
    import torch

    import minitron

    append(out, {"event": "start", "at": _now(), "minitron": minitron.__version__, "commit": commit(),
                 "torch": torch.__version__, "cpus": os.cpu_count(), "device": device})
    return time.perf_counter()


@contextlib.contextmanager
def stage(out: Path, name: str):
    """Time one stage call (a stage that finds itself up to date takes ~0 s: it was reused, not redone)."""
    t0 = time.perf_counter()
    yield
    append(out, {"event": "stage", "stage": name, "seconds": round(time.perf_counter() - t0, 2), "at": _now()})


def end(out: Path, t0: float) -> None:
    append(out, {"event": "end", "at": _now(), "seconds": round(time.perf_counter() - t0, 2)})


def last_invocation(out: Path) -> list[dict]:
    """The records of the latest invocation that ran to its end (from its start record on), or []."""
    path = Path(out) / LOG
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(records) if r["event"] == "start"]
    for i in reversed(starts):
        chunk = records[i:next((j for j in starts if j > i), len(records))]
        if chunk[-1]["event"] == "end":
            return chunk
    return []
