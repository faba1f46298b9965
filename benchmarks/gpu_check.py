"""The ten-minute GPU check (issue 25): the GPU recipes' code path end to end on one CUDA GPU, with measured vs
estimated peak memory per stage, a kill and resume, tokens/s and the collective audit, in one table.

    bash benchmarks/gpu_check.sh                 # one CUDA GPU: the 1B check (sized for ~6 minutes on an H100)
    bash benchmarks/gpu_check.sh --reduced       # CPU (or forced): the same path on a tiny Llama (CI runs it)

What runs (GPU mode): a random-weight Llama with Llama-3.2-1B's shape (benchmarks/memory_bench.LLAMA_1B, bf16
safetensors) and a synthetic corpus; a recipe whose `distill` section is recipes/gpu-8b.yaml's (bf16 autocast,
teacher bf16, activation checkpointing, top-k cache k=64, release_teacher, batch 1 x 4096) with distributed: fsdp
(recipes/gpu-8b-8gpu.yaml's), grad_accum 2 instead of 128 and 200 steps; target hidden 1536 / MLP 6144
(memory_bench.STUDENT_1B, 0.78B). Each stage is `minitron run RECIPE` in its own process under
`torchrun --standalone --nproc_per_node 1` (so FSDP2 runs over a world of 1, and each stage's peak is its own),
stopped after the stage it measures (a wrapper replaces the next stage's function with a stop; earlier stages are
skipped as up to date, exactly as a rerun of `minitron run` skips them):

    importance   -> stop before search        prune -> stop before distill
    distill      -> SIGKILL (the whole process group) once its first checkpoint is committed
    distill      -> the same command again: resumes from that checkpoint, finishes, stop before eval
    eval         -> eval (loss on the corpus' held-out blocks, speed), export, report: the rest of the run

Each process writes its peak at exit (CUDA: torch.cuda.max_memory_allocated; CPU: VmHWM minus the resident set
after imports, with glibc's mmap threshold fixed as in memory_bench) and, under MINITRON_AUDIT_COLLECTIVES, every
collective it made (minitron.arch.audit). The killed process writes both just before it waits to be killed. The
estimate is minitron.pipeline.estimate's stage estimate for the recipe: distill as FSDP2 over 1 rank (what torchrun with
one process runs), and on CUDA the larger of the stage's steady state and its loading peak, without the CUDA
context term (max_memory_allocated does not see the context).

The check fails (exit 1) when a stage crashes, the kill comes before any checkpoint, the resumed run starts from
step 0 or redoes a finished stage, the final `run` redoes a stage the stage processes finished, an audit file is
missing or lists a violation, or (CUDA only) an estimate is off by more than --tolerance or the whole check takes
longer than --budget seconds. A stage still running --deadline seconds after the start is killed, so the table is
always written. The table goes to stdout and to WORK/gpu_check.md; WORK/gpu_check.json holds the rows, checks and
each process's result (tests/test_gpu_check.py reads it); WORK/logs holds each process's output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(1, str(ROOT / "src"))

from memory_bench import LLAMA_1B, STUDENT_1B, _status  # noqa: E402 - benchmarks/ is sys.path[0]

GiB = 1024**3
WORK = Path(os.environ.get("GPU_CHECK_DIR", "/tmp/minitron_gpu_check"))

# The two sizes of the check. The recipe is recipes/gpu-8b.yaml with these sizes (its distill settings, the ones
# under test, taken as they are); the corpus gives `train_blocks` + ~10% validation blocks. Reduced mode leaves out
# eval's speed task: bf16 decoding on a CPU without bf16 units costs more than the rest of eval (it is
# minitron.eval.harness's code, not the GPU path's, and tests/test_evaluate.py covers it).
MODES = {
    "gpu": dict(device="cuda", seq_len=4096, steps=200, grad_accum=2, save_every=100, eval_every=100,
                calib_samples=64, heldout_samples=8, importance_batch=4, target=dict(STUDENT_1B),
                train_blocks=120, eval_batch=4, speed=["speed"], timeout=900),
    "reduced": dict(device="cpu", seq_len=32, steps=6, grad_accum=2, save_every=2, eval_every=2,
                    calib_samples=8, heldout_samples=4, importance_batch=4, target=dict(hidden=48, ffn=96),
                    train_blocks=24, eval_batch=4, speed=[], timeout=300),
}
STAGES = ("importance", "prune", "distill-killed", "distill-resumed", "eval")
NEXT = {"importance": "stage_search", "prune": "stage_distill", "distill-killed": "stage_eval",
        "distill-resumed": "stage_eval", "eval": None}  # the pipeline function that stops each stage's process
LABEL = {"importance": "importance", "prune": "prune", "distill-killed": "distill (killed after its checkpoint)",
         "distill-resumed": "distill (resumed)", "eval": "eval + export + report"}
ESTIMATE_OF = {"importance": "importance", "prune": "prune", "distill-killed": "distill",
               "distill-resumed": "distill", "eval": "eval"}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# ---- preparing: model, tokenizer, corpus, recipe (a child process: the parent never touches the GPU) ------

def make_teacher(mode: str, work: Path) -> None:
    """The random-weight teacher in bf16 safetensors with the tiny tokenizer (minitron.arch.tiny: trained in code, no
    download; its ids are < 384, so any vocabulary at least that large works: the 1B model keeps Llama-3.2-1B's
    128256 rows, which is what the memory depends on)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitron.arch.tiny import make_config, make_tokenizer

    torch.manual_seed(0)
    if mode == "gpu":
        config = LlamaConfig(**LLAMA_1B, eos_token_id=0, pad_token_id=0, bos_token_id=None)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(make_config("llama"), dtype=torch.bfloat16)
    model.save_pretrained(work / "teacher")
    make_tokenizer().save_pretrained(work / "teacher")
    log(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, bf16, in {work / 'teacher'}")


def make_corpus(mode: str, work: Path) -> None:
    """Pseudo-English documents (minitron.arch.tiny.make_text) of about one block each: train_blocks blocks of seq_len
    tokens for training and calibration, about 10% more held out (validation holds out whole documents)."""
    from minitron.arch.tiny import make_text, make_tokenizer

    m = MODES[mode]
    tok = make_tokenizer()
    sample = make_text(400, seed=1)
    per_sentence = len(tok(sample)["input_ids"]) / 400
    sentences = int(m["seq_len"] / per_sentence) + 5
    folder = work / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    n_docs = int(m["train_blocks"] * 1.15) + 4
    for i in range(n_docs):
        (folder / f"doc{i:04d}.txt").write_text(make_text(sentences, seed=1000 + i))
    log(f"corpus: {n_docs} documents of ~{m['seq_len']} tokens in {folder}")


def write_recipe(mode: str, work: Path) -> Path:
    """recipes/gpu-8b.yaml with this check's model, corpus, sizes and budget; its distill settings kept."""
    import yaml

    m = MODES[mode]
    base = yaml.safe_load((ROOT / "recipes" / "gpu-8b.yaml").read_text())
    per_step = base["distill"]["batch_size"] * m["grad_accum"]  # blocks per step on one rank
    distill = {**base["distill"], "tokens": m["steps"] * per_step * m["seq_len"], "grad_accum": m["grad_accum"],
               "distributed": "fsdp", "eval_every": m["eval_every"], "save_every": m["save_every"]}
    recipe = {
        "out": str(work / "run"),
        "model": {**base["model"], "teacher": str(work / "teacher"), "device": m["device"]},
        "data": {"corpus": str(work / "corpus"), "seq_len": m["seq_len"], "val_fraction": 0.1},
        "correction": {"enabled": False},
        "importance": {**base["importance"], "calib_samples": m["calib_samples"],
                       "heldout_samples": m["heldout_samples"], "batch_size": m["importance_batch"]},
        "target": m["target"],
        "distill": distill,
        "eval": {"tasks": [f"loss:{work / 'corpus'}", *m["speed"]], "limit": None, "ppl_limit": m["eval_batch"],
                 "batch_size": m["eval_batch"], "speed_rounds": 1},
    }
    path = work / "recipe.yaml"
    path.write_text("# written by benchmarks/gpu_check.py: recipes/gpu-8b.yaml's distill settings, sized for the "
                    "check\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---- one stage in one process (under torchrun) --------------------------------------------------------

class _Stop(BaseException):
    """Raised by the pipeline function after the measured stage: the process ends there."""


def child(stage: str, recipe: str, result: str) -> int:
    """`minitron run RECIPE` in this process up to the end of `stage`; writes the peak memory to `result`."""
    import torch
    import transformers  # noqa: F401 - imported before the baseline, like everything the stages need

    import minitron.distill.loop as loop
    import minitron.pipeline.stages as pipeline
    from minitron.arch import ranks
    from minitron.cli import main
    from minitron.pipeline.estimate import estimate_run  # noqa: F401 - imported before the baseline too

    cuda = torch.cuda.is_available() and os.environ.get("GPU_CHECK_MODE") == "gpu"
    dev = int(os.environ.get("LOCAL_RANK", "0"))
    base = 0
    if not cuda:
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    audits: list = []

    def capture(device):  # ranks.join installs the audit; keep it, to write it before a kill
        audit = real_install(device)
        if audit is not None:
            audits.append(audit)
        return audit

    real_install, ranks.install_from_env = ranks.install_from_env, capture

    folded = {"peak": 0, "reserved": 0}  # the peaks before each reset_peak_memory_stats (eval's speed task resets)

    def fold(device=None):
        folded["peak"] = max(folded["peak"], torch.cuda.max_memory_allocated(dev))
        folded["reserved"] = max(folded["reserved"], torch.cuda.max_memory_reserved(dev))

    if cuda:
        real_reset = torch.cuda.memory.reset_peak_memory_stats

        def folding_reset(device=None):
            fold()
            real_reset(device)

        torch.cuda.reset_peak_memory_stats = torch.cuda.memory.reset_peak_memory_stats = folding_reset

    def record(**extra) -> None:
        out = {"stage": stage, "seconds": time.perf_counter() - t0, "cuda": cuda, **extra}
        if cuda:
            fold()
            out.update(peak=folded["peak"], reserved=folded["reserved"], device=torch.cuda.get_device_name(dev))
        else:
            out.update(peak=_status("VmHWM") - base, device="cpu")
        out.update(torch=torch.__version__, transformers=transformers.__version__)
        tmp = Path(result + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, result)

    if NEXT[stage]:
        def stop(*args, **kwargs):
            raise _Stop

        setattr(pipeline, NEXT[stage], stop)
    if stage == "distill-killed":
        real_save = loop.save_checkpoint

        def save_then_wait(out, step, *args, **kwargs):  # the parent kills this process once it sees the marker
            real_save(out, step, *args, **kwargs)
            record(checkpoint_step=step, killed=True)
            prefix = os.environ.get("MINITRON_AUDIT_COLLECTIVES")
            for audit in audits:  # atexit never runs under SIGKILL: write the audit now
                audit.write(prefix)
            Path(result + ".checkpointed").write_text(str(step))
            while True:
                time.sleep(60)

        loop.save_checkpoint = save_then_wait
    try:
        code = main(["run", recipe])
    except _Stop:
        code = 0
    if code == 0:
        record(killed=False)
    return code


# ---- the parent: run the stages, read what they left, build the table ---------------------------------

def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. torchrun starts its workers in sessions of their own, so killing
    the agent's process group alone left the worker running (holding its GPU) after the agent died."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_stage(stage: str, mode: str, work: Path, recipe: Path, env: dict, deadline: float) -> dict:
    """One stage process under torchrun; its log in work/logs. Returns its result with wall seconds and exit. The
    process is killed at `deadline` (time.perf_counter), so that the table is written whatever happens."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    result = work / f"result-{stage}.json"
    for p in (result, Path(str(result) + ".checkpointed")):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           "--child", stage, "--recipe", str(recipe), "--result", str(result)]
    stage_env = {**env, "MINITRON_AUDIT_COLLECTIVES": str(work / f"audit-{stage}")}
    t0 = time.perf_counter()
    with open(logs / f"{stage}.log", "w") as f:
        proc = subprocess.Popen(cmd, env=stage_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        marker = Path(str(result) + ".checkpointed")
        deadline = min(deadline, t0 + MODES[mode]["timeout"])
        killed = False
        while proc.poll() is None:
            if stage == "distill-killed" and marker.is_file():
                kill_tree(proc.pid)  # torchrun's agent and its worker: a machine-level kill
                killed = True
                proc.wait()
                break
            if time.perf_counter() > deadline:
                kill_tree(proc.pid)
                proc.wait()
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    out = json.loads(result.read_text()) if result.is_file() else {"stage": stage}
    out.update(wall=wall, exit=proc.returncode, killed_by_check=killed, log=str(logs / f"{stage}.log"),
               timed_out=time.perf_counter() > deadline and not killed)
    ok = killed if stage == "distill-killed" else proc.returncode == 0
    if not ok:
        text = (logs / f"{stage}.log").read_text()
        print(text[-4000:], file=sys.stderr)
        log(f"{stage}: FAILED (exit {proc.returncode}{', timed out' if out['timed_out'] else ''}"
            f"{', finished without a checkpoint' if stage == 'distill-killed' and proc.returncode == 0 else ''}); "
            f"log: {logs / f'{stage}.log'}")
    else:
        log(f"{stage}: {wall:.0f} s, peak {fmt(out.get('peak'))}"
            + (f", killed after its checkpoint at step {out.get('checkpoint_step')}" if killed else ""))
    out["ok"] = ok
    return out


def estimates(recipe: Path) -> dict[str, dict]:
    """minitron.pipeline.estimate's estimate of each measured stage for the recipe, as torchrun with one process runs it
    (distributed: fsdp is FSDP2 over one rank there), comparable = the larger of the steady state and the loading
    peak, less the CUDA context term."""
    from minitron.pipeline import RunConfig
    from minitron.pipeline import estimate as E
    from minitron.pipeline.config import load_config

    cfg = load_config(RunConfig, str(recipe))
    shapes = E.resolve_shapes(cfg)
    stages = {e.stage: e for e in E.estimate_run(cfg, 1, None, shapes, torchrun=True)}
    out = {}
    for name, e in stages.items():
        if e.skipped:
            continue
        steady = e.total - e.terms.get("CUDA context", 0)
        top = sorted(((k, v) for k, v in e.terms.items() if k != "CUDA context"), key=lambda kv: -kv[1])[:3]
        out[name] = {"total": e.total, "comparable": max(steady, e.load), "load": e.load, "note": e.note,
                     "terms": ", ".join(f"{k} {fmt(v)}" for k, v in top)}
    out["_shapes"] = {"teacher": shapes["teacher"].describe(), "student": shapes["student"].describe()}
    return out


def train_records(metrics: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in metrics if "tok_per_s" in r}


def steady_rate(records: dict[int, dict], start: int, end: int, tokens_per_step: int) -> float | None:
    """Tokens/s of steps (start + warm-up, end] of one process. Each record's tok_per_s is cumulative since that
    process's loop began (minitron.distill.loop), so elapsed(s) = (s - start) x tokens per step / tok_per_s."""
    if end not in records or end <= start:
        return None
    warm = start + max(1, (end - start) // 10)
    if warm >= end or warm not in records:
        return records[end]["tok_per_s"]

    def elapsed(s):
        return (s - start) * tokens_per_step / records[s]["tok_per_s"]

    return (end - warm) * tokens_per_step / (elapsed(end) - elapsed(warm))


def audit_of(work: Path, stage: str) -> dict:
    path = work / f"audit-{stage}.rank0.json"
    if not path.is_file():
        return {"present": False, "calls": 0, "violations": None, "ops": []}
    rec = json.loads(path.read_text())
    return {"present": True, "calls": len(rec["calls"]), "violations": len(rec["violations"]),
            "ops": sorted({c["op"] for c in rec["calls"]}), "device": rec["device"],
            "first_violations": rec["violations"][:3]}


def analyse(mode: str, work: Path, recipe: Path, results: dict[str, dict], tolerance: float, budget: float,
            total_wall: float) -> dict:
    """The rows and the checks."""
    from minitron.distill import read_metrics

    run = work / "run"
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    try:
        est = estimates(recipe)
    except Exception as e:  # noqa: BLE001 - the table still shows what was measured
        est = {}
        check("estimates computed", False, f"{type(e).__name__}: {e}")

    for stage in STAGES:
        r = results.get(stage)
        check(f"{stage} ran", r is not None and r["ok"],
              "not run" if r is None else ("killed by the check, " if r.get("killed_by_check") else "")
              + f"exit {r['exit']}" + (", timed out" if r.get("timed_out") else ""))

    # distillation: the kill, the resume, the metrics
    metrics = read_metrics(run / "distill" / "metrics.jsonl")
    recs = train_records(metrics)
    info_path = run / "distill" / "minitron_distill.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    m = MODES[mode]
    total = m["steps"]
    ckpt = results.get("distill-killed", {}).get("checkpoint_step")
    resumed_log = Path(results["distill-resumed"]["log"]).read_text() if "distill-resumed" in results else ""
    resumed_at = None
    marker = f"resumed {run / 'distill'} at step "
    if marker in resumed_log:
        resumed_at = int(resumed_log.split(marker, 1)[1].split("/", 1)[0])
    check("killed after a checkpoint", ckpt is not None and ckpt > 0 and results["distill-killed"]["killed_by_check"],
          f"checkpoint at step {ckpt}")
    check("resumed from the checkpoint, not from 0", resumed_at is not None and resumed_at == ckpt and resumed_at > 0,
          f"resumed at step {resumed_at} (checkpoint {ckpt})")
    check("resumed run kept the earlier stages", "redoing" not in resumed_log, "no 'redoing' in its log")
    check("every step logged once, in order", sorted(recs) == list(range(1, total + 1))
          and [r["step"] for r in metrics if "tok_per_s" in r] == list(range(1, total + 1)),
          f"training records for steps {min(recs, default=None)}..{max(recs, default=None)} of {total}")
    check("distillation finished", info.get("steps") == total, f"minitron_distill.json: {info.get('steps')} steps")
    config_path = run / "distill" / "distill_config.json"
    distributed = json.loads(config_path.read_text()).get("distributed") if config_path.is_file() else None
    check("FSDP2 over one rank", distributed == "fsdp", f"distill_config.json: distributed {distributed}")
    tokens_per_step = info.get("tokens", 0) // max(1, info.get("steps", 1)) or m["grad_accum"] * m["seq_len"]
    rates = {"distill-killed": steady_rate(recs, 0, ckpt or 0, tokens_per_step),
             "distill-resumed": steady_rate(recs, resumed_at or 0, total, tokens_per_step)}

    final_log = Path(results["eval"]["log"]).read_text() if "eval" in results else ""
    skipped = [s for s in ("importance", "prune", "distill") if f"{s}: up to date, skipped" in final_log]
    check("the final run skipped the finished stages", skipped == ["importance", "prune", "distill"],
          f"skipped: {', '.join(skipped) or 'none'}")
    made = [p for p in ("eval/results.json", "export/config.json", "report.md") if (run / p).is_file()]
    check("eval, export and report written", len(made) == 3, ", ".join(made) or "none")

    audits = {s: audit_of(work, s) for s in ("distill-killed", "distill-resumed")}
    for s, a in audits.items():
        check(f"{s}: collectives audited, 0 violations", a["present"] and a["calls"] > 0 and a["violations"] == 0,
              "no audit file" if not a["present"] else f"{a['calls']} collectives, {a['violations']} violations"
              + (f": {a['first_violations']}" if a["violations"] else ""))

    cuda = any(r.get("cuda") for r in results.values())
    rows = []
    for stage in STAGES:
        r = results.get(stage, {})
        e = est.get(ESTIMATE_OF[stage], {})
        peak, comp = r.get("peak"), e.get("comparable")
        ratio = comp / peak if peak and comp else None
        notes = []
        if stage in rates and rates[stage]:
            span = (f"steps {max(1, (ckpt or 0) // 10) + 1}-{ckpt}" if stage == "distill-killed"
                    else f"steps {(resumed_at or 0) + max(1, (total - (resumed_at or 0)) // 10) + 1}-{total}")
            notes.append(f"{rates[stage]:,.0f} tok/s ({span})")
        if stage == "distill-killed":
            notes.append(f"SIGKILL after the checkpoint at step {ckpt}")
        if stage == "distill-resumed":
            notes.append(f"resumed at step {resumed_at} of {total}")
        if stage in audits:
            a = audits[stage]
            notes.append(f"audit: {a['calls']} collectives, {a['violations']} violations" if a["present"]
                         else "audit: missing")
        if r.get("reserved"):
            notes.append(f"reserved {r['reserved'] / GiB:.2f} GiB")
        if e.get("terms"):
            notes.append(f"estimate: {e['terms']}")
        rows.append({"stage": stage, "label": LABEL[stage], "measured": peak, "estimate": comp, "ratio": ratio,
                     "wall": r.get("wall"), "notes": "; ".join(notes), "tok_per_s": rates.get(stage)})
        if cuda and stage in ESTIMATE_OF and peak and comp:
            check(f"{stage}: estimate within {tolerance:.0%}", abs(ratio - 1) <= tolerance,
                  f"estimate / measured {ratio:.2f}")
    if cuda:
        check(f"whole check under {budget:.0f} s", total_wall <= budget, f"{total_wall:.0f} s")
    device = next((r["device"] for r in results.values() if r.get("device")), "?")
    versions = next((f"torch {r['torch']}, transformers {r['transformers']}" for r in results.values()
                     if r.get("torch")), "")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"mode": mode, "device": device, "cuda": cuda, "date": date.today().isoformat(), "commit": commit,
            "versions": versions, "shapes": est.get("_shapes"), "rows": rows, "checks": checks,
            "ok": all(c["ok"] for c in checks), "total_wall": total_wall, "tolerance": tolerance,
            "steps": total, "tokens_per_step": tokens_per_step}


def fmt(v: int | None) -> str:
    if v is None:
        return "—"
    return f"{v / GiB:.2f} GiB" if v >= GiB else f"{v / 2**20:.1f} MiB"


def table(summary: dict) -> str:
    s = summary
    what = ("max_memory_allocated" if s["cuda"] else "VmHWM minus the resident set after imports")
    lines = [f"GPU check ({s['mode']} mode) on {s['device']}, {s['date']}, commit {s['commit']}, {s['versions']}",
             f"teacher {s['shapes']['teacher']}" if s.get("shapes") else "",
             f"student {s['shapes']['student']}" if s.get("shapes") else "",
             f"{s['steps']} distillation steps of {s['tokens_per_step']:,} tokens; measured: {what}; estimate: "
             "minitron.pipeline.estimate (distill as FSDP2 over 1 rank; the larger of steady state and loading, without the "
             "CUDA context)", "",
             "| stage | measured peak | estimate | estimate / measured | wall s | notes |",
             "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        wall = f"{r['wall']:.0f}" if r["wall"] is not None else "—"
        lines.append(f"| {r['label']} | {fmt(r['measured'])} | {fmt(r['estimate'])} | {ratio} | {wall} | {r['notes']} |")
    lines.append(f"| total | | | | {s['total_wall']:.0f} | |")
    lines += ["", "Checks" + ("" if s["cuda"] else " (CPU: estimates and time not checked)") + ":"]
    lines += [f"- {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in s["checks"]]
    lines += ["", "GPU check: " + ("PASSED" if s["ok"] else "FAILED")]
    return "\n".join(line for line in lines if line is not None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="the tiny CPU mode even where a GPU is present")
    p.add_argument("--work", default=str(WORK), help=f"work dir, emptied first (default {WORK}; $GPU_CHECK_DIR)")
    p.add_argument("--tolerance", type=float, default=0.20, help="allowed |estimate / measured - 1| on CUDA")
    p.add_argument("--budget", type=float, default=600, help="seconds the whole check may take on CUDA")
    p.add_argument("--deadline", type=float, default=570,
                   help="seconds after which a running stage is killed and the table written (default 570)")
    p.add_argument("--steps", type=int, help="distillation steps (default: 200 on CUDA, 6 reduced); checkpoint and "
                   "kill at half of them")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--make", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.recipe, args.result)
    work = Path(args.work)
    if args.make:
        make_teacher(args.make, work)
        make_corpus(args.make, work)
        return 0

    import torch

    mode = "gpu" if torch.cuda.is_available() and not args.reduced else "reduced"
    if args.steps:
        MODES[mode].update(steps=args.steps, save_every=max(1, args.steps // 2), eval_every=max(1, args.steps // 2))
    t0 = time.perf_counter()
    if work.exists() and any(work.iterdir()) and not (work / ".gpu_check").is_file():
        raise SystemExit(f"--work {work} is not empty and was not made by this check: choose another folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / ".gpu_check").write_text("made by benchmarks/gpu_check.py: emptied by its next run\n")
    env = {**os.environ, "GPU_CHECK_MODE": mode, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "MINITRON_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if mode == "reduced":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the resident set follows live tensors (memory_bench)
    log(f"{mode} mode in {work}")  # the parent never initializes CUDA: each stage process has the GPU to itself
    made = subprocess.run([sys.executable, __file__, "--make", mode, "--work", str(work)], env=env)
    if made.returncode:
        raise SystemExit(f"GPU check: FAILED making the model and corpus (exit {made.returncode})")
    recipe = write_recipe(mode, work)
    log(f"prepared in {time.perf_counter() - t0:.0f} s; recipe {recipe}")
    results: dict[str, dict] = {}
    for stage in STAGES:
        results[stage] = run_stage(stage, mode, work, recipe, env, t0 + args.deadline)
        if not results[stage]["ok"]:
            break
    summary = analyse(mode, work, recipe, results, args.tolerance, args.budget, time.perf_counter() - t0)
    text = table(summary)
    (work / "gpu_check.md").write_text(text + "\n")
    (work / "gpu_check.json").write_text(json.dumps({**summary, "results": results}, indent=1))
    print(text)
    log(f"table in {work / 'gpu_check.md'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
