"""Token store: a corpus tokenized once into a memory-mapped token file + document index, reused by every stage.

A store is a folder:
    tokens.bin    every document's token ids back to back (uint16 when the vocabulary fits, else uint32)
    offsets.npy   int64 [D + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json     dtype, counts, the source and tokenizer identities, their fingerprint, skipped-input counts

Documents are tokenized as `minitron.data.encode_document` does (the tokenizer's own call, so BOS where it
adds one; EOS after each document), in batches with the fast tokenizer, in `num_proc` worker processes,
streamed to disk: memory does not grow with the corpus. The folder is written as `<out>.partial` and
renamed at the end; the partial folder commits a shard of `shard_docs` source documents at a time
(manifest.json), so a build that was killed resumes at its last committed shard. A file lock lets one
process per machine build while the others (e.g. torchrun ranks) wait and then read.

Readers cut blocks [N, T] out of the seeded document order (`stream_blocks`), the same blocks as
`data.pack(data.shuffle_docs(docs, seed), ...)`, without reading the documents they do not need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from minitron.data import TEXT_SUFFIXES, DataError
from minitron.fingerprint import _stat, digest

log = logging.getLogger(__name__)

FORMAT = 1
TABLE_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow"}
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # a datasets.save_to_disk folder


class StoreError(DataError):
    """A store that cannot be used as asked (another tokenizer, another source, a broken folder)."""


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


@dataclass
class Store:
    """An opened store: tokens [n_tokens] (memory-mapped) and offsets [n_docs + 1]."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]


# ----------------------------------------------------------------------------------------------------- sources
def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _file_kind(p: Path) -> bool:
    return (p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES or p.name.endswith(".rst.txt")) and not p.name.startswith(".")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS)


def resolve(source: Source, data_root: str | os.PathLike | None = None) -> tuple[str, object]:
    """-> ("files", [Path, ...]) | ("saved", Path) | ("hub", name). Raises DataError for a missing path."""
    from minitron.data import resolve_source

    if _is_glob(source.path):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source.path), recursive=True))
        files = [p for p in files if p.is_file() and _file_kind(p)]
        if not files:
            raise DataError(f"the glob {source.path!r} matches no text/jsonl/json/parquet/arrow file")
        return "files", files
    path = resolve_source(source.path, data_root)
    if isinstance(path, str):
        return "hub", path
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
    if kind == "hub":
        return {**ident, "dataset": where, "config": source.config, "split": source.split}
    files = sorted(p for p in Path(where).rglob("*") if p.is_file()) if kind == "saved" else where
    root = Path(where) if kind == "saved" else None
    listing = [[str(p.relative_to(root)) if root else str(p), *_stat(p)] for p in files]
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


# ----------------------------------------------------------------------------------------------- tokenizing
def tokenizer_identity(tokenizer) -> dict:
    """The tokenizer by content (vocabulary, merges, normalizer, special tokens, whether it adds BOS), not by
    path: the same tokenizer saved elsewhere matches."""
    if getattr(tokenizer, "is_fast", False):
        body = tokenizer.backend_tokenizer.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab": len(tokenizer),
            "digest": digest([type(tokenizer).__name__, body, tokenizer.bos_token_id, tokenizer.eos_token_id,
                              list(tokenizer("a b")["input_ids"])])}


def load_tokenizer(name: str):
    """A tokenizer dir (tokenizer.json, no model), or the tokenizer of a model name/dir (models.load_tokenizer)."""
    from minitron import models

    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    return models.load_tokenizer(name)


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits in 16 bits, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_batch(tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (tokens [sum of lengths] in `dtype`, lengths [len(texts)] int64), each document as
    data.encode_document makes it (BOS where the tokenizer adds one, EOS at the end)."""
    if not texts:
        return np.zeros(0, dtype), np.zeros(0, np.int64)
    if getattr(tokenizer, "is_fast", False):  # the backend call __call__ makes, without offsets: ~20% faster
        ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
    else:
        ids = tokenizer(texts)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None:
        for row in ids:
            if not row or row[-1] != eos:
                row.append(eos)
    lengths = np.fromiter((len(r) for r in ids), np.int64, len(ids))
    flat = np.concatenate([np.asarray(r, dtype) for r in ids])
    return flat, lengths


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _work(texts: list[str], dtype: str):
    return encode_batch(_WORKER_TOKENIZER, texts, dtype)


COUNTED = ("empty_docs", "empty_files", "decode_errors", "decode_skipped")


BATCH_CHARS = 1 << 20  # a batch also ends at ~1M characters (~250k tokens): long documents keep workers busy


def _batches(docs: Iterator, stats: Stats, start_doc: int, shard_docs: int, batch_docs: int):
    """Raw documents from index start_doc -> (shard, last_of_shard, texts, counts) per batch of at most
    batch_docs documents or ~BATCH_CHARS characters; counts: the documents read and what `stats` gained
    (blank, undecodable, empty files) while reading them."""
    shard, in_shard, texts, n_read, chars = start_doc // shard_docs, 0, [], 0, 0
    seen = {k: getattr(stats, k) for k in COUNTED}

    def counts() -> dict:
        nonlocal seen
        now = {k: getattr(stats, k) for k in COUNTED}
        delta = {k: now[k] - seen[k] for k in COUNTED}
        seen = now
        return {"read": n_read, **delta}

    for doc in docs:
        n_read += 1
        in_shard += 1
        if doc is None:
            pass  # dropped for its bytes (counted by _decode)
        elif not isinstance(doc, str) or not doc.strip():
            stats.empty_docs += 1
        else:
            texts.append(doc)
            chars += len(doc)
        if in_shard == shard_docs:
            yield shard, True, texts, counts()
            shard, in_shard, texts, n_read, chars = shard + 1, 0, [], 0, 0
        elif len(texts) >= batch_docs or chars >= BATCH_CHARS:
            yield shard, False, texts, counts()
            texts, n_read, chars = [], 0, 0
    if in_shard:
        yield shard, True, texts, counts()


# ------------------------------------------------------------------------------------------------- building
def _fingerprint(src_id: dict, tok_id: dict, dtype: str, errors: str) -> str:
    return digest({"format": FORMAT, "source": src_id, "tokenizer": {k: tok_id[k] for k in ("vocab", "digest")},
                   "dtype": dtype, "errors": errors})


@contextlib.contextmanager
def _lock(out: Path):
    """An exclusive lock on `<out>.lock`: one builder per store; others wait, then find it built."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _build(source: Source, tokenizer, out: Path, fp: str, ident: dict, dtype: str, errors: str, num_proc: int,
           batch_docs: int, shard_docs: int, data_root, progress: bool) -> None:
    """Tokenize into `<out>.partial` shard by shard (resuming a committed prefix), then rename to `out`."""
    from tqdm.auto import tqdm

    part = out.parent / (out.name + ".partial")
    manifest_path = part / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is None or manifest.get("fingerprint") != fp:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        manifest = {"fingerprint": fp, "shards": 0, "docs_read": 0, "tokens": 0, "docs": 0, "stats": asdict(Stats())}
        _write_json(manifest_path, manifest)
    elif manifest["shards"]:
        print(f"[minitron] resuming the token store {out} after {manifest['docs_read']} documents "
              f"({manifest['tokens']} tokens)")
    itemsize = np.dtype(dtype).itemsize
    stats = Stats(**manifest["stats"])
    with open(part / "tokens.bin", "ab") as tf, open(part / "lengths.bin", "ab") as lf:
        tf.truncate(manifest["tokens"] * itemsize)  # drop what was written after the last commit
        lf.truncate(manifest["docs"] * 8)
        tf.seek(0, os.SEEK_END)
        lf.seek(0, os.SEEK_END)
        read_stats = Stats()
        docs = iter_documents(source, data_root, errors, read_stats)
        for _ in range(manifest["docs_read"]):  # committed shards: read past, do not tokenize again
            next(docs, None)
        pool = None
        if num_proc > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
        pending: deque = deque()
        bar = tqdm(desc="tokenize", unit="doc", disable=not progress, initial=manifest["docs_read"])
        shard_counts = {k: 0 for k in ("read", *COUNTED)}

        def drain(n_left: int) -> None:
            while len(pending) > n_left:
                shard, last, counts, res = pending.popleft()
                flat, lengths = res.get() if pool is not None else res
                tf.write(flat.tobytes())
                lf.write(lengths.tobytes())
                manifest["tokens"] += int(flat.size)
                manifest["docs"] += int(lengths.size)
                for k, v in counts.items():
                    shard_counts[k] += v
                bar.update(counts["read"])
                if last:  # commit: data on disk first, then the manifest that points past it
                    tf.flush()
                    lf.flush()
                    os.fsync(tf.fileno())
                    os.fsync(lf.fileno())
                    manifest["shards"] = shard + 1
                    manifest["docs_read"] += shard_counts.pop("read")
                    done = Stats(**manifest["stats"])
                    done.add({**shard_counts, "examples": read_stats.examples})
                    read_stats.examples = []
                    manifest["stats"] = asdict(done)
                    shard_counts.update({k: 0 for k in ("read", *COUNTED)})
                    _write_json(manifest_path, manifest)

        try:
            for shard, last, texts, counts in _batches(docs, read_stats, manifest["docs_read"], shard_docs,
                                                        batch_docs):
                res = pool.apply_async(_work, (texts, dtype)) if pool is not None else encode_batch(tokenizer, texts, dtype)
                pending.append((shard, last, counts, res))
                drain(2 * num_proc if pool is not None else 0)  # bounded: at most 2 batches per worker in flight
            drain(0)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
    stats = Stats(**manifest["stats"])
    stats.docs, stats.tokens = manifest["docs"], manifest["tokens"]
    if stats.docs == 0:
        shutil.rmtree(part, ignore_errors=True)
        raise DataError(f"corpus {source.path!r} holds no text ({stats.empty_docs} blank documents, "
                        f"{stats.empty_files} empty files); point it at text, jsonl, json, parquet or arrow data")
    lengths = np.fromfile(part / "lengths.bin", dtype=np.int64)
    offsets = np.lib.format.open_memmap(part / "offsets.npy", mode="w+", dtype=np.int64, shape=(len(lengths) + 1,))
    offsets[0] = 0
    np.cumsum(lengths, out=offsets[1:])
    offsets.flush()
    del offsets, lengths
    (part / "lengths.bin").unlink()
    meta = {"format": FORMAT, "fingerprint": fp, "dtype": dtype, "n_docs": stats.docs, "n_tokens": stats.tokens,
            **ident, "errors": errors, "stats": asdict(stats)}
    _write_json(part / "meta.json", meta)
    manifest_path.unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    skipped = {k: v for k, v in asdict(stats).items() if k not in ("docs", "tokens", "examples") and v}
    if skipped:
        eg = f", e.g. {', '.join(stats.examples)}" if stats.examples else ""
        log.warning("token store %s: skipped or repaired %s%s", out, skipped, eg)


def open_store(path: str | os.PathLike, tokenizer=None) -> Store:
    """Open a finished store; with `tokenizer`, refuse one made by another tokenizer."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        hint = " (a build was interrupted: rerun the same command to resume it)" if \
            (path.parent / (path.name + ".partial")).is_dir() else ""
        raise StoreError(f"{path} is not a token store (no meta.json){hint}; make one with `minitron data SOURCE "
                         f"--out {path}`")
    meta = json.loads((path / "meta.json").read_text())
    if tokenizer is not None:
        mine = tokenizer_identity(tokenizer)
        if mine["digest"] != meta["tokenizer"]["digest"]:
            raise StoreError(f"the token store {path} was made by another tokenizer ({meta['tokenizer']['name']!r}, "
                             f"vocab {meta['tokenizer']['vocab']}) than this one ({mine['name']!r}, vocab "
                             f"{mine['vocab']}); its ids would be wrong for this model. Build a store for this "
                             "tokenizer (another --out), or pass --overwrite")
    tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r") if meta["n_tokens"] else np.zeros(0)
    return Store(path, tokens, np.load(path / "offsets.npy", mmap_mode="r"), meta)


def default_store_dir(fp: str) -> Path:
    """Where `run` and the stages keep stores: the cache ($MINITRON_CACHE/tokens/<fingerprint>)."""
    from minitron.models import cache_dir

    return cache_dir() / "tokens" / fp[:24]


def ensure_store(source: Source | str, tokenizer, out: str | os.PathLike | None = None, *, data_root=None,
                 num_proc: int = 1, batch_docs: int = 256, shard_docs: int = 4096, dtype: str | None = None,
                 errors: str = "replace", overwrite: bool = False, progress: bool = True) -> Store:
    """The store of `source` tokenized by `tokenizer`: reused when one with the same fingerprint exists, else
    built (or resumed). `out` None: in the cache, keyed by the fingerprint. An `out` holding a store of
    another tokenizer or source is refused unless `overwrite`."""
    source = Source(source) if isinstance(source, str) else source
    if errors not in ("replace", "skip", "strict"):
        raise DataError(f"errors must be replace, skip or strict, not {errors!r}")
    dtype = dtype or token_dtype(len(tokenizer))
    if np.iinfo(dtype).max < len(tokenizer) - 1:
        raise DataError(f"{dtype} cannot hold ids of a vocabulary of {len(tokenizer)}; use uint32")
    ident = {"source": source_identity(source, data_root), "tokenizer": tokenizer_identity(tokenizer)}
    fp = _fingerprint(ident["source"], ident["tokenizer"], dtype, errors)
    out = Path(out) if out is not None else default_store_dir(fp)
    with _lock(out):
        if (out / "meta.json").is_file():
            meta = json.loads((out / "meta.json").read_text())
            if meta.get("fingerprint") == fp:
                return open_store(out, tokenizer)
            if not overwrite:
                if meta.get("tokenizer", {}).get("digest") != ident["tokenizer"]["digest"]:
                    open_store(out, tokenizer)  # raises the tokenizer-mismatch error
                raise StoreError(f"{out} holds a token store of another source or settings ({meta.get('source')}); "
                                 "choose another --out, or pass --overwrite to rebuild it")
        print(f"[minitron] tokenizing {source.path} into the token store {out}")
        _build(source, tokenizer, out, fp, ident, dtype, errors, max(1, num_proc), batch_docs, shard_docs,
               data_root, progress)
        return open_store(out, tokenizer)


# -------------------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=8)
def _order(path: str, fingerprint: str, n_docs: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(document order [D], end position of each in the stream [D]) for a seed (None: source order)."""
    offsets = np.load(Path(path) / "offsets.npy", mmap_mode="r")
    lengths = np.diff(offsets)
    if seed is None:
        order = np.arange(n_docs)
    else:  # the order data.shuffle_docs gives
        order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed)).numpy()
    return order, np.cumsum(lengths[order])


def n_blocks(store: Store, seq_len: int) -> int:
    """Full blocks of seq_len in the store."""
    return store.n_tokens // seq_len


def stream_blocks(store: Store, seq_len: int, seed: int | None = 0, start: int = 0,
                  stop: int | None = None) -> torch.Tensor:
    """Blocks [start, stop) of the documents joined in the seeded order and cut into seq_len -> LongTensor
    [stop - start, seq_len]. Reads only the documents those blocks cover."""
    total = n_blocks(store, seq_len)
    stop = total if stop is None else min(stop, total)
    if not 0 <= start <= stop:
        raise DataError(f"blocks [{start}, {stop}) are outside the {total} blocks of {store.path}")
    order, ends = _order(str(store.path), store.meta["fingerprint"], store.n_docs, seed)
    a, b = start * seq_len, stop * seq_len
    out = np.empty(b - a, np.int64)
    i = int(np.searchsorted(ends, a, side="right"))
    pos = a
    while pos < b:
        d = int(order[i])
        doc_start = int(ends[i]) - int(store.offsets[d + 1] - store.offsets[d])
        s = int(store.offsets[d]) + pos - doc_start
        take = min(int(store.offsets[d + 1]) - s, b - pos)
        out[pos - a:pos - a + take] = store.tokens[s:s + take]
        pos += take
        i += 1
    return torch.from_numpy(out).view(stop - start, seq_len)  # [N, T]


@dataclass
class BlockView:
    """Blocks of a store read on demand: row i is block rows[i] of stream_blocks(store, seq_len, seed).
    Indexing (int, slice, list or LongTensor) -> LongTensor [n, T]; `shape` as a tensor's, so a training loop
    that samples block indices reads only the blocks it uses (memory does not grow with the corpus)."""

    store: Store
    seq_len: int
    seed: int | None
    rows: np.ndarray                      # int64 [N]: block numbers in the seeded stream

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self.rows), self.seq_len])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        picked = np.atleast_1d(self.rows[idx])
        out = torch.empty(len(picked), self.seq_len, dtype=torch.long)                       # [n, T]
        for j, b in enumerate(picked.tolist()):
            out[j] = stream_blocks(self.store, self.seq_len, self.seed, b, b + 1)[0]
        return out[0] if np.ndim(self.rows[idx]) == 0 else out


def store_splits(store: Store, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                 max_blocks: int | None = None):
    """data.split_blocks of the first max_blocks blocks without reading them: train and validation are
    BlockViews [N_train, T] / [N_val, T] with the rows, in the order, split_blocks gives (data.selection_blocks
    and data.report_blocks then read only the blocks they return)."""
    from minitron.data import Splits, split_order

    n = n_blocks(store, seq_len) if max_blocks is None else min(max_blocks, n_blocks(store, seq_len))
    train_order, val_order = split_order(n, val_fraction, seed)
    return Splits(train=BlockView(store, seq_len, seed, train_order.numpy()),
                  validation=BlockView(store, seq_len, seed, val_order.numpy()))


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous, disjoint share [start, stop) of n items that rank `rank` of `world` reads."""
    if not 0 <= rank < world:
        raise DataError(f"rank {rank} is outside a world of {world}")
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def rank_blocks(store: Store, seq_len: int, rank: int, world: int, seed: int | None = 0,
                max_blocks: int | None = None) -> torch.Tensor:
    """This rank's disjoint slice of the first max_blocks blocks -> [~N / world, T]."""
    n = n_blocks(store, seq_len) if max_blocks is None else min(max_blocks, n_blocks(store, seq_len))
    return stream_blocks(store, seq_len, seed, *rank_range(n, rank, world))


def budget_blocks(tokens: int, seq_len: int) -> int:
    """Blocks a token budget consumes (rounded up)."""
    return -(-tokens // seq_len)


# ---------------------------------------------------------------------------------------------------- blends
@dataclass
class Blend:
    """Blocks drawn from several stores by weight: blocks [N, T] and what was drawn (for the report)."""

    blocks: torch.Tensor
    drawn: list[dict]                     # per source: name, weight asked, blocks drawn, share drawn


def blend_blocks(stores: list[tuple[str, Store, float]], seq_len: int, seed: int = 0,
                 max_blocks: int | None = None) -> Blend:
    """Draw blocks from (name, store, weight) sources: each block's source sampled by weight with `seed`,
    blocks taken in order from that source's seeded stream; stops at max_blocks or when a drawn source runs
    out -> Blend([N, T], drawn)."""
    if not stores:
        raise DataError("a blend needs at least one source")
    weights = torch.tensor([float(w) for _, _, w in stores], dtype=torch.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise DataError(f"blend weights must be >= 0 with a positive sum, got {weights.tolist()}")
    avail = [n_blocks(s, seq_len) for _, s, _ in stores]
    cap = sum(avail) if max_blocks is None else max_blocks
    g = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(weights / weights.sum(), cap, replacement=True, generator=g) if cap else torch.zeros(0)
    counts = [0] * len(stores)
    n = 0
    for p in picks.tolist():
        if counts[p] == avail[p]:
            break
        counts[p] += 1
        n += 1
    picks = picks[:n]
    out = torch.empty(n, seq_len, dtype=torch.long)
    for j, (_, store, _) in enumerate(stores):
        where = (picks == j).nonzero().flatten()
        if len(where):
            out[where] = stream_blocks(store, seq_len, seed, 0, len(where))  # [n_j, T]
    total_w = float(weights.sum())
    drawn = [{"source": name, "weight": float(w) / total_w, "blocks": counts[j],
              "share": counts[j] / n if n else 0.0, "tokens": counts[j] * seq_len, "available_blocks": avail[j]}
             for j, (name, _, w) in enumerate(stores)]
    return Blend(out, drawn)


def blend_summary(blend: Blend) -> dict:
    """The blend actually drawn: {blocks, seq_len, sources: per source weight asked, blocks, share, tokens}."""
    return {"blocks": int(blend.blocks.shape[0]), "seq_len": int(blend.blocks.shape[1]), "sources": blend.drawn}


def write_blend(blend: Blend, path: str | os.PathLike) -> None:
    """The blend actually drawn, as json (the report shows it)."""
    _write_json(Path(path), blend_summary(blend))


BLEND_SUFFIXES = (".blend.json", ".blend.yaml", ".blend.yml")


def is_blend(source: str) -> bool:
    """Whether a corpus names a blend file (`*.blend.yaml` / `*.blend.json`)."""
    return str(source).endswith(BLEND_SUFFIXES)


@dataclass
class BlendEntry:
    """One source of a blend: an entry of a blend file, or of a recipe's inline `data.blend` list."""

    corpus: str                           # a corpus as data.corpus takes it (path, glob, `default`, dataset id)
    weight: float = 1.0                   # relative weight (normalized over the blend)
    field: str = "text"                   # Source fields, as in `minitron data`
    config: str | None = None
    split: str = "train"
    streaming: bool = False


def _local(corpus: str, base: Path) -> str:
    """A relative corpus path that exists under `base` (or a glob that matches there) -> base / corpus."""
    local = base / corpus
    if not Path(corpus).is_absolute() and (local.exists() or glob.glob(str(local))):
        return str(local)
    return corpus


def read_blend(path: str | os.PathLike) -> list[tuple[Source, float]]:
    """A blend file -> [(Source, weight)]. The file:

        sources:
          - {corpus: default, weight: 0.7}
          - {corpus: code/*.jsonl, field: content, weight: 0.3}   # paths relative to the file's folder

    (json with the same keys also works; optional keys per source: the fields of BlendEntry)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"the blend file {path} does not exist")
    spec = yaml.safe_load(path.read_text())
    rows = spec.get("sources") if isinstance(spec, dict) else None
    if not rows or not all(isinstance(r, dict) and "corpus" in r for r in rows):
        raise DataError(f"{path}: a blend file needs `sources:`, a list of {{corpus: ..., weight: ...}} entries")
    known = {f.name for f in dataclasses.fields(BlendEntry)}
    out = []
    for r in rows:
        unknown = set(r) - known
        if unknown:
            raise DataError(f"{path}: unknown keys {sorted(unknown)} in blend entry {r}")
        e = BlendEntry(**{**r, "corpus": _local(str(r["corpus"]), path.parent)})
        out.append((Source(e.corpus, field=e.field, config=e.config, split=e.split, streaming=bool(e.streaming)),
                    float(e.weight)))
    return out


def inline_blend(entries: list[BlendEntry | dict], corpus: str = "default", base=None) -> str:
    """A recipe's inline blend (`data.blend`) -> the path of a blend file holding it (in the cache, named by its
    content), so that it becomes the same blend object a blend file gives (read_blend, load_blend). Relative
    corpus paths are taken from `base` (the working directory). `corpus` must be `default` (unset) or such a
    file already: a recipe gives data.corpus or data.blend, not both."""
    from minitron.models import cache_dir

    folder = cache_dir() / "blends"
    if corpus != "default" and Path(corpus).parent != folder:
        raise DataError(f"the recipe gives both data.corpus ({corpus}) and data.blend; keep one (a blend file can "
                        "be data.corpus, or list its sources under data.blend)")
    base = Path(base) if base is not None else Path.cwd()
    rows = [asdict(BlendEntry(**e) if isinstance(e, dict) else e) for e in entries]
    rows = [{**r, "corpus": _local(r["corpus"], base)} for r in rows]
    path = folder / f"{digest(rows)[:16]}.blend.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"sources": rows})
    return str(path)


def blend_identity(path: str | os.PathLike, data_root=None) -> dict:
    """A blend by the identity of each source and its weight."""
    return {"blend": [[source_identity(s, data_root), w] for s, w in read_blend(path)]}


def load_blend(path: str | os.PathLike, tokenizer, seq_len: int, seed: int = 0, max_blocks: int | None = None,
               data_root=None) -> Blend:
    """Each source of a blend file in its store (built or reused) -> blend_blocks; the blend drawn is written
    beside the file as `<name>.drawn.json` (and logged)."""
    parts = [(s.path, ensure_store(s, tokenizer, data_root=data_root), w) for s, w in read_blend(path)]
    blend = blend_blocks(parts, seq_len, seed, max_blocks)
    drawn = Path(str(path)[: -len(Path(path).suffix)] + ".drawn.json")
    try:
        write_blend(blend, drawn)
    except OSError as e:
        log.warning("could not write the blend drawn to %s: %s", drawn, e)
    print("[minitron] blend drawn: " + ", ".join(f"{d['source']} {d['share']:.1%} ({d['blocks']} blocks, asked "
                                                 f"{d['weight']:.1%})" for d in blend.drawn))
    return blend

