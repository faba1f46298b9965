"""Token store: every source kind, uint16/uint32, resume after a failure, reuse, blends, rank slices across 2
gloo processes, bad input, and the same blocks as the old read_texts + pack path."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_text
from minitron.data import (
    DataError,
    corpus_blocks,
    encode_document,
    load_splits,
    pack,
    read_texts,
    shuffle_docs,
    split_blocks,
)
from minitron.data import blends as bl
from minitron.data import blocks as blk
from minitron.data import sources as sources
from minitron.data import store as st
from minitron.data.blocks import stream_blocks
from minitron.data.sources import Source
from minitron.data.store import StoreError, ensure_store, open_store

SRC = str(Path(__file__).resolve().parents[1] / "src")
USER_CACHE = os.environ.get("MINITRON_CACHE")
QUIET = dict(progress=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "cache"))  # stores of load_splits stay in the test


def texts(n=12, words=40, seed=0):
    return [make_text(words, seed=seed + i) for i in range(n)]


def stored_docs(store) -> list[list[int]]:
    return [store.document(d).tolist() for d in range(store.n_docs)]


def expect(tokenizer, docs):
    return [encode_document(tokenizer, d) for d in docs]


def test_text_folder_glob_and_same_blocks_as_pack(tmp_path, tokenizer):
    docs = texts(20)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (corpus / ("sub" if i % 2 else "") / f"d{i:02d}.txt").write_text(d)
    (corpus / "blank.txt").write_text("  \n")
    (corpus / "model.bin").write_bytes(b"\x00")
    s = ensure_store(str(corpus), tokenizer, tmp_path / "s", shard_docs=5, batch_docs=2, **QUIET)
    ordered = read_texts(str(corpus))
    assert len(ordered) == 20 and stored_docs(s) == expect(tokenizer, ordered)
    assert s.tokens.dtype == np.uint16 and s.meta["stats"]["empty_docs"] == 1
    for seed in (0, 3):
        assert torch.equal(stream_blocks(s, 16, seed), pack(shuffle_docs(ordered, seed), tokenizer, 16))
    assert torch.equal(stream_blocks(s, 16, 3, 7, 19), stream_blocks(s, 16, 3)[7:19])  # a slice reads the same
    assert torch.equal(corpus_blocks(str(corpus), tokenizer, 16, 9), pack(ordered, tokenizer, 16, 9))  # source order
    splits = load_splits(str(corpus), tokenizer, 16, 0.2, seed=1, max_blocks=30)
    old = split_blocks(pack(shuffle_docs(ordered, 1), tokenizer, 16, 30), 0.2, 1)
    assert torch.equal(splits.train, old.train) and torch.equal(splits.validation, old.validation)
    g = ensure_store(str(corpus / "**" / "d0*.txt"), tokenizer, tmp_path / "g", **QUIET)
    assert stored_docs(g) == expect(tokenizer, [docs[i] for i in (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)])  # path order


def test_table_formats_and_field(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = texts(6, seed=50)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:2])))
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs[2:4]]))
    pq.write_table(pa.table({"body": [docs[4], None]}), tmp_path / "c.parquet")
    table = pa.table({"body": [docs[5]]})
    with pa.ipc.new_stream(str(tmp_path / "d.arrow"), table.schema) as w:
        w.write_table(table)
    s = ensure_store(Source(str(tmp_path), field="body"), tokenizer, tmp_path.parent / "tf", **QUIET)
    assert stored_docs(s) == expect(tokenizer, docs) and s.meta["stats"]["empty_docs"] == 1  # the null row
    with pytest.raises(DataError, match="'text' field.*--field"):
        ensure_store(str(tmp_path / "a.jsonl"), tokenizer, tmp_path.parent / "tf2", **QUIET)
    with pytest.raises(DataError, match="no column 'text'.*--field"):
        ensure_store(str(tmp_path / "c.parquet"), tokenizer, tmp_path.parent / "tf3", **QUIET)


def test_saved_dataset_and_offline_hub(tmp_path, tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    docs = texts(5, seed=70)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs}),
                          "test": datasets.Dataset.from_dict({"content": docs[:2]})}).save_to_disk(tmp_path / "ds")
    s = ensure_store(Source(str(tmp_path / "ds"), field="content", split="test"), tokenizer, tmp_path / "s", **QUIET)
    assert stored_docs(s) == expect(tokenizer, docs[:2])
    with pytest.raises(DataError, match="splits.*'validation'.*--split"):
        ensure_store(Source(str(tmp_path / "ds"), field="content", split="validation"), tokenizer, tmp_path / "v",
                     **QUIET)
    with pytest.raises(DataError, match="no field 'text'.*--field"):
        ensure_store(Source(str(tmp_path / "ds")), tokenizer, tmp_path / "f", **QUIET)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="network is off"):
        ensure_store(Source("someone/no-such-dataset-xyz", config="c", streaming=True), tokenizer, tmp_path / "h",
                     **QUIET)


@pytest.mark.parametrize("name,n_files", [("python-docs", 100), ("general-en", 10), ("default", 10)])
def test_named_corpora_resolve(monkeypatch, name, n_files):
    from minitron.data.sources import named_corpus_dir

    if USER_CACHE is None:
        monkeypatch.delenv("MINITRON_CACHE")
    else:
        monkeypatch.setenv("MINITRON_CACHE", USER_CACHE)
    if not (named_corpus_dir(name) / ".complete").is_file():
        pytest.skip(f"the corpus {name} is not installed (scripts/setup.sh)")
    kind, files = sources.resolve(Source(name))
    assert kind == "files" and len(files) > n_files and all(p.is_relative_to(named_corpus_dir(name)) for p in files)


def test_uint32_and_dtype_choice(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(make_text(200))
    a = ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "a", **QUIET)
    b = ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "b", dtype="uint32", **QUIET)
    assert a.tokens.dtype == np.uint16 and b.tokens.dtype == np.uint32
    assert (tmp_path / "b" / "tokens.bin").stat().st_size == 2 * (tmp_path / "a" / "tokens.bin").stat().st_size
    assert torch.equal(stream_blocks(a, 8), stream_blocks(b, 8))
    assert st.token_dtype(65536) == "uint16" and st.token_dtype(65537) == "uint32" and st.token_dtype(151_936) == "uint32"


def test_resume_after_failure_and_reuse(tmp_path, tokenizer, monkeypatch):
    corpus = tmp_path / "c"
    corpus.mkdir()
    docs = texts(23, seed=90)
    for i, d in enumerate(docs):
        (corpus / f"{i:02d}.txt").write_text(d)
    clean = ensure_store(str(corpus), tokenizer, tmp_path / "clean", shard_docs=5, batch_docs=2, **QUIET)
    real, calls = st.encode_batch, []

    def dying(tok, batch, dtype):
        calls.append(len(batch))
        if len(calls) == 8:  # mid-way through shard 3 (shards of 5 documents, batches of 2)
            raise KeyboardInterrupt("killed")
        return real(tok, batch, dtype)

    monkeypatch.setattr(st, "encode_batch", dying)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        ensure_store(str(corpus), tokenizer, out, shard_docs=5, batch_docs=2, **QUIET)
    manifest = json.loads((tmp_path / "s.partial" / "manifest.json").read_text())
    assert not out.exists() and manifest["shards"] == 2 and manifest["docs_read"] == 10
    calls.clear()
    monkeypatch.setattr(st, "encode_batch", lambda *a: (calls.append(len(a[1])), real(*a))[1])
    s = ensure_store(str(corpus), tokenizer, out, shard_docs=5, batch_docs=2, **QUIET)
    assert sum(calls) == 13  # only the 13 documents after the 2 committed shards were tokenized again
    assert stored_docs(s) == stored_docs(clean) and not (tmp_path / "s.partial").exists()
    monkeypatch.setattr(st, "_build", lambda *a, **k: pytest.fail("a finished store was rebuilt"))
    again = ensure_store(str(corpus), tokenizer, out, **QUIET)
    assert again.meta["fingerprint"] == s.meta["fingerprint"]


def test_kill_subprocess_mid_write_then_resume(tmp_path, tokenizer):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(make_text(60, seed=i))
    tokenizer.save_pretrained(tmp_path / "tok")
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, sys\nfrom transformers import AutoTokenizer\nfrom minitron import store as st\n"
        "real, n = st.encode_batch, [0]\n"
        "def enc(*a):\n    n[0] += 1\n    if n[0] == 12: os.kill(os.getpid(), signal.SIGKILL)\n    return real(*a)\n"
        "st.encode_batch = enc\n"
        f"st.ensure_store({str(corpus)!r}, AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r}), "
        f"{str(tmp_path / 's')!r}, shard_docs=8, batch_docs=2, progress=False)\n")
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert json.loads((tmp_path / "s.partial" / "manifest.json").read_text())["shards"] == 2
    s = ensure_store(str(corpus), tokenizer, tmp_path / "s", shard_docs=8, batch_docs=2, **QUIET)
    assert stored_docs(s) == expect(tokenizer, read_texts(str(corpus)))


def test_parallel_workers_same_store(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    for i in range(15):
        (tmp_path / "c" / f"{i:02d}.txt").write_text(make_text(30, seed=200 + i))
    one = ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "one", batch_docs=2, **QUIET)
    two = ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "two", batch_docs=2, num_proc=2, **QUIET)
    assert np.array_equal(one.tokens, two.tokens) and np.array_equal(one.offsets, two.offsets)


def test_bad_input(tmp_path, tokenizer):
    c = tmp_path / "c"
    c.mkdir()
    (c / "good.txt").write_text(make_text(50, seed=1))
    (c / "bad.txt").write_bytes(make_text(20, seed=2).encode() + b"\xff\xfe tail")
    (c / "empty.jsonl").write_text("")
    (c / "rows.jsonl").write_bytes(json.dumps({"text": "ok row"}).encode() + b"\n" + b'{"text": "bad \xff"}\n')
    s = ensure_store(str(c), tokenizer, tmp_path / "replace", **QUIET)
    stats = s.meta["stats"]
    assert s.n_docs == 4 and stats["decode_errors"] == 2 and stats["empty_files"] == 1
    assert any("empty.jsonl" in e for e in stats["examples"]) and any("bad.txt" in e for e in stats["examples"])
    assert "\ufffd" in tokenizer.decode(s.document(0).tolist())  # bad.txt sorts first; kept with U+FFFD
    skip = ensure_store(str(c), tokenizer, tmp_path / "skip", errors="skip", **QUIET)
    assert skip.n_docs == 2 and skip.meta["stats"]["decode_skipped"] == 2
    with pytest.raises(DataError, match="bad.txt: bytes that are not UTF-8 at offset"):
        ensure_store(str(c), tokenizer, tmp_path / "strict", errors="strict", **QUIET)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "only.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no text"):
        ensure_store(str(tmp_path / "e"), tokenizer, tmp_path / "none", **QUIET)
    assert not (tmp_path / "none.partial").exists()
    with pytest.raises(DataError, match="does not exist"):
        ensure_store(str(tmp_path / "missing.jsonl"), tokenizer, tmp_path / "m", **QUIET)
    (tmp_path / "x.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="x.jsonl:1: not a JSON line"):
        ensure_store(str(tmp_path / "x.jsonl"), tokenizer, tmp_path / "x", **QUIET)


def test_other_tokenizer_refused(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(make_text(100))
    ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "s", **QUIET)
    tokenizer.save_pretrained(tmp_path / "tok")
    same = AutoTokenizer.from_pretrained(tmp_path / "tok")  # the same tokenizer loaded from elsewhere is accepted
    open_store(tmp_path / "s", same)
    other = AutoTokenizer.from_pretrained(tmp_path / "tok", bos_token="<|endoftext|>")
    other.add_tokens(["newtoken"])
    with pytest.raises(StoreError, match="made by another tokenizer"):
        open_store(tmp_path / "s", other)
    with pytest.raises(StoreError, match="made by another tokenizer"):
        ensure_store(str(tmp_path / "c"), other, tmp_path / "s", **QUIET)
    (tmp_path / "c" / "b.txt").write_text(make_text(10))
    with pytest.raises(StoreError, match="another source.*--overwrite"):
        ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "s", **QUIET)
    assert ensure_store(str(tmp_path / "c"), tokenizer, tmp_path / "s", overwrite=True, **QUIET).n_docs == 2


def test_blend_weights_and_seed(tmp_path, tokenizer):
    stores = []
    for name, seed in (("web", 300), ("code", 400)):
        (tmp_path / name).mkdir()
        for i in range(10):
            (tmp_path / name / f"{i}.txt").write_text(make_text(400, seed=seed + i))
        stores.append((name, ensure_store(str(tmp_path / name), tokenizer, tmp_path / f"s-{name}", **QUIET)))
    parts = [(stores[0][0], stores[0][1], 0.7), (stores[1][0], stores[1][1], 0.3)]
    a = bl.blend_blocks(parts, 8, seed=5, max_blocks=1000)
    b = bl.blend_blocks(parts, 8, seed=5, max_blocks=1000)
    c = bl.blend_blocks(parts, 8, seed=6, max_blocks=1000)
    assert a.blocks.shape == (1000, 8) and torch.equal(a.blocks, b.blocks) and not torch.equal(a.blocks, c.blocks)
    share = {d["source"]: d["share"] for d in a.drawn}
    assert abs(share["web"] - 0.7) < 0.05 and sum(d["blocks"] for d in a.drawn) == 1000
    web = {tuple(r) for r in stream_blocks(stores[0][1], 8, 5).tolist()}
    assert sum(tuple(r) in web for r in a.blocks.tolist()) == a.drawn[0]["blocks"]  # each block from its source
    bl.write_blend(a, tmp_path / "blend.json")
    assert json.loads((tmp_path / "blend.json").read_text())["sources"][1]["source"] == "code"
    full = bl.blend_blocks(parts, 8, seed=5)  # no cap: stops when a drawn source runs out
    assert any(d["blocks"] == d["available_blocks"] for d in full.drawn)

    spec = tmp_path / "mix.blend.yaml"  # a blend file is a corpus like any other (load_splits, every stage)
    spec.write_text("sources:\n  - {corpus: web, weight: 7}\n  - {corpus: code, weight: 3}\n")
    splits = load_splits(str(spec), tokenizer, 8, val_fraction=0.1, seed=5, max_blocks=1000)
    assert sorted(torch.cat([splits.train, splits.validation]).tolist()) == sorted(a.blocks.tolist())
    drawn = json.loads((tmp_path / "mix.blend.drawn.json").read_text())
    assert [d["blocks"] for d in drawn["sources"]] == [d["blocks"] for d in a.drawn] and drawn["blocks"] == 1000
    assert bl.blend_identity(spec)["blend"][1][1] == 3.0
    spec.write_text("sources:\n  - {corpus: web, wieght: 7}\n")
    with pytest.raises(DataError, match="unknown keys"):
        load_splits(str(spec), tokenizer, 8)


RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from transformers import AutoTokenizer
from minitron.data.store import ensure_store
from minitron.data.blocks import rank_blocks
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
s = ensure_store(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), sys.argv[3], progress=False)
mine = rank_blocks(s, 16, rank, world, seed=2, max_blocks=int(sys.argv[4]))
got = [None] * world
dist.all_gather_object(got, mine.tolist())
if rank == 0:
    json.dump(got, open(sys.argv[5], "w"))
dist.destroy_process_group()
"""


def test_rank_slices_two_gloo_processes(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    for i in range(12):
        (tmp_path / "c" / f"{i}.txt").write_text(make_text(80, seed=500 + i))
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "r.py").write_text(RANK_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, str(tmp_path / "r.py"), str(tmp_path / "c"), str(tmp_path / "tok"),
                           str(tmp_path / "s"), "41", str(tmp_path / "got.json")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("tokenizing") == 1  # one process tokenized, the other waited
    got = json.loads((tmp_path / "got.json").read_text())
    assert [len(g) for g in got] == [21, 20]
    full = stream_blocks(open_store(tmp_path / "s"), 16, 2, 0, 41).tolist()
    assert got[0] + got[1] == full  # disjoint, and together exactly the first 41 blocks
    assert blk.rank_range(5, 1, 2) == (3, 5) and blk.rank_range(1, 1, 2) == (1, 1)


def test_cli_data(tmp_path, tokenizer, capsys):
    from minitron.cli import main

    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in texts(4, seed=600)))
    args = ["data", str(tmp_path / "rows.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s")]
    assert main([*args, "--field", "body", "--num-proc", "2"]) == 0
    assert "4 documents" in capsys.readouterr().out and open_store(tmp_path / "s", tokenizer).n_docs == 4
    assert main([*args, "--field", "content", "--out", str(tmp_path / "s2")]) == 2
    assert "rows need a 'content' field" in capsys.readouterr().err


def test_run_records_a_blend_by_its_sources(tmp_path):
    from minitron.pipeline.stages import DataSection, RunConfig, _corpus

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.txt").write_text(make_text(20))
    spec = tmp_path / "m.blend.yaml"
    spec.write_text("sources:\n  - {corpus: a, weight: 1}\n  - {corpus: b, weight: 2}\n")
    cfg = RunConfig(data=DataSection(corpus=str(spec)))
    before = _corpus(cfg)
    (tmp_path / "b" / "y.txt").write_text(make_text(20))  # a source changed, the blend file did not
    assert _corpus(cfg) != before and _corpus(cfg)["blend"][0] == before["blend"][0]


def test_lazy_splits_read_the_same_blocks(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    for i in range(10):
        (tmp_path / "c" / f"{i}.txt").write_text(make_text(120, seed=700 + i))
    eager = load_splits(str(tmp_path / "c"), tokenizer, 16, 0.1, seed=4, max_blocks=150)
    lazy = load_splits(str(tmp_path / "c"), tokenizer, 16, 0.1, seed=4, max_blocks=150, lazy=True)
    assert isinstance(lazy.train, blk.BlockView) and lazy.train.shape == eager.train.shape
    assert torch.equal(lazy.validation[:], eager.validation)
    idx = torch.tensor([5, 0, 77, 134])
    assert torch.equal(lazy.train[idx], eager.train[idx]) and torch.equal(lazy.train[3], eager.train[3])
    assert torch.equal(lazy.train[:], eager.train)


def test_hub_dataset_config_split_streaming(tmp_path, tokenizer, monkeypatch):
    """The hub path passes name, config, split and streaming to datasets.load_dataset and reads the rows it
    streams (load_dataset stubbed with a local IterableDataset: the suite never reaches the network)."""
    datasets = pytest.importorskip("datasets")
    docs, seen = texts(4, seed=800), {}

    def fake_load(name, config=None, split=None, streaming=False):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        ds = datasets.Dataset.from_dict({"text": docs, "id": list(range(4))})
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    s = ensure_store(Source("org/corpus", config="en", split="validation", streaming=True), tokenizer,
                     tmp_path / "s", **QUIET)
    assert seen == {"name": "org/corpus", "config": "en", "split": "validation", "streaming": True}
    assert stored_docs(s) == expect(tokenizer, docs) and s.meta["source"]["dataset"] == "org/corpus"
    ensure_store(Source("org/corpus:test"), tokenizer, tmp_path / "t", **QUIET)  # name:split
    assert seen["split"] == "test" and seen["streaming"] is False


def test_report_shows_the_blend_drawn(tmp_path, tokenizer):
    """distill on a blend corpus records the blend drawn in its folder; report.md shows each source's weight asked
    and the blocks and tokens drawn."""
    from conftest import distill_pair, make_model
    from minitron.eval.report import write_report

    for name, seed in (("web", 900), ("code", 950)):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(make_text(150, seed=seed + i))
    spec = tmp_path / "mix.blend.yaml"
    spec.write_text("sources:\n  - {corpus: web, weight: 3}\n  - {corpus: code, weight: 1}\n")
    run = tmp_path / "run"
    out, _ = distill_pair(make_model("llama"), make_model("llama", seed=1, layers=2), tokenizer, spec, run, steps=1)
    drawn = json.loads((out / "blend_drawn.json").read_text())
    assert [d["weight"] for d in drawn["sources"]] == [0.75, 0.25]
    assert sum(d["blocks"] for d in drawn["sources"]) == drawn["blocks"] > 0
    (run / "config.yaml").write_text(f"data:\n  corpus: {spec}\n")
    shutil.move(str(out), str(run / "distill"))
    report = write_report(run).read_text()
    assert "## Data blend drawn (distill)" in report
    for d in drawn["sources"]:
        assert (f"| `{d['source']}` | {d['weight']:.1%} | {d['blocks']:,} | {d['share']:.1%} | {d['tokens']:,} |"
                in report)


def test_recipe_inline_blend_is_the_blend_file(tmp_path, tokenizer, monkeypatch):
    """data.blend in a recipe (sources with weights inline) becomes the same blend a blend file gives: the same
    sources and weights, the same blocks; data.corpus and data.blend together are refused; keys are checked."""
    from minitron.pipeline import RunConfig
    from minitron.pipeline.config import ConfigError, load_config, save_config

    for name, seed in (("web", 1000), ("code", 1050)):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(make_text(60, seed=seed + i))
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: {params: 1M}\ndata:\n  blend:\n    - {corpus: web, weight: 7}\n"
                      "    - {corpus: code, weight: 3, field: text}\n")
    cfg = load_config(RunConfig, recipe)
    spec = tmp_path / "mix.blend.yaml"
    spec.write_text("sources:\n  - {corpus: web, weight: 7}\n  - {corpus: code, weight: 3}\n")
    assert bl.is_blend(cfg.data.corpus) and bl.read_blend(cfg.data.corpus) == bl.read_blend(spec)
    a = load_splits(cfg.data.corpus, tokenizer, 8, 0.1, seed=2, max_blocks=200)
    b = load_splits(str(spec), tokenizer, 8, 0.1, seed=2, max_blocks=200)
    assert torch.equal(a.train, b.train) and torch.equal(a.validation, b.validation) and a.blend == b.blend
    save_config(cfg, tmp_path / "saved.yaml")  # the resolved recipe loads back to the same corpus
    assert load_config(RunConfig, tmp_path / "saved.yaml").data.corpus == cfg.data.corpus
    with pytest.raises(DataError, match="both data.corpus"):
        load_config(RunConfig, recipe, ["data.corpus=web"])
    recipe.write_text("target: {params: 1M}\ndata:\n  blend:\n    - {corpus: web, wieght: 7}\n")
    with pytest.raises(ConfigError, match="wieght"):
        load_config(RunConfig, recipe)


def test_prune_and_eval_loss_read_only_their_budget(tmp_path, tokenizer, monkeypatch):
    """`minitron prune` reads calib_samples + 2 x heldout_samples blocks of the store and eval's loss:<corpus> its
    limit, not every block of the corpus (lazy BlockView slices; the same blocks as the eager split)."""
    from conftest import make_model
    from minitron.data import report_blocks, selection_blocks
    from minitron.eval.harness import heldout_loss
    from minitron.prune import PruneConfig, prune
    from minitron.prune.plan import Target

    (tmp_path / "c").mkdir()
    for i in range(8):
        (tmp_path / "c" / f"{i}.txt").write_text(make_text(150, seed=1100 + i))
    corpus = str(tmp_path / "c")
    eager = load_splits(corpus, tokenizer, 16, seed=0)
    lazy = load_splits(corpus, tokenizer, 16, seed=0, lazy=True)
    assert eager.train.shape[0] + eager.validation.shape[0] > 300
    assert torch.equal(selection_blocks(lazy.validation, 3), selection_blocks(eager.validation, 3))
    assert torch.equal(report_blocks(lazy.validation, 3), report_blocks(eager.validation, 3))
    read = []
    real = blk.stream_blocks
    monkeypatch.setattr(blk, "stream_blocks", lambda *a, **k: read.append(real(*a, **k).shape[0]) or real(*a, **k))
    model = make_model("llama")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    prune(PruneConfig(model=str(tmp_path / "m"), out=str(tmp_path / "p"), calib_data=corpus, calib_samples=6,
                      heldout_samples=2, seq_len=16, batch_size=4, target=Target(ffn=64)))
    assert sum(read) == 6 + 2 + 2
    read.clear()
    out = heldout_loss(model, tokenizer, corpus, 16, limit=3)
    assert out["blocks"] == 3 and sum(read) == 3


def _teacher(tmp_path, tokenizer):
    from conftest import make_model

    teacher = tmp_path / "teacher"
    make_model("llama").save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return teacher


def _text_folder(tmp_path, n=8, words=300):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(n):
        (corpus / f"{i}.txt").write_text(make_text(words, seed=900 + i))
    return corpus


def test_store_by_path_wherever_a_corpus_is_taken(tmp_path, tokenizer, capsys):
    """`minitron data corpus --out store`, then the store's path as the corpus of `prune --calib-data`,
    `distill --data / --heldout` and `eval --tasks loss:<store>` (any seq_len: the store keeps documents, blocks
    are cut when read): it is opened as a store (no second store, no lock, never read as a .json source), gives the
    same blocks as its corpus, and is identified by its fingerprint. A store of another tokenizer is refused with
    the command that makes the right one."""
    from transformers import AutoTokenizer

    from minitron.cli import main
    from minitron.data.fingerprint import corpus_identity

    teacher, corpus, store = _teacher(tmp_path, tokenizer), _text_folder(tmp_path), tmp_path / "store"
    assert main(["data", str(corpus), "--tokenizer", str(teacher), "--out", str(store)]) == 0
    capsys.readouterr()
    (tmp_path / ".store.lock").unlink()  # the builder's lock
    tokens = tmp_path / "cache" / "tokens"
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(teacher), "--calib-data", str(store), "--calib-samples", "8", "--seq-len",
                 "32", "--hidden", "48", "--device", "cpu", "--out", str(pruned)]) == 0, capsys.readouterr().err
    kd = tmp_path / "kd"
    assert main(["distill", "--teacher", str(teacher), "--student", str(pruned), "--data", str(store), "--heldout",
                 str(store), "--out", str(kd), "--steps", "2", "--seq-len", "16", "--batch-size", "2",
                 "--eval-batches", "1", "--eval-every", "0", "--save-every", "0", "--device", "cpu",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert (kd / "minitron_distill.json").is_file()
    assert main(["eval", "--model", str(pruned), "--tasks", f"loss:{store}", "--limit", "2", "--seq-len", "16",
                 "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0, capsys.readouterr().err
    assert "tokenizing" not in capsys.readouterr().out and not tokens.exists()  # the store itself, read as it is
    assert not list(tmp_path.glob(".store.lock"))  # read only: a store on a shared disk needs no lock
    for seq_len in (16, 32):
        a, b = load_splits(str(store), tokenizer, seq_len), load_splits(str(corpus), tokenizer, seq_len)
        assert torch.equal(a.train, b.train) and torch.equal(a.validation, b.validation)
    ident = corpus_identity(str(store))
    assert ident["store"] == json.loads((store / "meta.json").read_text())["fingerprint"]
    assert sources.source_identity(Source(str(store)))["store"] == ident["store"]
    from minitron.pipeline.stages import DataSection, RunConfig, _corpus

    assert _corpus(RunConfig(data=DataSection(corpus=str(store))))["store"] == ident["store"]  # a recipe's data.corpus
    spec = tmp_path / "mix.blend.yaml"  # a blend entry
    spec.write_text("sources:\n  - {corpus: store, weight: 1}\n  - {corpus: corpus, weight: 1}\n")
    assert bl.blend_identity(spec)["blend"][0][0]["store"] == ident["store"]
    assert load_splits(str(spec), tokenizer, 16, max_blocks=40).train.shape == (38, 16)

    # made by another tokenizer: refused, naming the store, both tokenizers and the command that makes the right one
    tokenizer.save_pretrained(tmp_path / "tok")
    other = AutoTokenizer.from_pretrained(tmp_path / "tok", bos_token="<|endoftext|>")
    other.add_tokens(["newtoken"])
    other.save_pretrained(tmp_path / "other-tok")
    assert main(["data", str(corpus), "--tokenizer", str(tmp_path / "other-tok"), "--out", str(tmp_path / "s2")]) == 0
    capsys.readouterr()
    assert main(["prune", "--model", str(teacher), "--calib-data", str(tmp_path / "s2"), "--calib-samples", "8",
                 "--seq-len", "32", "--hidden", "48", "--device", "cpu", "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    assert "made by another tokenizer" in err and f"minitron data {corpus} --tokenizer {teacher}" in err
    with pytest.raises(StoreError, match="made by another tokenizer"):
        load_splits(str(tmp_path / "s2"), tokenizer, 16)
    # a store is not a source to tokenize again
    assert main(["data", str(store), "--tokenizer", str(teacher), "--out", str(tmp_path / "s3")]) == 2
    assert "already a token store" in capsys.readouterr().err
    assert main(["data", str(store), "--tokenizer", str(teacher)]) == 0  # itself: opened and checked
    with pytest.raises(DataError, match="token store"):
        read_texts(str(store))


STORE_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from transformers import AutoTokenizer
from minitron.data import load_splits
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
splits = load_splits(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), 16, lazy=True)
got = [None] * world
dist.all_gather_object(got, splits.validation[:].tolist())
if rank == 0:
    json.dump(got, open(sys.argv[3], "w"))
dist.destroy_process_group()
"""


def test_store_by_path_two_gloo_ranks(tmp_path, tokenizer):
    """Tokenized once, every torchrun rank pointed at the store: each reads it as it is (nothing tokenized, no
    lock taken beside it) and all see the same blocks."""
    corpus, store = _text_folder(tmp_path, n=6, words=120), tmp_path / "shared" / "store"
    ensure_store(str(corpus), tokenizer, store, **QUIET)
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "r.py").write_text(STORE_RANK_SCRIPT)
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    before = sorted(p.name for p in store.parent.iterdir())
    proc = subprocess.run([*torchrun, str(tmp_path / "r.py"), str(store), str(tmp_path / "tok"),
                           str(tmp_path / "got.json")], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
                               "MINITRON_CACHE": str(tmp_path / "rank-cache")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tokenizing" not in proc.stdout + proc.stderr and not (tmp_path / "rank-cache" / "tokens").exists()
    assert sorted(p.name for p in store.parent.iterdir()) == before
    got = json.loads((tmp_path / "got.json").read_text())
    assert got[0] == got[1] == load_splits(str(corpus), tokenizer, 16).validation.tolist()
