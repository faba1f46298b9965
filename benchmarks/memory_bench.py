"""Peak memory of the importance pass and of distillation steps on this CPU, next to minitron.pipeline.estimate.

Each case runs in its own fresh process, so peaks never mix. A child imports torch, transformers and
minitron first, then takes its resident set (VmRSS) as the baseline, resets the kernel's high-water mark
(`echo 5 > /proc/self/clear_refs`), runs the stage through minitron's public functions (model loading
included), and reports VmHWM minus the baseline. Children run with MALLOC_MMAP_THRESHOLD_=131072, so every
large tensor is its own mapping, returned to the OS when freed: the resident set follows live tensors (as
CUDA's allocated bytes do) instead of glibc's cache. The estimate is minitron.pipeline.estimate.estimate_run on a
RunConfig with the same settings and device cpu (no CUDA context term).

Cases:
  smol-importance     the default teacher (SmolLM2-135M, fp32), importance.compute_importance, 8 x 256
  smol-importance-big the same at 16 x 512 tokens per forward (the layer temporaries matter)
  smol-distill        distill.distill, 2 steps, student 70M (hidden 360 / MLP 1096, random init), fp32, 8 x 256
  smol-distill-ckpt   the same with grad_checkpointing
  smol-distill-fsdp   smol-distill on 2 processes (torchrun, gloo) with FSDP2: the largest rank's peak
  smol-distill-bf16   fp32 master weights + autocast bf16, teacher bf16, 2 x 256
  1b-importance       a random-weight Llama with Llama-3.2-1B's shape, bf16, 2 x 512
  1b-distill          that teacher in bf16 -> student hidden 1536 / MLP 6144 (fp32 master), 1 x 512, 2 steps,
                      fp32 compute (this CPU has no bf16 matmul units: bf16 backward runs at ~0.4 GFLOPS)
  1b-distill-bf16     the same with autocast bf16 compute, 1 x 128 tokens
  1b-importance-wide  the 1B teacher in fp32 weights (fast matmuls here), 2 x 2048 tokens per forward
  1b-importance-wide-old  the same on the code before bounded memory (OLD_COMMIT: every layer's hidden
                      states kept, Block Importance stacked as fp32 [L+1, N, C]); its source is taken from git
  1b-lmloss-wide      models.lm_loss (prune's held-out loss, search's scoring) of the fp32 1B teacher, 2 x 2048
  1b-lmloss-wide-old  the same on OLD_COMMIT (fp32 [B, T, V] logits and their log-softmax at once)
  1b-distill-old      1b-distill on OLD_COMMIT: one dtype for student and teacher, so the teacher is fp32
Two distillation steps, so that the second runs with AdamW's states allocated (the steady state the
estimate models; the first step peaks lower). Evaluation inside distill uses one validation block.

  .venv/bin/python benchmarks/memory_bench.py --cases smol             # the SmolLM2 cases (minutes)
  .venv/bin/python benchmarks/memory_bench.py --cases 1b               # the 1B cases (about an hour here)
  .venv/bin/python benchmarks/memory_bench.py --table                  # print the table of saved results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from git_src import source_at  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("MEMORY_BENCH_DIR", "/tmp/minitron_memory_bench"))
GiB = 1024**3

# Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 / 8 heads, head_dim 64, MLP 8192, vocab 128256, tied)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, num_hidden_layers=16, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0)
STUDENT_1B = dict(hidden=1536, ffn=6144)
STUDENT_SMOL = dict(hidden=360, ffn=1096)  # recipes/default.yaml's 70M budget by one common ratio

CASES = {
    "smol-importance": dict(kind="importance", teacher="default", dtype="float32", batch=8, seq=256),
    "smol-importance-big": dict(kind="importance", teacher="default", dtype="float32", batch=16, seq=512),
    "smol-distill": dict(kind="distill", teacher="default", student="smol-student", dtype="float32",
                         autocast="none", teacher_dtype=None, batch=8, seq=256, ckpt=False),
    "smol-distill-ckpt": dict(kind="distill", teacher="default", student="smol-student", dtype="float32",
                              autocast="none", teacher_dtype=None, batch=8, seq=256, ckpt=True),
    "smol-distill-fsdp": dict(kind="distill", teacher="default", student="smol-student", dtype="float32",
                              autocast="none", teacher_dtype=None, batch=8, seq=256, ckpt=False, world=2),
    "smol-distill-bf16": dict(kind="distill", teacher="default", student="smol-student", dtype="float32",
                              autocast="bf16", teacher_dtype="bfloat16", batch=2, seq=256, ckpt=False),
    "1b-importance": dict(kind="importance", teacher="llama1b", dtype="bfloat16", batch=2, seq=512),
    "1b-distill": dict(kind="distill", teacher="llama1b", student="llama1b-student", dtype="float32",
                       autocast="none", teacher_dtype="bfloat16", batch=1, seq=512, ckpt=False),
    "1b-distill-bf16": dict(kind="distill", teacher="llama1b", student="llama1b-student", dtype="float32",
                            autocast="bf16", teacher_dtype="bfloat16", batch=1, seq=128, ckpt=False),
    "1b-importance-wide": dict(kind="importance", teacher="llama1b", dtype="float32", batch=2, seq=2048),
    "1b-importance-wide-old": dict(kind="importance", teacher="llama1b", dtype="float32", batch=2, seq=2048,
                                   code="old"),
    "1b-lmloss-wide": dict(kind="lmloss", teacher="llama1b", dtype="float32", batch=2, seq=2048),
    "1b-lmloss-wide-old": dict(kind="lmloss", teacher="llama1b", dtype="float32", batch=2, seq=2048, code="old"),
    "1b-distill-old": dict(kind="distill", teacher="llama1b", student="llama1b-student", dtype="float32",
                           autocast="none", teacher_dtype=None, batch=1, seq=512, ckpt=False, code="old"),
}
OLD_COMMIT = "8e30923"  # the last commit before bounded memory (Block Importance streamed, chunked LM loss)
GROUPS = {"smol": [c for c in CASES if c.startswith("smol")], "1b": [c for c in CASES if c.startswith("1b")],
          "all": list(CASES)}


def model_path(name: str) -> str:
    return name if name == "default" else str(WORK / name)


# ---- preparing models and corpus (in their own processes) ---------------------------------------------

def old_source() -> Path:
    """OLD_COMMIT's src/ (git archive), for the cases with code="old"."""
    return source_at(OLD_COMMIT, WORK)


def prepare(names: list[str]) -> None:
    """Write the corpus and the random-weight models the cases need (once)."""
    (WORK / "corpus").mkdir(parents=True, exist_ok=True)
    if not any((WORK / "corpus").iterdir()):
        import random

        rng = random.Random(0)
        words = ("the model prunes heads neurons channels and layers then distills a student from its teacher "
                 "on packed blocks of text with a chunked loss over tokens memory grows with batch and sequence "
                 "length while weights optimizer states and gradients grow with parameters").split()
        for i in range(40):  # 40 documents of ~1500 words: enough blocks of 512 for training and validation
            text = "\n\n".join(" ".join(rng.choice(words) for _ in range(150)) + "." for _ in range(10))
            (WORK / "corpus" / f"doc{i:02d}.txt").write_text(text)
    needed = {CASES[c].get("student") for c in names} | {CASES[c]["teacher"] for c in names}
    for name in sorted(n for n in needed if n and n != "default"):
        if not (WORK / name / "config.json").is_file():
            subprocess.run([sys.executable, __file__, "--make", name], check=True)


def make_model(name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitron.arch import dims_of
    from minitron.arch.models import load_tokenizer
    from minitron.prune.plan import config_with_dims, source_config

    if name == "smol-student":
        config = source_config("default")
        config = config_with_dims(config, dims_of(config).__class__(**{**dims_of(config).to_dict(), **STUDENT_SMOL}))
    elif name == "llama1b":
        config = LlamaConfig(**LLAMA_1B)
    elif name == "llama1b-student":
        base = LlamaConfig(**LLAMA_1B)
        config = config_with_dims(base, dims_of(base).__class__(**{**dims_of(base).to_dict(), **STUDENT_1B}))
    else:
        raise SystemExit(f"unknown model {name}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # random weights, saved in bf16
    out = WORK / name
    model.save_pretrained(out)
    load_tokenizer("default").save_pretrained(out)  # token ids < 49152: any vocab >= that works
    print(f"[memory_bench] wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params)")


# ---- measuring (one case per process) -----------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_case(name: str) -> dict:
    import tempfile

    import torch
    import transformers  # noqa: F401 - imported before the baseline, like everything else
    from transformers import LlamaForCausalLM  # noqa: F401

    from minitron.arch.models import lm_loss, load_model
    from minitron.distill import DistillConfig, distill
    from minitron.prune.importance import ImportanceConfig, compute_importance

    case = CASES[name]
    out_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK))
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    if case["kind"] in ("importance", "lmloss"):
        model, _ = load_model(model_path(case["teacher"]), "cpu", case["dtype"], with_tokenizer=False)
        loaded = _status("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # the pass's own peak, weights resident
        n_blocks = 2 * case["batch"] if case["kind"] == "importance" else case["batch"]  # 2 batches / 1 batch
        calib = torch.randint(0, 49152, (n_blocks, case["seq"]), generator=torch.Generator().manual_seed(0))  # [N, T]
        if case["kind"] == "importance":
            compute_importance(model, calib, ImportanceConfig(batch_size=case["batch"]))
        else:
            lm_loss(model, calib, batch_size=case["batch"])
        peak = _status("VmHWM")
        extra = {"load_peak": loaded - before}
    else:
        # OLD_COMMIT's DistillConfig has one dtype for student and teacher (no teacher_dtype)
        teacher_dtype = {} if case.get("code") == "old" else {"teacher_dtype": case["teacher_dtype"]}
        cfg = DistillConfig(student=model_path(case["student"]), teacher=model_path(case["teacher"]),
                            out=str(out_dir / "run"), data=str(WORK / "corpus"), steps=2, batch_size=case["batch"],
                            seq_len=case["seq"], dtype=case["dtype"], autocast=case["autocast"],
                            grad_checkpointing=case["ckpt"], device="cpu",
                            distributed="fsdp" if case.get("world", 1) > 1 else "auto",
                            eval_every=0, eval_batches=1, save_every=0, progress=False, **teacher_dtype)
        distill(cfg)
        peak = _status("VmHWM")
        extra = {}
    return {"case": name, "measured": peak - before, "seconds": time.perf_counter() - t0,
            "rank": int(os.environ.get("RANK", "0")), **extra}


# ---- the estimate of each case -----------------------------------------------------------------------

def run_config(name: str):
    from minitron.pipeline import RunConfig
    from minitron.pipeline.config import from_dict

    case = CASES[name]
    student = STUDENT_1B if case["teacher"] == "llama1b" else STUDENT_SMOL
    data = {"model": {"teacher": model_path(case["teacher"]), "device": "cpu", "dtype": case["dtype"]},
            "data": {"seq_len": case["seq"]}, "target": dict(student),
            "importance": {"batch_size": case["batch"]}}
    if case["kind"] == "distill":
        data["distill"] = {"batch_size": case["batch"], "grad_accum": 1, "autocast": case["autocast"],
                           "grad_checkpointing": case["ckpt"], "teacher_dtype": case["teacher_dtype"],
                           "distributed": "fsdp" if case.get("world", 1) > 1 else "auto"}
    return from_dict(RunConfig, data)


def estimate_case(name: str):
    from minitron.pipeline.estimate import estimate_run

    stage = {"lmloss": "prune"}.get(CASES[name]["kind"], CASES[name]["kind"])  # prune's term is the LM loss
    return next(e for e in estimate_run(run_config(name), CASES[name].get("world", 1)) if e.stage == stage)


def old_vs_new(saved: dict) -> str:
    """The cases measured on both codes: peak of the pass (weights resident) next to the weights (their bytes in
    the estimate: parameters x dtype size; loading peaks higher, while the file's bf16 is converted)."""
    lines = ["| case | weights (distill: the student's master weights, grads and AdamW states) | old code: pass peak "
             "| new code: pass peak | new / old | new peak / weights |",
             "|---|---|---|---|---|---|"]
    for name in CASES:
        old = saved.get(name + "-old")
        if old is None or name not in saved:
            continue
        new, terms = saved[name], estimate_case(name).terms
        w = terms.get("weights") or 4 * terms["master weights"]  # distill: fp32 master, grads, 2 AdamW states
        lines.append(f"| {name} | {w / GiB:.2f} GiB | {old['measured'] / GiB:.2f} GiB | {new['measured'] / GiB:.2f} GiB "
                     f"| {new['measured'] / old['measured']:.2f} | {new['measured'] / w:.2f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| case | settings | estimate | measured | estimate / measured | largest estimated terms |",
             "|---|---|---|---|---|---|"]
    for r in results:
        case = CASES[r["case"]]
        if case.get("code") == "old":
            continue
        est = estimate_case(r["case"])
        settings = (f"{case['dtype']} weights" if case["kind"] in ("importance", "lmloss") else
                    f"fp32 master, {'autocast bf16' if case['autocast'] == 'bf16' else 'fp32'} compute, teacher "
                    f"{case['teacher_dtype'] or case['dtype']}{', checkpointing' if case['ckpt'] else ''}")
        settings += f", {case['batch']} x {case['seq']}" + (f" per rank, FSDP x {case['world']}"
                                                             if case.get("world", 1) > 1 else "")
        terms = ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(est.terms.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"| {r['case']} | {settings} | {est.total / GiB:.2f} GiB | {r['measured'] / GiB:.2f} GiB | "
                     f"{est.total / r['measured']:.2f} | {terms} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="smol", help="smol | 1b | all | comma-separated case names")
    p.add_argument("--table", action="store_true", help="only print the table of the saved results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--make", help=argparse.SUPPRESS)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.make:
        return make_model(args.make)
    if args.child:
        print("RESULT " + json.dumps(run_case(args.child)), flush=True)
        return
    saved_path = WORK / "results.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    if not args.table:
        names = GROUPS.get(args.cases) or args.cases.split(",")
        prepare(names)
        if any(CASES[n].get("code") == "old" for n in names):
            old_source()
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"}
        for name in names:
            log = WORK / f"{name}.log"  # the child's output, kept if it dies
            world = CASES[name].get("world", 1)
            launch = ([str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={world}"]
                      if world > 1 else [sys.executable])
            with open(log, "w") as f:
                code = subprocess.run([*launch, __file__, "--child", name], env=env, stdout=f,
                                      stderr=subprocess.STDOUT).returncode
            text = log.read_text()
            ranks = [json.loads(x[x.index("RESULT ") + 7:]) for x in text.splitlines() if "RESULT " in x]
            if code or len(ranks) != world:
                print(text[-4000:], file=sys.stderr)
                raise SystemExit(f"case {name} failed (exit {code}); its output: {log}")
            saved[name] = max(ranks, key=lambda r: r["measured"])  # the largest rank's peak
            saved_path.write_text(json.dumps(saved, indent=1))
            print(f"[memory_bench] {name}: {saved[name]['measured'] / GiB:.2f} GiB in {saved[name]['seconds']:.0f} s",
                  flush=True)
    print(table([saved[c] for c in CASES if c in saved]))
    print()
    print(old_vs_new(saved))


if __name__ == "__main__":
    child = sys.argv[sys.argv.index("--child") + 1] if "--child" in sys.argv else None
    old = child is not None and CASES[child].get("code") == "old"
    sys.path.insert(0, str(old_source() if old else ROOT / "src"))
    main()
