"""Task readers: exact lm-eval request strings on tiny fixture files, real files when available, errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from eval_fixtures import write_task_data
from minitron.eval import tasks as T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("taskdata"))


def test_hellaswag_original_jsonl_matches_lm_eval_query(data):
    items = T.read_hellaswag(data / "hellaswag/hellaswag_val.jsonl")
    assert items[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                                    " is using wrap to wrap a pair of skis.")
    assert items[0].gold == 3
    # preprocess: " [title]" -> ". ", [..] tags dropped, double spaces collapsed, trailing space stripped;
    # stripping happens before the tag removal, so "[step] Pour" keeps a leading space, as in lm-eval
    assert items[1].requests[0] == ("Making a cake: How to bake a cake. Mix the flour.", "  Pour it in a pan.")
    assert items[1].choices == [" Pour it in a pan.", "Eat it.", "Sing.", "Sleep."]


def test_hellaswag_derived_text_differs_only_by_ctx_b_capitalisation(data):
    txt = T.read_hellaswag(data / "hellaswag/hellaswag_val_full.txt.bz2")
    orig = T.read_hellaswag(data / "hellaswag/hellaswag_val.jsonl")
    assert [i.gold for i in txt] == [3, 0]
    assert txt[0].requests[0][0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert txt[0].requests[0][0] != orig[0].requests[0][0]
    assert txt[1].requests[0][0] == orig[1].requests[0][0]  # empty ctx_b: nothing to capitalize
    assert txt[1].requests[1:] == orig[1].requests[1:]


def test_jsonl_hellaswag_preferred_and_derived_flagged(tmp_path):
    both = T.load_task("hellaswag", write_task_data(tmp_path / "a", "both"))
    assert both.source.endswith(".jsonl") and not both.note
    derived = T.load_task("hellaswag", write_task_data(tmp_path / "b", "txt"))
    assert derived.source.endswith(".txt.bz2") and "not equal" in derived.note


def test_piqa_winogrande_copa_boolq(data):
    piqa = T.load_task("piqa", data).items
    assert piqa[1].requests == [("Question: Dry hair\nAnswer:", " Use water."), ("Question: Dry hair\nAnswer:", " Use a towel.")]
    assert [i.gold for i in piqa] == [0, 1]
    wino = T.load_task("winogrande", data).items
    assert wino[0].requests == [("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
                                ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino[0].choices == [r[0] for r in wino[0].requests]  # partial scoring: contexts vary
    assert [i.gold for i in wino] == [1, 0]
    copa = T.load_task("copa", data).items
    assert copa[0].requests[1] == ("The man turned on the faucet therefore", "  water flowed from the spout.")
    assert copa[0].choices[1] == " water flowed from the spout."
    boolq = T.load_task("boolq", data).items
    assert boolq[0].requests == [("Sky -- The sky is blue on clear days.\nQuestion: is the sky blue?\nAnswer:", " no"),
                                 ("Sky -- The sky is blue on clear days.\nQuestion: is the sky blue?\nAnswer:", " yes")]
    assert [i.gold for i in boolq] == [1, 0]


def test_arc_openbookqa_sciq_lambada_mmlu(data):
    arc = T.load_task("arc_easy", data).items
    assert arc[0].requests[0] == ("Question: Which is a planet?\nAnswer:", " Mars")
    assert [i.gold for i in arc] == [0, 1]  # numeric answer keys index the labels
    assert [i.gold for i in T.load_task("arc_challenge", data).items] == [1, 0]
    obqa = T.load_task("openbookqa", data).items
    assert obqa[0].choices == ["planet", "star", "moon", "comet"] and obqa[0].gold == 1
    assert obqa[0].requests[1] == ("The sun is a", " star")
    sciq = T.load_task("sciq", data)
    assert sciq.items[0].requests[3] == ("Plants absorb carbon dioxide.\nQuestion: What gas do plants absorb?\nAnswer:",
                                         " carbon dioxide")
    assert sciq.items[1].requests[3][0] == "\nQuestion: Who proposed evolution?\nAnswer:"
    assert sciq.items[0].gold == 3 and "validation" in sciq.note
    lam = T.load_task("lambada_openai", data)
    assert lam.kind == "loglikelihood"
    assert lam.items[1].requests == [("The cat sat on the", " mat")]
    assert lam.items[0].requests[0][1] == " friend"
    mmlu = T.load_task("mmlu", data).items
    assert mmlu[1].requests[0][0] == ("The following are multiple choice questions (with answers) about high school "
                                      "physics.\n\nSpeed of light, roughly?\nA. 3e8 m/s\nB. 3e5 m/s\nC. 340 m/s\n"
                                      "D. 1 m/s\nAnswer:")
    assert [r[1] for r in mmlu[0].requests] == [" A", " B", " C", " D"]
    assert [i.gold for i in mmlu] == [1, 0]


def test_mmlu_jsonl_layout(tmp_path):
    p = tmp_path / "mmlu/test.jsonl"
    p.parent.mkdir()
    p.write_text('{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}\n')
    item = T.load_task("mmlu", tmp_path).items[0]
    assert item.gold == 1 and "about elementary mathematics." in item.requests[0][0]


def test_limit(data):
    assert len(T.load_task("piqa", data, limit=1).items) == 1


class FakeDatasets:
    """Stands in for the `datasets` package: serves rows, or fails as it does offline."""

    def __init__(self, rows=None):
        self.rows, self.calls = rows, []

    def load_dataset(self, repo, config=None, split=None):
        self.calls.append((repo, config, split))
        if self.rows is None:
            raise ConnectionError(f"Couldn't reach '{repo}' on the Hub")
        return self.rows


def test_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets())  # offline
    with pytest.raises(T.TaskError, match="unknown task 'hellaswagg'"):
        T.load_task("hellaswagg", tmp_path)
    with pytest.raises(T.TaskError, match=r"put one of .*piqa/valid.jsonl.*baber/piqa.*Couldn't reach"):
        T.load_task("piqa", tmp_path)
    monkeypatch.delenv("MINITRON_DATA_DIR", raising=False)
    with pytest.raises(T.TaskError, match="--data-dir"):
        T.load_task("piqa")
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(T.TaskError, match="valid-labels.lst"):
        T.load_task("piqa", tmp_path)
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa/val.jsonl").write_text('{"text": "not copa"}\n')
    with pytest.raises(T.TaskError, match="does not look like the copa format"):
        T.load_task("copa", tmp_path)


def test_missing_file_fetched_with_datasets_once(tmp_path, monkeypatch):
    """No file in the data dir: the split lm-eval reads comes from the hub (online) and is kept as jsonl."""
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))
    rows = [{"question": "Which is a mammal?", "choices": {"text": ["cat", "trout"], "label": ["A", "B"]},
             "answerKey": "A", "id": "x1"},
            {"question": "Which is a fish?", "choices": {"text": ["dog", "trout"], "label": ["A", "B"]},
             "answerKey": "B", "id": "x2"}]
    fake = FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = T.load_task("arc_easy", tmp_path / "empty")
    assert fake.calls == [("allenai/ai2_arc", "ARC-Easy", "test")]
    assert task.source == str(tmp_path / "cache/tasks/arc/ARC-Easy-Test.jsonl")
    assert [i.gold for i in task.items] == [0, 1]
    assert task.items[0].requests[0] == ("Question: Which is a mammal?\nAnswer:", " cat")
    T.load_task("arc_easy", tmp_path / "empty")  # the second time from the cache, no download
    assert len(fake.calls) == 1


# ---------------------------------------------------------------- the real files (shared/data)
REAL = os.environ.get("MINITRON_DATA_DIR")
real = pytest.mark.skipif(not REAL or not Path(REAL, "piqa").is_dir(),
                          reason="set MINITRON_DATA_DIR to a folder laid out like shared/data to read the real files")

# counts from shared/data/SOURCES.md, and the first item's gold
REAL_COUNTS = {"hellaswag": (10042, 3), "piqa": (1838, 0), "winogrande": (1267, 1), "arc_easy": (2376, 0),
               "arc_challenge": (1172, 2), "boolq": (3270, 0), "openbookqa": (500, 1), "lambada": (5153, 0),
               "sciq": (1000, 3), "copa": (100, 1)}


@real
@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_files_parse(name):
    task = T.load_task(name)
    n, gold0 = REAL_COUNTS[name]
    assert len(task.items) == n
    assert task.items[0].gold == gold0
    for item in task.items:
        assert 0 <= item.gold < len(item.requests) and all(c and r[1].startswith(" ") for c, r in
                                                          zip(item.choices, item.requests, strict=True))


@real
def test_real_hellaswag_first_item():
    item = T.load_task("hellaswag", limit=1).items[0]
    assert item.requests[3] == ("Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof.")


def test_hellaswag_copa_winogrande_match_lm_eval_doc_functions(data):
    """Our requests equal those built by lm-eval's own helper functions (skipped without lm-eval)."""
    pytest.importorskip("lm_eval")
    import datasets
    from lm_eval.tasks.hellaswag import utils as hs
    from lm_eval.tasks.super_glue.copa import utils as cp
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    from eval_fixtures import HELLASWAG_ORIG

    docs = hs.process_docs(datasets.Dataset.from_list([dict(d, label=str(d["label"])) for d in HELLASWAG_ORIG]))
    for doc, item in zip(docs, T.load_task("hellaswag", data).items, strict=True):
        assert item.requests == [(doc["query"], " " + c) for c in doc["choices"]]
    for doc, item in zip(T._jsonl(data / "copa/val.jsonl"), T.load_task("copa", data).items, strict=True):
        assert item.requests == [(cp.doc_to_text(doc), " " + c) for c in cp.doc_to_choice(doc)]
    for doc, item in zip(T._jsonl(data / "winogrande/dev.jsonl"), T.load_task("winogrande", data).items, strict=True):
        assert item.requests == [(c, " " + wg.doc_to_target(doc)) for c in wg.doc_to_choice(doc)]
        assert item.gold == wg.doc_to_text(doc)
