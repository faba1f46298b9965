import json

import pytest
import torch

from conftest import make_text
from minitron.data import DataError, calibration_sample, load_splits, pack, read_texts, split_blocks


def test_read_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.rst.txt").write_text("reST source")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert read_texts(str(tmp_path)) == ["plain text", "row one", "row two", "reST source"]
    assert read_texts(str(tmp_path / "b.jsonl")) == ["row one", "row two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="'text' field"):
        read_texts(str(tmp_path / "bad.jsonl"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first", "", "second"]}), tmp_path / "d.parquet")
    assert read_texts(str(tmp_path / "d.parquet")) == ["first", "second"]


def test_data_dir_lookup(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").write_text(" = Title = \n text \n")
    monkeypatch.setenv("MINITRON_DATA_DIR", str(tmp_path))
    assert read_texts("wikitext-2-raw/wiki.valid.raw") == [" = Title = \n text \n"]
    monkeypatch.delenv("MINITRON_DATA_DIR")
    assert read_texts("wikitext-2-raw/wiki.valid.raw", data_root=tmp_path)


def test_pack_split_calibration(tokenizer):
    docs = [make_text(50, seed=i) for i in range(6)]
    blocks = pack(docs, tokenizer, 16)
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    assert blocks.shape[1] == 16 and blocks.flatten().tolist() == ids[: blocks.numel()]
    assert pack(docs, tokenizer, 16, max_blocks=3).shape == (3, 16)
    a, b = split_blocks(blocks, 0.1, seed=1), split_blocks(blocks, 0.1, seed=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.validation, b.validation)
    assert len(a.train) + len(a.validation) == len(blocks)
    train_rows = {tuple(r) for r in a.train.tolist()}
    assert not any(tuple(r) in train_rows for r in a.validation.tolist())
    c = calibration_sample(a.train, 5, seed=2)
    assert c.shape == (5, 16) and torch.equal(c, calibration_sample(a.train, 5, seed=2))
    with pytest.raises(DataError, match="calibration needs"):
        calibration_sample(a.train, 10_000)


def test_corpus_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="do not fill one block"):
        pack(["tiny"], tokenizer, 64)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        read_texts(str(tmp_path))
    with pytest.raises(DataError, match="validation blocks"):
        split_blocks(torch.zeros(1, 8, dtype=torch.long))
    (tmp_path / "e.txt").write_text(make_text(3))
    with pytest.raises(DataError, match="do not fill one block"):
        load_splits(str(tmp_path), tokenizer, 4096)


def test_max_blocks_samples_documents_and_validation_holds_out_documents(tmp_path, tokenizer):
    n_docs = 30
    for i in range(n_docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(make_text(12, seed=100 + i))
    doc_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in read_texts(str(tmp_path))]

    def doc_of(block: list[int]) -> int:  # the document a block starts in (its first 6 tokens)
        head = block[:6]
        hits = [i for i, ids in enumerate(doc_ids) if any(ids[j:j + 6] == head for j in range(len(ids) - 5))]
        return hits[0] if hits else -1

    s = load_splits(str(tmp_path), tokenizer, 16, val_fraction=0.25, seed=0, max_blocks=40)
    train_docs = {doc_of(b) for b in s.train.tolist()} - {-1}
    val_docs = {doc_of(b) for b in s.validation.tolist()} - {-1}
    used = train_docs | val_docs
    assert max(used) > len(used) + 2  # a sample across the folder, not its first files in sorted order
    assert len(train_docs & val_docs) <= 1  # whole documents held out (one may straddle the boundary)
    again = load_splits(str(tmp_path), tokenizer, 16, val_fraction=0.25, seed=0, max_blocks=40)
    assert torch.equal(s.validation, again.validation) and torch.equal(s.train, again.train)
    other = load_splits(str(tmp_path), tokenizer, 16, val_fraction=0.25, seed=1, max_blocks=40)
    assert not torch.equal(s.validation, other.validation)


def _bos_tokenizer():
    """The tiny tokenizer with a post-processor that puts <bos> before every encoded text (as Llama-3 does)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from conftest import make_tokenizer

    backend = make_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_packing_adds_bos_where_the_tokenizer_does(tokenizer, tmp_path):
    docs = ["first document here.", "second one."]
    plain = pack(docs, tokenizer, 2).flatten().tolist()
    eos = tokenizer.eos_token_id
    expected = [*tokenizer(docs[0], add_special_tokens=False)["input_ids"], eos,
                *tokenizer(docs[1], add_special_tokens=False)["input_ids"], eos]
    assert plain == expected[: len(plain)] and tokenizer.bos_token_id is None  # no BOS: none added
    bos_tok = _bos_tokenizer()
    bos = bos_tok.bos_token_id
    with_bos = pack(docs, bos_tok, 2).flatten().tolist()
    first = bos_tok(docs[0])["input_ids"]
    assert first[0] == bos
    expected = [*first, eos, *bos_tok(docs[1])["input_ids"], eos]
    assert with_bos == expected[: len(with_bos)] and with_bos.count(bos) == 2  # one BOS per document
    # calibration and held-out blocks come from the same packing: one BOS per document there too
    for i in range(6):
        (tmp_path / f"d{i}.txt").write_text(make_text(20, seed=i))
    splits = load_splits(str(tmp_path), bos_tok, 16, val_fraction=0.3)
    blocks = torch.cat([splits.train, splits.validation])  # [N, T]
    assert int((blocks == bos).sum()) == 6 and int((blocks == eos).sum()) >= 5
    assert int((load_splits(str(tmp_path), tokenizer, 16, val_fraction=0.3).train == bos).sum()) == 0


def test_selection_and_report_blocks_are_disjoint():
    from minitron.data import report_blocks, selection_blocks

    val = torch.arange(20).view(10, 2)  # [N, T]
    sel, rep = selection_blocks(val, 3), report_blocks(val, 3)
    assert sel[:, 0].tolist() == [0, 2, 4] and rep[:, 0].tolist() == [10, 12, 14]
    assert len(selection_blocks(val, 100)) + len(report_blocks(val, 100)) == 10
    with pytest.raises(DataError, match="at least 2 disjoint"):
        selection_blocks(val[:1], 4)
