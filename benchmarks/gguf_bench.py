"""Teacher vs pruned student as GGUF files under llama.cpp, side by side in one run (issue 18).

Both models are exported with the same GGUF type; llama.cpp (llama-cpp-python, extra gguf-runtime) then
measures, per model: file size, prompt-processing and generation tokens/s (batch 1, interleaved rounds, the
best kept), and WikiText-2 perplexity on non-overlapping windows of token ids made by the Hugging Face
tokenizer (evaluate.wikitext_ids), so the same windows can be scored by transformers in fp32 for reference.

    python benchmarks/gguf_bench.py --types q8_0,f16 --windows 4 --window 1024 --out runs/gguf-bench
    python benchmarks/gguf_bench.py --student runs/default/export      # any saved student
    python benchmarks/gguf_bench.py --student runs/a --student runs/b  # several, side by side
    python benchmarks/gguf_bench.py ... --speed-only   # re-time the files of an earlier run (its JSON is updated)

Speed is only as good as the machine is quiet: the load average before and after each speed phase is recorded.

Without --student, the student is pruned from the default teacher once (kept in runs/gguf-student) by
    minitron prune --model default --params 70M --calib-samples 16 --heldout-samples 4 --out runs/gguf-student
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minitron.arch.models import default_model_dir, load_model
from minitron.eval.harness import wikitext_ids, windowed_perplexity
from minitron.export import runtime as R
from minitron.export.gguf import export_gguf, gguf_file_name

PRUNE = ["prune", "--model", "default", "--params", "70M", "--calib-samples", "16", "--heldout-samples", "4"]


def student_dir(out: str) -> Path:
    """The default teacher pruned to 70M once (reused when present)."""
    path = Path(out)
    if not (path / "config.json").is_file():
        cmd = [sys.executable, "-m", "minitron.cli", *PRUNE, "--out", str(path)]
        print("[bench] pruning the student:", " ".join(["minitron", *PRUNE, "--out", str(path)]), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"[bench] pruned in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", action="append", help="a saved student dir or LABEL=DIR, repeatable (default: "
                    "prune the default teacher to 70M)")
    ap.add_argument("--student-out", default="runs/gguf-student", help="where the pruned student is kept")
    ap.add_argument("--types", default="q8_0", help="GGUF types, comma-separated (each model in each type)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=int, default=1024, help="WikiText-2 window (tokens)")
    ap.add_argument("--windows", type=int, default=4, help="WikiText-2 windows scored (the first N)")
    ap.add_argument("--no-hf-ppl", action="store_true", help="skip the transformers fp32 perplexity reference")
    ap.add_argument("--data-dir", default=os.environ.get("MINITRON_DATA_DIR", "../shared/data"))
    ap.add_argument("--speed-only", action="store_true", help="re-time the GGUF files of an earlier run in --out")
    ap.add_argument("--out", default="runs/gguf-bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.speed_only:
        return retime(out, args)
    given = [a.split("=", 1) if "=" in a else [None, a] for a in args.student or []]
    students = given or [[None, str(student_dir(args.student_out))]]
    models = {"teacher": str(default_model_dir())}
    models.update({label or ("student" if len(students) == 1 else f"student {Path(p).name}"): p for label, p in students})
    res: dict = {"models": models, "threads": os.cpu_count(), "types": {}, "config": vars(args)}
    old = out / "gguf_bench.json"
    if old.is_file():  # resume an interrupted run of the same models and windows: keep what it finished
        prev = json.loads(old.read_text())
        if prev["models"] == models and all(prev["config"][k] == vars(args)[k] for k in ("window", "windows")):
            res.update(hf_ppl=prev.get("hf_ppl", {}), types=prev["types"])

    loaded = {k: load_model(v, "cpu", "float32") for k, v in models.items()}
    tok = loaded["teacher"][1]
    ids = wikitext_ids(tok, args.data_dir)
    res["params"] = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in loaded.items()}
    res["dims"] = {k: {x: getattr(m.config, x) for x in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                         "num_key_value_heads", "num_hidden_layers")}
                   for k, (m, _) in loaded.items()}
    if not args.no_hf_ppl:
        res.setdefault("hf_ppl", {})
        for k, (m, _) in loaded.items():
            if k in res["hf_ppl"]:
                continue
            t = time.perf_counter()
            with torch.no_grad():
                res["hf_ppl"][k] = windowed_perplexity(m, ids, args.window, limit=args.windows)["perplexity"]
            print(f"[bench] transformers fp32 ppl {k}: {res['hf_ppl'][k]:.2f} ({time.perf_counter() - t:.0f} s)",
                  flush=True)
            write(out, res, quiet=True)
    for qtype in args.types.split(","):
        if qtype in res["types"]:
            continue
        files, entry = {}, {}
        for k, (m, t) in loaded.items():
            info = export_gguf(m, t, out / gguf_file_name(k, qtype), qtype, name=k)
            files[k] = info["path"]
            entry[k] = {"bytes": info["bytes"], "tensor_types": info["tensor_types"], "export_s": info["seconds"],
                        "file": info["path"]}
            print(f"[bench] {qtype} {k}: {info['bytes'] / 2**20:.1f} MiB {info['tensor_types']}", flush=True)
        sp = timed_speed(files, args)
        for k in files:
            t = time.perf_counter()
            entry[k].update(sp[k], ppl=R.perplexity(files[k], ids, args.window, args.windows)["perplexity"])
            print(f"[bench] {qtype} {k}: {sp[k]['prefill_tok_s']:.0f} / {sp[k]['decode_tok_s']:.1f} tok/s, "
                  f"ppl {entry[k]['ppl']:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
        res["types"][qtype] = entry
        write(out, res, quiet=True)
    write(out, res)


def timed_speed(files: dict, args) -> dict:
    """R.speed with the machine's load average (1 min) before and after, so a busy machine shows."""
    before = os.getloadavg()[0]
    sp = R.speed(files, args.prompt_tokens, args.gen_tokens, args.rounds)
    for r in sp.values():
        r["loadavg_before_after"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    return sp


def retime(out: Path, args) -> None:
    """--speed-only: the speed phase again on the files an earlier run wrote (sizes and perplexities kept)."""
    res = json.loads((out / "gguf_bench.json").read_text())
    res["config"].update(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, rounds=args.rounds)
    for qtype, entry in res["types"].items():
        sp = timed_speed({k: e.get("file") or str(out / gguf_file_name(k, qtype)) for k, e in entry.items()}, args)
        for k in entry:
            entry[k].update(sp[k])
            print(f"[bench] {qtype} {k}: {sp[k]['prefill_tok_s']:.0f} / {sp[k]['decode_tok_s']:.1f} tok/s "
                  f"(load {sp[k]['loadavg_before_after']})", flush=True)
    write(out, res)


def write(out: Path, res: dict, quiet: bool = False) -> None:
    """gguf_bench.json (after every phase: an interrupted run resumes) and gguf_bench.md."""
    (out / "gguf_bench.json").write_text(json.dumps(res, indent=2))
    if res["types"]:
        table = markdown(res)
        (out / "gguf_bench.md").write_text(table)
        if not quiet:
            print(table)


def markdown(res: dict) -> str:
    """One row per (type, model); the student's speed and size also as ratios to the teacher's."""
    a = res["config"]
    hf = res.get("hf_ppl", {})
    lines = [f"llama.cpp via llama-cpp-python, {res['threads']} CPU threads; prompt {a['prompt_tokens']} tokens in one "
             f"batch, then {a['gen_tokens']} generated tokens at batch 1 (greedy); best of {a['rounds']} interleaved "
             f"rounds. WikiText-2 test: first {a['windows']} non-overlapping windows of {a['window']} tokens.", "",
             "| type | model | params | hidden / MLP | file | matrices left f16 | prompt tok/s | generation tok/s "
             "| WikiText-2 ppl (llama.cpp) | ppl (transformers fp32) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for qtype, e in res["types"].items():
        t = e["teacher"]
        for k, r in e.items():
            rel = k != "teacher"
            size = f"{r['bytes'] / 2**20:.1f} MiB" + (f" ({r['bytes'] / t['bytes']:.2f}x)" if rel else "")
            pp = f"{r['prefill_tok_s']:.0f}" + (f" ({r['prefill_tok_s'] / t['prefill_tok_s']:.2f}x)" if rel else "")
            tg = f"{r['decode_tok_s']:.1f}" + (f" ({r['decode_tok_s'] / t['decode_tok_s']:.2f}x)" if rel else "")
            ref = f"{hf[k]:.2f}" if k in hf else "—"
            d = res["dims"][k]
            f16 = "—" if qtype in ("f16", "f32", "bf16") else f"{r['tensor_types'].get('F16', 0)} of " \
                f"{sum(n for t, n in r['tensor_types'].items() if t != 'F32')}"
            lines.append(f"| {qtype} | {k} | {res['params'][k] / 1e6:.1f}M | {d['hidden_size']} / {d['intermediate_size']} "
                         f"| {size} | {f16} | {pp} | {tg} | {r['ppl']:.2f} | {ref} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
