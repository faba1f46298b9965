"""Zero-shot task readers: one small function per file format -> a list of `Item`s.

Every reader builds the same (context, continuation) requests that lm-evaluation-harness 0.4.x
builds from its task YAMLs, so that scoring them (minitron.eval.harness) gives lm-eval's numbers.

Files are found under the data dir (`--data-dir` or `$MINITRON_DATA_DIR`), laid out like
`shared/data` (see `TASK_FILES`). Formats:

- hellaswag   `hellaswag/hellaswag_val.jsonl` (original: activity_label, ctx_a, ctx_b, endings,
              label), else `hellaswag/hellaswag_val_full.txt.bz2` (llama.cpp's derived text format,
              6 lines per item: "activity_label: ctx", label, 4 endings). The derived file joined
              ctx_a and ctx_b WITHOUT lm-eval's `ctx_b.capitalize()` (e.g. "... on a roof. he"
              where lm-eval has "... on a roof. He") and cleaned brackets slightly differently,
              so its accuracy is close to, not equal to, lm-eval's on the original file.
- piqa        `piqa/valid.jsonl` (goal, sol1, sol2) + `piqa/valid-labels.lst` (0/1 per line).
- winogrande  `winogrande/dev.jsonl` (sentence with "_", option1, option2, answer "1"/"2").
- arc_easy / arc_challenge  `arc/ARC-{Easy,Challenge}-Test.jsonl` (AI2 jsonl: question.stem,
              question.choices[{text,label}], answerKey) or the HF layout (question, choices.text,
              choices.label, answerKey).
- boolq       `boolq/val.jsonl` (SuperGLUE: passage, question, label true/false or "true"/"false").
- openbookqa  `openbookqa/test.tsv` (AI2 TSV: ID, Question Stem, Choices "(A) .. (B) ..", ...,
              Answer Key) or `openbookqa/test.jsonl` (HF layout: question_stem, choices, answerKey).
- lambada     `lambada/lambada_test.jsonl` (OpenAI version: `text`).
- sciq        `sciq/sciq_test.jsonl` if present (lm-eval's split), else `sciq/sciq_validation.jsonl`
              (support, question, distractor1-3, correct_answer).
- copa        `copa/val.jsonl` (SuperGLUE: premise, choice1, choice2, question, label).
- mmlu        `mmlu/test/*_test.csv` (Hendrycks csv, no header: question, A, B, C, D, answer letter)
              or `mmlu/test.jsonl` / `mmlu/mmlu_test.jsonl` (HF cais/mmlu: question, subject,
              choices, answer index). Not shipped in shared/data.

A task with no file in the data dir is fetched once with `datasets` when online (`HUB_SOURCES`: the
split lm-eval 0.4 reads) and kept as jsonl in the HF row layout under the download cache.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from minitron.data.corpus import data_dir


class TaskError(ValueError):
    """Unknown task, missing or malformed task file; the message says how to fix it."""


@dataclass
class Item:
    """One scored example.

    requests: (context, continuation) per choice, already with lm-eval's target delimiter " ".
    choices:  the choice strings (without the delimiter) whose character lengths normalize acc_norm.
    gold:     index of the right choice (0 for a loglikelihood task such as LAMBADA).
    """

    requests: list[tuple[str, str]]
    choices: list[str]
    gold: int
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    """A task's items. kind: "multiple_choice" (acc, acc_norm) or "loglikelihood" (acc, perplexity)."""

    name: str
    items: list[Item]
    kind: str = "multiple_choice"
    source: str = ""
    note: str = ""


# task -> candidate files under the data dir, first existing wins
TASK_FILES: dict[str, list[str]] = {
    "hellaswag": ["hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt.bz2"],
    "piqa": ["piqa/valid.jsonl"],
    "winogrande": ["winogrande/dev.jsonl"],
    "arc_easy": ["arc/ARC-Easy-Test.jsonl"],
    "arc_challenge": ["arc/ARC-Challenge-Test.jsonl"],
    "boolq": ["boolq/val.jsonl"],
    "openbookqa": ["openbookqa/test.tsv", "openbookqa/test.jsonl"],
    "lambada": ["lambada/lambada_test.jsonl"],
    "sciq": ["sciq/sciq_test.jsonl", "sciq/sciq_validation.jsonl"],
    "copa": ["copa/val.jsonl"],
    "mmlu": ["mmlu/test", "mmlu/test.jsonl", "mmlu/mmlu_test.jsonl"],
}
# task -> (Hugging Face dataset, config, split) that lm-eval 0.4 reads, and the file (HF row layout) it is saved
# as under the download cache, when a task has no file in the data dir and `datasets` can fetch it (online)
HUB_SOURCES: dict[str, tuple[str, str | None, str, str]] = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", "hellaswag/hellaswag_val.jsonl"),
    "piqa": ("baber/piqa", None, "validation", "piqa/valid.jsonl"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "winogrande/dev.jsonl"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "arc/ARC-Easy-Test.jsonl"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "arc/ARC-Challenge-Test.jsonl"),
    "boolq": ("aps/super_glue", "boolq", "validation", "boolq/val.jsonl"),
    "openbookqa": ("allenai/openbookqa", "main", "test", "openbookqa/test.jsonl"),
    "lambada": ("EleutherAI/lambada_openai", "default", "test", "lambada/lambada_test.jsonl"),
    "sciq": ("allenai/sciq", None, "test", "sciq/sciq_test.jsonl"),
    "copa": ("aps/super_glue", "copa", "validation", "copa/val.jsonl"),
    "mmlu": ("cais/mmlu", "all", "test", "mmlu/test.jsonl"),
}
TASK_ALIASES = {"lambada_openai": "lambada", "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}
MC_TASKS = sorted(TASK_FILES)


def _mc(context: str, choices: list[str], gold: int, **meta) -> Item:
    """Shared-context item: continuation = " " + choice (lm-eval's default target delimiter)."""
    return Item([(context, " " + c) for c in choices], choices, gold, meta)


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _argmax_first(values) -> int:
    """Index of the first maximum (numpy.argmax's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, " [title]" -> ". ", drop [...] tags, collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[Item]:
    if path.name.endswith(".bz2") or path.suffix == ".txt":
        opener = bz2.open if path.name.endswith(".bz2") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        if len(lines) % 6:
            raise TaskError(f"{path}: the llama.cpp HellaSwag format has 6 lines per item; got {len(lines)} lines")
        items = []
        for i in range(0, len(lines), 6):
            query, label, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
            items.append(_mc(hellaswag_preprocess(query), [hellaswag_preprocess(e) for e in endings], label))
        return items
    items = []
    for d in _jsonl(path):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        items.append(_mc(hellaswag_preprocess(d["activity_label"] + ": " + ctx),
                         [hellaswag_preprocess(e) for e in d["endings"]], int(d["label"])))
    return items


# ---------------------------------------------------------------- PIQA, WinoGrande, COPA, BoolQ
def read_piqa(path: Path) -> list[Item]:
    labels_path = path.with_name(path.stem + "-labels.lst")
    rows = _jsonl(path)
    if "label" in rows[0]:
        labels = [int(r["label"]) for r in rows]
    elif labels_path.is_file():
        labels = [int(x) for x in labels_path.read_text().split()]
    else:
        raise TaskError(f"PIQA labels missing: put {labels_path.name} (one 0/1 per line) beside {path}")
    if len(labels) != len(rows):
        raise TaskError(f"{labels_path}: {len(labels)} labels for {len(rows)} items in {path}")
    return [_mc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y) for r, y in zip(rows, labels, strict=True)]


def read_winogrande(path: Path) -> list[Item]:
    """Partial scoring: one context per option (sentence up to "_" + option), one shared continuation."""
    items = []
    for r in _jsonl(path):
        s = r["sentence"]
        idx = s.index("_")
        contexts = [s[:idx] + r["option1"], s[:idx] + r["option2"]]
        target = " " + s[idx + 1:].strip()
        items.append(Item([(c, target) for c in contexts], contexts, {"1": 0, "2": 1}[str(r["answer"])]))
    return items


def read_copa(path: Path) -> list[Item]:
    """lm-eval's super_glue/copa: premise without its final period + " because"/" therefore"; each
    choice gets a leading space and a lower-cased first letter, then the delimiter adds another space."""
    items = []
    for r in _jsonl(path):
        context = r["premise"].strip()[:-1] + " " + {"cause": "because", "effect": "therefore"}[r["question"]]
        choices = [" " + c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        items.append(_mc(context, choices, int(r["label"])))
    return items


def _bool_label(v) -> int:
    if isinstance(v, bool | int):
        return int(v)
    return {"true": 1, "false": 0}[str(v).strip().lower()]


def read_boolq(path: Path) -> list[Item]:
    return [_mc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], _bool_label(r["label"]))
            for r in _jsonl(path)]


# ---------------------------------------------------------------- ARC, OpenBookQA, SciQ
def read_arc(path: Path) -> list[Item]:
    items = []
    for r in _jsonl(path):
        if isinstance(r["question"], dict):  # AI2 layout
            question, ch = r["question"]["stem"], r["question"]["choices"]
            texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
        else:  # HF layout
            question, texts, labels = r["question"], r["choices"]["text"], r["choices"]["label"]
        items.append(_mc(f"Question: {question}\nAnswer:", texts, labels.index(r["answerKey"]), id=r.get("id")))
    return items


_OBQA_SPLIT = re.compile(r"\(([A-Z])\) ")


def read_openbookqa(path: Path) -> list[Item]:
    """lm-eval: context = question stem alone, choices = option texts."""
    items = []
    if path.suffix == ".jsonl":
        for r in _jsonl(path):
            labels, texts = r["choices"]["label"], r["choices"]["text"]
            items.append(_mc(r["question_stem"], texts, labels.index(r["answerKey"].lstrip())))
        return items
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            parts = _OBQA_SPLIT.split(row["Choices"])[1:]  # [label, text, label, text, ...]
            labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
            items.append(_mc(row["Question Stem"], texts, labels.index(row["Answer Key"].strip()), id=row["ID"]))
    return items


def read_sciq(path: Path) -> list[Item]:
    return [_mc(f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
            for r in _jsonl(path)]


# ---------------------------------------------------------------- LAMBADA, MMLU
def read_lambada(path: Path) -> list[Item]:
    """context = text without its last space-separated word; continuation = " " + last word."""
    items = []
    for r in _jsonl(path):
        words = r["text"].split(" ")
        items.append(Item([(" ".join(words[:-1]), " " + words[-1])], [words[-1]], 0))
    return items


MMLU_LETTERS = ["A", "B", "C", "D"]


def _mmlu_item(subject: str, question: str, choices: list[str], answer: int) -> Item:
    """lm-eval mmlu (default, 0-shot): description line + question + lettered options + "Answer:"."""
    desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    body = question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(MMLU_LETTERS, choices, strict=True)) + "\nAnswer:"
    return _mc(desc + body, MMLU_LETTERS, answer, subject=subject)


def read_mmlu(path: Path) -> list[Item]:
    items = []
    if path.is_dir():
        files = sorted(path.glob("*_test.csv"))
        if not files:
            raise TaskError(f"{path} holds no *_test.csv files (Hendrycks MMLU layout data/test/<subject>_test.csv)")
        for f in files:
            subject = f.name[: -len("_test.csv")]
            with f.open(encoding="utf-8", newline="") as fh:
                for row in csv.reader(fh):
                    items.append(_mmlu_item(subject, row[0], row[1:5], MMLU_LETTERS.index(row[5].strip())))
        return items
    for r in _jsonl(path):
        ans = r["answer"]
        items.append(_mmlu_item(r["subject"], r["question"], r["choices"],
                                ans if isinstance(ans, int) else MMLU_LETTERS.index(ans)))
    return items


READERS = {
    "hellaswag": read_hellaswag, "piqa": read_piqa, "winogrande": read_winogrande, "arc_easy": read_arc,
    "arc_challenge": read_arc, "boolq": read_boolq, "openbookqa": read_openbookqa, "lambada": read_lambada,
    "sciq": read_sciq, "copa": read_copa, "mmlu": read_mmlu,
}


def canonical_name(name: str) -> str:
    name = TASK_ALIASES.get(name, name)
    if name not in READERS:
        raise TaskError(f"unknown task {name!r}; known tasks: wikitext2, loss:<corpus>, {', '.join(MC_TASKS)}")
    return name


def hub_cache() -> Path:
    """Where tasks fetched with `datasets` are kept, laid out like the data dir."""
    from minitron.arch.models import cache_dir

    return cache_dir() / "tasks"


def fetch_from_hub(name: str) -> Path:
    """Download a task's split with `datasets` (online) into hub_cache() as jsonl; returns the file."""
    repo, config, split, rel = HUB_SOURCES[name]
    out = hub_cache() / rel
    if out.is_file():
        return out
    import datasets  # optional; only reached when a task file is missing

    rows = datasets.load_dataset(repo, config, split=split)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row)) + "\n")
    tmp.replace(out)  # atomic: a half download never looks finished
    return out


def task_file(name: str, root: str | os.PathLike | None = None) -> Path:
    """The task's file: the first candidate under the data dir, else the `datasets` copy (fetched once,
    online, then read from the cache); failing both, a TaskError saying where to put the file."""
    name = canonical_name(name)
    base = data_dir(root)
    for rel in TASK_FILES[name] if base is not None else []:
        if (base / rel).exists():
            return base / rel
    where = (f"no data file in {base}; put one of {', '.join(str(base / r) for r in TASK_FILES[name])} there"
             if base is not None else
             f"no data dir: pass --data-dir DIR or set MINITRON_DATA_DIR to a folder laid out like shared/data "
             f"(expects {TASK_FILES[name][0]})")
    try:
        return fetch_from_hub(name)
    except Exception as e:  # no `datasets`, offline, or the hub refused: the local file is the way
        repo, offline = HUB_SOURCES[name][0], _offline_setting()
        if offline:
            why = (f"it cannot be downloaded either: this machine is offline ({offline} is set), so `datasets` "
                   f"could not fetch {repo} ({type(e).__name__}: {e}); copy the file there, or run once online "
                   "to cache it")
        elif isinstance(e, ImportError):
            why = f"fetching {repo} needs `datasets` (pip install datasets), which is not installed"
        else:
            why = f"fetching {repo} with `datasets` failed too ({type(e).__name__}: {e})"
        raise TaskError(f"task {name!r}: {where} (formats: minitron/eval/tasks.py); {why}") from e


def _offline_setting() -> str | None:
    """The environment variable that puts the Hugging Face libraries offline, if one is set."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def load_task(name: str, root: str | os.PathLike | None = None, limit: int | None = None) -> Task:
    """Read a task's items (the first `limit` of them) from the data dir."""
    name = canonical_name(name)
    path = task_file(name, root)
    try:
        items = READERS[name](path)
    except (KeyError, ValueError, IndexError, json.JSONDecodeError) as e:
        if isinstance(e, TaskError):
            raise
        raise TaskError(f"{path} does not look like the {name} format ({type(e).__name__}: {e}); "
                        "see minitron/eval/tasks.py for the expected layout") from e
    if not items:
        raise TaskError(f"{path} holds no items")
    note = ""
    if name == "hellaswag" and path.name.endswith((".txt.bz2", ".txt")):
        note = "llama.cpp derived HellaSwag text (ctx_b not capitalized): close to, not equal to, lm-eval"
    if name == "sciq" and "validation" in path.name:
        note = "SciQ validation split (lm-eval scores test)"
    kind = "loglikelihood" if name == "lambada" else "multiple_choice"
    return Task(name, items[:limit] if limit else items, kind, str(path), note)
