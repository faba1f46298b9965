"""Run lm-evaluation-harness and minitron's evaluator on the same model and items; compare per item.

lm-eval runs its OWN task YAMLs (included by absolute path, so templates, preprocessing and metrics
are lm-eval's), re-pointed with `dataset_path: json` at local files: the shared/data files converted
to the Hugging Face schema lm-eval expects (fields renamed only, text unchanged).

    PYTHONPATH=src python benchmarks/lm_eval_parity.py --model default --tasks piqa,arc_easy --limit 200

Prints, per task: n, our acc/acc_norm, lm-eval's, per-item prediction mismatches, max |ll diff|, wall times.
"""

from __future__ import annotations

import argparse
import bz2
import json
import time
from pathlib import Path

from minitron.eval import tasks as T

LM_EVAL_YAML = {  # our task -> (lm-eval task yaml relative to lm_eval/tasks, lm-eval task name)
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag"),
    "piqa": ("piqa/piqa.yaml", "piqa"),
    "winogrande": ("winogrande/default.yaml", "winogrande"),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge"),
    "boolq": ("super_glue/boolq/default.yaml", "boolq"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa"),
    "lambada": ("lambada/lambada_openai.yaml", "lambada_openai"),
    "sciq": ("sciq/sciq.yaml", "sciq"),
    "copa": ("super_glue/copa/default.yaml", "copa"),
}


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_hf_rows(task: str, path: Path) -> list[dict]:
    """A shared/data file -> rows in the Hugging Face schema of the dataset lm-eval loads."""
    if task == "hellaswag":
        if path.suffix == ".jsonl":
            return _rows(path)
        lines = bz2.open(path, "rt", encoding="utf-8").read().splitlines()
        out = []
        for i in range(0, len(lines), 6):
            label, _, ctx = lines[i].partition(": ")  # lm-eval rebuilds label + ": " + ctx_a + " " + ""
            out.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": lines[i + 2:i + 6],
                        "label": lines[i + 1]})
        return out
    if task == "piqa":
        labels = path.with_name(path.stem + "-labels.lst").read_text().split()
        return [dict(r, label=int(y)) for r, y in zip(_rows(path), labels, strict=True)]
    if task in ("arc_easy", "arc_challenge"):
        return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in _rows(path)]
    if task == "boolq":
        return [{"question": r["question"], "passage": r["passage"], "idx": r.get("idx", i),
                 "label": int(str(r["label"]).lower() == "true")} for i, r in enumerate(_rows(path))]
    if task == "openbookqa":
        import csv
        import re

        out = []
        with path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                parts = re.split(r"\(([A-Z])\) ", row["Choices"])[1:]
                out.append({"id": row["ID"], "question_stem": row["Question Stem"], "answerKey": row["Answer Key"],
                            "choices": {"text": [t.strip() for t in parts[1::2]], "label": parts[0::2]}})
        return out
    return _rows(path)  # winogrande, lambada, sciq, copa: already the HF fields


def write_lm_eval_tasks(tasks: list[str], root, out_dir: Path) -> dict[str, str]:
    """Write converted jsonl + YAMLs including lm-eval's own; returns our task -> local lm-eval task name."""
    import lm_eval

    base = Path(lm_eval.__file__).parent / "tasks"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        yaml_rel, _ = LM_EVAL_YAML[task]
        data = out_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in to_hf_rows(task, T.task_file(task, root))))
        name = f"mt_{task}"
        split = "test" if task == "lambada" else "validation"
        (out_dir / f"{name}.yaml").write_text(
            f"include: {base / yaml_rel}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n"
            f"training_split: null\nvalidation_split: {'null' if split == 'test' else 'validation'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\nfewshot_split: null\n")
        names[task] = name
    return names


def run_lm_eval(model, tokenizer, tasks: list[str], root, limit: int | None, batch_size: int, work: Path) -> dict:
    """lm-eval on the given model object -> {task: {"acc", "acc_norm", "pred", "pred_norm", "ll", "wall_s"}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = write_lm_eval_tasks(tasks, root, work)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tm = TaskManager(include_path=str(work), include_defaults=True)
    res = {}
    for task in tasks:  # one call per task, to time each
        t0 = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[names[task]], task_manager=tm, limit=limit, num_fewshot=0,
                              log_samples=True, bootstrap_iters=0)
        samples = sorted(out["samples"][names[task]], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        metrics = out["results"][names[task]]
        r = {"wall_s": time.perf_counter() - t0, "acc": metrics["acc,none"], "ll": lls, "n": len(samples)}
        if task == "lambada":
            r["perplexity"] = metrics["perplexity,none"]
            r["greedy"] = [bool(s["filtered_resps"][0][1]) for s in samples]
        else:
            r["acc_norm"] = metrics.get("acc_norm,none")
            r["pred"] = [T._argmax_first(x) for x in lls]
        res[task] = r
    return res


def run_ours(model, tokenizer, tasks: list[str], root, limit: int | None, batch_size: int) -> dict:
    from minitron.eval.harness import score_task

    res = {}
    for task in tasks:
        t0 = time.perf_counter()
        r = score_task(model, tokenizer, T.load_task(task, root, limit), batch_size, progress=False)
        r["wall_s"] = time.perf_counter() - t0
        r.update(r.pop("items"))
        res[task] = r
    return res


def compare(ours: dict, theirs: dict) -> list[dict]:
    rows = []
    for task in ours:
        a, b = ours[task], theirs[task]
        row = {"task": task, "n": a["n"], "lm_eval_n": b["n"], "ours_acc": a["acc"], "lm_eval_acc": b["acc"],
               "ours_s": a["wall_s"], "lm_eval_s": b["wall_s"]}
        la = [x for item in a["ll"] for x in (item if isinstance(item, list) else [item])]
        lb = [x for item in b["ll"] for x in item]
        row["max_ll_diff"] = max(abs(x - y) for x, y in zip(la, lb, strict=True))
        if task == "lambada":
            row["pred_mismatch"] = sum(x != y for x, y in zip(a["greedy"], b["greedy"], strict=True))
            row["ours_ppl"], row["lm_eval_ppl"] = a["perplexity"], b["perplexity"]
        else:
            row["pred_mismatch"] = sum(x != y for x, y in zip(a["pred"], b["pred"], strict=True))
            row["ours_acc_norm"], row["lm_eval_acc_norm"] = a["acc_norm"], b["acc_norm"]
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default="/tmp/minitron-lm-eval-parity")
    p.add_argument("--out", default=None, help="write the comparison rows as JSON here")
    args = p.parse_args()
    from minitron.arch.models import load_model

    tasks = [T.canonical_name(t) for t in args.tasks.split(",")]
    model, tok = load_model(args.model, "cpu", "float32")
    print("| task | n | acc ours | acc lm-eval | acc_norm ours | acc_norm lm-eval | ppl ours | ppl lm-eval | "
          "pred mismatches | max abs ll diff | ours s | lm-eval s |")
    print("|---" * 12 + "|", flush=True)
    rows = []
    for task in tasks:  # one task at a time, so that every finished row is printed
        ours = run_ours(model, tok, [task], args.data_dir, args.limit, args.batch_size)
        theirs = run_lm_eval(model, tok, [task], args.data_dir, args.limit, args.batch_size, Path(args.work))
        r = compare(ours, theirs)[0]
        rows.append(r)

        def f(k, r=r):
            return f"{r[k]:.4f}" if r.get(k) is not None else "-"
        print(f"| {r['task']} | {r['n']} | {f('ours_acc')} | {f('lm_eval_acc')} | {f('ours_acc_norm')} | "
              f"{f('lm_eval_acc_norm')} | {f('ours_ppl')} | {f('lm_eval_ppl')} | {r['pred_mismatch']} | "
              f"{r['max_ll_diff']:.2e} | {r['ours_s']:.1f} | {r['lm_eval_s']:.1f} |", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))

if __name__ == "__main__":
    main()
