"""Text corpora -> packed token blocks [N, T]; deterministic train/validation split; calibration samples.

Sources: a text file (.txt/.rst/.md/... read as UTF-8), a .jsonl/.json/.parquet/.arrow file (field `text`),
a folder of such files (recursive, sorted), a glob, a name under the data dir (`$MINITRON_DATA_DIR` or
--data-dir; e.g. `wikitext-2-raw/wiki.valid.raw`), `default` (the Python documentation corpus that
scripts/setup.sh installs offline), a `datasets.save_to_disk` folder, or a Hugging Face `datasets` name.
Reading and tokenizing live in minitron.data.store (a token store, built once per corpus and tokenizer).
"""

from __future__ import annotations

import os

import torch

# where a corpus is (and its errors) lives in minitron.data.sources, the splits in minitron.data.blocks: both
# importable from here as before
from minitron.data.blocks import Splits, split_order  # noqa: E402,F401
from minitron.data.sources import (  # noqa: E402,F401
    DEFAULT_CORPUS,
    DEFAULT_CORPUS_PACKAGES,
    TEXT_SUFFIXES,
    DataError,
    Source,
    data_dir,
    default_corpus_dir,
    fetch_default_corpus,
    read_documents,
    resolve_source,
)


def read_texts(source: str, data_root: str | os.PathLike | None = None, field: str = "text") -> list[str]:
    """Read the non-blank documents of a file, folder, glob, data-dir name, `default`, saved dataset or
    `datasets` name (`name` or `name:split`) into a list (minitron.data.store reads the same documents, streamed)."""
    return read_documents(Source(source, field=field), data_root)


def encode_document(tokenizer, doc: str) -> list[int]:
    """One document's token ids as the tokenizer's own call makes them (BOS where it adds one, e.g.
    Llama-3 and Gemma; none for SmolLM2/GPT-2 style tokenizers), ending with EOS."""
    ids = list(tokenizer(doc)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def pack(docs: list[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize documents (encode_document: BOS as the tokenizer adds it, EOS after each), join them, cut
    into full blocks -> LongTensor [N, seq_len].

    Packing (no padding) is what Minitron calibration does. Stops tokenizing once max_blocks are full.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for doc in docs:
        ids.extend(encode_document(tokenizer, doc))
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise DataError(f"corpus too short: {len(ids)} tokens do not fill one block of {seq_len}; "
                        "give more text or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # [N, T]


def split_blocks(blocks: torch.Tensor, val_fraction: float = 0.05, seed: int = 0, min_val: int = 1) -> Splits:
    """Hold out the last blocks as validation [N_val, T]; the rest are train [N_train, T]; both in a seeded
    order (so any prefix of validation spans all its documents).

    The tail, not a random subset: blocks packed from documents in shuffled order (load_splits) then
    hold out whole documents, so validation is text that training never saw rather than the neighbours
    of training blocks in the same document (at most one document straddles the boundary)."""
    train_order, val_order = split_order(blocks.shape[0], val_fraction, seed, min_val)
    return Splits(train=blocks[train_order], validation=blocks[val_order])


def shuffle_docs(docs: list[str], seed: int) -> list[str]:
    """Documents in a seeded order, so that a max_blocks prefix samples the whole corpus."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [docs[i] for i in order]


def load_splits(source: str, tokenizer, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                max_blocks: int | None = None, data_root: str | os.PathLike | None = None,
                lazy: bool = False) -> Splits:
    """The corpus' token store (built once, then reused: minitron.data.store) -> documents in the order `seed`
    shuffles them -> packed blocks (up to max_blocks) -> split_blocks.

    The same blocks as pack(shuffle_docs(read_texts(source), seed), ...): max_blocks takes documents from
    across the corpus (not its first files), and validation holds out whole documents. A blend file
    (`*.blend.yaml`, minitron.data.blends.read_blend) draws blocks from several corpora by weight; its tail blocks
    are validation (each source's later documents). lazy: train and validation are store_blocks.BlockViews that read
    the blocks a loop indexes (same rows), so a large corpus is never held in memory; selection_blocks and
    report_blocks read only the blocks they return."""
    from minitron.data.blends import blend_summary, is_blend, load_blend
    from minitron.data.blocks import n_blocks, store_splits, stream_blocks
    from minitron.data.store import ensure_store

    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if is_blend(source):
        blend = load_blend(source, tokenizer, seq_len, seed, max_blocks, data_root)
        if blend.blocks.shape[0] == 0:
            raise DataError(f"the blend {source} gives no block of {seq_len} tokens; add text or lower --seq-len")
        splits = split_blocks(blend.blocks, val_fraction, seed)                      # blocks [N, T]
        splits.blend = blend_summary(blend)
        return splits
    store = ensure_store(source, tokenizer, data_root=data_root)
    n = n_blocks(store, seq_len) if max_blocks is None else min(max_blocks, n_blocks(store, seq_len))
    if n == 0:
        raise DataError(f"corpus too short: {store.n_tokens} tokens do not fill one block of {seq_len}; "
                        "give more text or a smaller --seq-len")
    if lazy:
        return store_splits(store, seq_len, val_fraction, seed, n)
    return split_blocks(stream_blocks(store, seq_len, seed, 0, n), val_fraction, seed)


def corpus_blocks(source: str, tokenizer, seq_len: int, max_blocks: int | None = None,
                  data_root: str | os.PathLike | None = None) -> torch.Tensor:
    """The corpus' first blocks in source order -> [<=max_blocks, T], from its token store: the blocks of
    pack(read_texts(source), tokenizer, seq_len, max_blocks), tokenized once and reused."""
    from minitron.data.blocks import n_blocks, stream_blocks
    from minitron.data.store import ensure_store

    store = ensure_store(source, tokenizer, data_root=data_root)
    n = n_blocks(store, seq_len) if max_blocks is None else min(max_blocks, n_blocks(store, seq_len))
    if n == 0:
        raise DataError(f"corpus too short: {store.n_tokens} tokens do not fill one block of {seq_len}; "
                        "give more text or a smaller --seq-len")
    return stream_blocks(store, seq_len, None, 0, n)  # [N, T]


def calibration_sample(blocks: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n blocks drawn without replacement, seeded -> [n, T]. Fails if fewer than n blocks exist."""
    if blocks.shape[0] < n:
        raise DataError(f"calibration needs {n} samples but the corpus gives {blocks.shape[0]} blocks of "
                        f"{blocks.shape[1]} tokens; lower --calib-samples or --seq-len, or add text")
    idx = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return blocks[idx.sort().values]


def _half(validation: torch.Tensor) -> int:
    if validation.shape[0] < 2:
        raise DataError(f"the validation split has {validation.shape[0]} block(s); choosing (split, depth block, "
                        "search candidate) and reporting need at least 2 disjoint ones: add text, lower --seq-len "
                        "or raise val_fraction")
    return validation.shape[0] // 2


def _rows(blocks, start: int, stop: int, n: int | None) -> torch.Tensor:
    """blocks[start:stop][:n] -> [<=n, T], reading only those rows of a store_blocks.BlockView."""
    return blocks[start:stop if n is None else min(stop, start + max(n, 0))]


def selection_blocks(validation: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Held-out blocks that CHOOSE (budget split, depth block, search candidate): the first half of the
    validation split [N, T] (a tensor or a store_blocks.BlockView), at most n -> [<=n, T]. Disjoint from report_blocks,
    so a reported loss is never measured on the blocks that picked the model."""
    return _rows(validation, 0, _half(validation), n)


def report_blocks(validation: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Held-out blocks that REPORT (loss after pruning, distillation validation, eval's loss:<corpus>): the
    second half of the validation split [N, T] (a tensor or a store_blocks.BlockView), at most n -> [<=n, T]."""
    return _rows(validation, _half(validation), validation.shape[0], n)
