"""Old data path (data.read_texts + data.pack: Python lists, one document per tokenizer call) vs the token store
(minitron.data.store: batches, worker processes, streamed to a memory-mapped file) on the default corpus repeated to
10M and 100M tokens: tokens/s and peak RSS (VmHWM), each case in a fresh child process.

    .venv/bin/python benchmarks/data_bench.py [--sizes 10M,100M] [--num-proc 2] [--tokenizer default]

Prints a markdown table (the one in docs/data.md). The corpus is symlinks to the default corpus' files, repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vm_hwm_mib() -> float:
    """Peak resident set size of this process (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_corpus(root: Path, copies: int) -> Path:
    """`copies` folders of symlinks to every file of the default corpus."""
    from minitron.data import default_corpus_dir
    from minitron.data.sources import Source, resolve

    files = resolve(Source("default"))[1]
    base = default_corpus_dir()
    for c in range(copies):
        for f in files:
            dst = root / f"copy{c:03d}" / f.relative_to(base)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(f)
    return root


def child(case: str, corpus: str, tokenizer: str, num_proc: int, seq_len: int, work: str) -> dict:
    from minitron.data import pack, read_texts
    from minitron.data.blocks import rank_blocks
    from minitron.data.store import ensure_store, load_tokenizer

    tok = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    if case == "old":
        blocks = pack(read_texts(corpus), tok, seq_len)  # [N, T]
        tokens = blocks.numel()
    else:
        store = ensure_store(corpus, tok, Path(work) / "store", num_proc=num_proc, progress=False)
        tokens = store.n_tokens
        rank_blocks(store, seq_len, 0, 8, seed=0, max_blocks=4000)  # a consumer: rank 0 of 8 reads its 500 blocks (both sizes)
    seconds = time.perf_counter() - t0
    import resource

    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker's peak (KiB -> MiB)
    return {"case": case, "tokens": int(tokens), "seconds": seconds, "tok_s": tokens / seconds,
            "peak_rss_mib": vm_hwm_mib(), "worker_peak_rss_mib": workers}


def parse_size(s: str) -> int:
    return int(float(s[:-1]) * {"K": 1e3, "M": 1e6, "B": 1e9}[s[-1].upper()]) if s[-1].isalpha() else int(s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10M,100M")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--tokenizer", default="default")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--cases", default="old,store")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rows", help="also print these earlier [bench] json rows (a file) in the table")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return
    per_copy = 2_864_754  # tokens of the default corpus under the SmolLM2 tokenizer (minitron data default)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    rows = []
    if args.rows:
        rows = [json.loads(line.split(" ", 1)[1]) for line in Path(args.rows).read_text().splitlines()
                if line.startswith("[bench] {")]
    print(f"[bench] load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}", flush=True)
    for size in args.sizes.split(","):
        copies = max(1, round(parse_size(size) / per_copy))
        with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
            corpus = make_corpus(Path(tmp) / "corpus", copies)
            for case in args.cases.split(","):
                work = Path(tmp) / f"work-{case}"
                work.mkdir()
                spec = {"case": case, "corpus": str(corpus), "tokenizer": args.tokenizer, "num_proc": args.num_proc,
                        "seq_len": args.seq_len, "work": str(work)}
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"case {case} at {size} failed")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["size"] = size
                rows.append(row)
                print(f"[bench] {json.dumps(row)}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
    print("\n| corpus | path | tokens | seconds | tokens/s | peak RSS (MiB) | RSS bytes/token | each worker's peak (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        path = "read_texts + pack" if r["case"] == "old" else f"store, {args.num_proc} workers"
        workers = f"{r['worker_peak_rss_mib']:.0f}" if "worker_peak_rss_mib" in r and r["case"] == "store" else "-"
        print(f"| {r['size']} | {path} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tok_s'] / 1e6:.2f}M "
              f"| {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] * 2**20 / r['tokens']:.1f} | {workers} |")
    by = {(r["size"], r["case"]): r for r in rows}
    sizes = args.sizes.split(",")
    for s in sizes:
        if (s, "old") in by and (s, "store") in by:
            print(f"{s}: store / old throughput = {by[s, 'store']['tok_s'] / by[s, 'old']['tok_s']:.2f}x")
    if len(sizes) > 1 and all((s, "store") in by for s in sizes[:2]):
        a, b = by[sizes[0], "store"]["peak_rss_mib"], by[sizes[1], "store"]["peak_rss_mib"]
        print(f"store peak RSS {sizes[0]} -> {sizes[1]}: {a:.0f} -> {b:.0f} MiB ({(b / a - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
