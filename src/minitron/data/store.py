"""Token store: a corpus tokenized once into a memory-mapped token file + document index, reused by every stage.

A store is a folder:
    tokens.bin    every document's token ids back to back (uint16 when the vocabulary fits, else uint32)
    offsets.npy   int64 [D + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json     dtype, counts, the source and tokenizer identities, their fingerprint, skipped-input counts

This module writes and opens stores (`ensure_store`, `open_store`). Documents come from
`minitron.data.sources` and are tokenized as `minitron.data.corpus.encode_document` does (the tokenizer's own call,
so BOS where it adds one; EOS after each document), in batches with the fast tokenizer, in `num_proc` worker
processes, streamed to disk: memory does not grow with the corpus. The folder is written as `<out>.partial` and
renamed at the end; the partial folder commits a shard of `shard_docs` source documents at a time
(manifest.json), so a build that was killed resumes at its last committed shard. A file lock lets one
process per machine build while the others (e.g. torchrun ranks) wait and then read.

Readers: `minitron.data.blocks` cuts blocks [N, T] out of the seeded document order (`stream_blocks`, the same
blocks as `data.pack(data.shuffle_docs(docs, seed), ...)`, reading only the documents they need);
`minitron.data.blends` draws blocks from several stores by weight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minitron.arch.files import digest
from minitron.data.sources import DataError, Source, Stats, iter_documents, resolve, source_identity

log = logging.getLogger(__name__)

FORMAT = 1


class StoreError(DataError):
    """A store that cannot be used as asked (another tokenizer, another source, a broken folder)."""


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
    from minitron.arch import models

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


def write_json(path: Path, obj: dict) -> None:
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
        write_json(manifest_path, manifest)
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
                    write_json(manifest_path, manifest)

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
    write_json(part / "meta.json", meta)
    manifest_path.unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    skipped = {k: v for k, v in asdict(stats).items() if k not in ("docs", "tokens", "examples") and v}
    if skipped:
        eg = f", e.g. {', '.join(stats.examples)}" if stats.examples else ""
        log.warning("token store %s: skipped or repaired %s%s", out, skipped, eg)


def open_store(path: str | os.PathLike, tokenizer=None, fix: str | None = None) -> Store:
    """Open a finished store; with `tokenizer`, refuse one made by another tokenizer (`fix`: what the error
    tells the user to do instead)."""
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
                             f"{mine['vocab']}); its ids would be wrong for this model. "
                             + (fix or "Build a store for this tokenizer (another --out), or pass --overwrite"))
    tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r") if meta["n_tokens"] else np.zeros(0)
    return Store(path, tokens, np.load(path / "offsets.npy", mmap_mode="r"), meta)


def given_store(path: Path, tokenizer, out: str | os.PathLike | None = None) -> Store:
    """A corpus that is a token store already (`minitron data SOURCE --out DIR`, then DIR as --data /
    --calib-data / data.corpus / loss:DIR / --heldout): opened as it is, read only (no lock, nothing written, so
    every torchrun rank can read one store on a shared disk), after checking that this tokenizer made it. It holds
    documents, so blocks of any seq_len are cut from it."""
    if out is not None and Path(out).resolve() != path.resolve():
        raise StoreError(f"{path} is already a token store; pass it as the corpus as it is (it is read, not "
                         "tokenized again), or make another store from the corpus it was made from "
                         f"({_made_from(path)})")
    meta = json.loads((path / "meta.json").read_text())
    name = str(getattr(tokenizer, "name_or_path", "")) or "MODEL"
    fix = (f"Make a store of its corpus with this model's tokenizer, `minitron data {_made_from(path)} --tokenizer "
           f"{name} --out NEW_DIR`, and pass NEW_DIR (or pass the corpus itself: the store is then made and kept "
           "in the cache)")
    if meta.get("format") != FORMAT:
        raise StoreError(f"{path} is a token store of format {meta.get('format')}, not {FORMAT} (another minitron); "
                         f"make it again: `minitron data {_made_from(path)} --tokenizer {name} --out {path} "
                         "--overwrite`")
    return open_store(path, tokenizer, fix)


def _made_from(path: Path) -> str:
    """The source a store was made from, as its meta.json names it."""
    try:
        return str(json.loads((path / "meta.json").read_text())["source"]["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return "SOURCE"


def default_store_dir(fp: str) -> Path:
    """Where `run` and the stages keep stores: the cache ($MINITRON_CACHE/tokens/<fingerprint>)."""
    from minitron.arch.models import cache_dir

    return cache_dir() / "tokens" / fp[:24]


def ensure_store(source: Source | str, tokenizer, out: str | os.PathLike | None = None, *, data_root=None,
                 num_proc: int = 1, batch_docs: int = 256, shard_docs: int = 4096, dtype: str | None = None,
                 errors: str = "replace", overwrite: bool = False, progress: bool = True) -> Store:
    """The store of `source` tokenized by `tokenizer`: reused when one with the same fingerprint exists, else
    built (or resumed). `out` None: in the cache, keyed by the fingerprint. An `out` holding a store of
    another tokenizer or source is refused unless `overwrite`. A `source` that is a store itself is opened as it
    is (given_store)."""
    source = Source(source) if isinstance(source, str) else source
    if errors not in ("replace", "skip", "strict"):
        raise DataError(f"errors must be replace, skip or strict, not {errors!r}")
    kind, where = resolve(source, data_root)
    if kind == "store":
        return given_store(Path(where), tokenizer, out)
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
