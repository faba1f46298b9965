"""Reading a token store as blocks [N, T]: the documents joined in a seeded order, cut into seq_len blocks.

`stream_blocks` gives the blocks of `data.pack(data.shuffle_docs(docs, seed), ...)`, reading only the
documents those blocks cover; `BlockView` reads them on demand (the lazy train / validation splits of
`data.load_splits`, via `store_splits`); `rank_blocks` gives each torchrun rank a disjoint contiguous slice;
`budget_blocks` counts the blocks a token budget consumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minitron.data.sources import DataError
from minitron.data.store import Store


@dataclass
class Splits:
    """Packed blocks split deterministically: train [N_train, T], validation [N_val, T]."""

    train: torch.Tensor                   # or a minitron.data.blocks.BlockView (load_splits(lazy=True)): same rows
    validation: torch.Tensor              # likewise; selection_blocks / report_blocks give tensors of either
    blend: dict | None = None             # a blend corpus: the blend drawn (store.write_blend's json), for the report


def split_order(n: int, val_fraction: float = 0.05, seed: int = 0, min_val: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train block indices, validation block indices) of split_blocks for n blocks, in their seeded order."""
    n_val = max(min_val, int(round(n * val_fraction)))
    if n_val >= n:
        raise DataError(f"corpus too short: {n} blocks cannot give {n_val} validation blocks and a train split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[order < n - n_val], order[order >= n - n_val]


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
