"""Prefill and decode speed at batch 1 of saved students against their teacher, rounds interleaved over the models.

Each round times every model once (harness.measure_speed: prefill of 128 tokens, the fastest of its repeated calls;
8 KV-cached decode steps), so a drift of the machine's speed over the run touches all alike; prints, per student,
the median over rounds of its speed over the teacher's in the same round, and the ratio of the best rounds. Run it
alone on the machine: benchmarks/RESULTS.md quotes it.

    .venv/bin/python benchmarks/speed_rounds.py runs/exp/p24 runs/exp/p26_832 runs/exp/p27_768 --rounds 12
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("students", nargs="+", help="saved model dirs")
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    from minitron.arch.models import load_model
    from minitron.eval.harness import measure_speed

    names = [args.teacher, *args.students]
    models = {n: load_model(n, "cpu", "float32", with_tokenizer=False)[0].eval() for n in names}
    res: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n, m in models.items():
            s = measure_speed(m, decode_tokens=8, batch_sizes=(1,), seed=r)
            res[n].append((s["prefill_tok_s"][1], s["decode_tok_s"][1]))
    t = res[args.teacher]
    for n in args.students:
        pre = statistics.median(a[0] / b[0] for a, b in zip(res[n], t, strict=True))
        dec = statistics.median(a[1] / b[1] for a, b in zip(res[n], t, strict=True))
        best = max(a[0] for a in res[n]) / max(b[0] for b in t)
        print(f"{n}: prefill b1 {pre:.3f}x (median of {args.rounds} rounds; best / best {best:.3f}x), "
              f"decode b1 {dec:.3f}x")


if __name__ == "__main__":
    main()
