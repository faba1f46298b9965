"""Blends: blocks drawn from several token stores by weight, and the blend actually drawn (for the report).

A blend is a `*.blend.yaml` / `*.blend.json` file (`read_blend`) or a recipe's inline `data.blend` list
(`inline_blend` writes it as a blend file in the cache: one code path). Each source gets its own store; each
block's source is drawn by weight with the split seed and blocks are taken in order from that source's
seeded stream (`blend_blocks`).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minitron.arch.files import digest
from minitron.data.blocks import n_blocks, stream_blocks
from minitron.data.sources import DataError, Source, source_identity
from minitron.data.store import Store, ensure_store, write_json

log = logging.getLogger(__name__)

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
    write_json(Path(path), blend_summary(blend))


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
    from minitron.arch.models import cache_dir

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
        write_json(path, {"sources": rows})
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
