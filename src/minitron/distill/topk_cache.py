"""Teacher top-k log-prob cache: run the teacher once over the blocks distillation will read, distill many times.

Only the blocks the token budget consumes are cached: `schedule` replays the trainer's data order
(distill.loop.global_block_ids: seeded per-epoch permutations, each step's blocks dealt to the ranks batch by
batch) for the run's steps, and each distinct block goes to the first rank that reads it. Under torchrun every
rank computes its own share (the blocks it will consume; none computes the whole cache) and writes its own
shard files; rank 0 then writes meta.json and moves the folder into place.

Layout of a cache dir (format 2; built in `.<name>.building/`, then renamed into place):
  meta.json                      format, k, temperature, seq_len, teacher (name and teacher_id: the digest of its
                                 weights' identity, minitron.data.fingerprint), the training blocks' identity (`data`:
                                 a store's fingerprint + split rows, or the SHA-256 of in-memory blocks), the
                                 dtypes, per rank how many blocks and shards it wrote, bytes per token
  r000-blocks.npy                int64 [n_r]: the train-split rows rank r cached, ascending
  r000-00000.safetensors         indices [n, T-1, k] (uint16 when the vocabulary fits in 16 bits, else int32) and
                                 logp float16 [n, T-1, k] for the next `shard_blocks` of those rows

Positions are the T-1 predicting positions of each block (token t predicts t+1), as in the trainer.
Log-probs are taken at the distillation temperature, in fp32, and stored in float16: on SmolLM2-135M's real
logits (benchmarks/topk_precision.py, docs/data.md) fp16 rounds them 8x more finely than bf16 (max error
0.008 vs 0.06 nats) and moves the loss by ~1e-5 and its gradient by ~2e-4 (relative). The tail mass that the k
entries do not hold is recovered in the loss as an explicit "rest" bucket (see minitron.distill.losses).
Size: k * (2 + 2) bytes per predicting position with a vocabulary <= 65,536 (k = 64: 256 bytes, 0.26 GB per
million tokens), k * (4 + 2) above it; `bytes_per_token` in meta.json gives it per token of the blocks.
A cache of another format, teacher, k, temperature or data is rebuilt with a message saying what differs;
opening one directly (TopkCache) refuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minitron.arch.adapters import final_logits, lm_head
from minitron.distill.losses import topk_logprobs

FORMAT = 2
LOGP_DTYPE = torch.float16                # chosen by measurement (module docstring)
SHARD_BLOCKS = 256


class CacheError(ValueError):
    """A top-k cache is missing, corrupt, or was built for other data or settings."""


def fingerprint(blocks: torch.Tensor) -> str:
    """SHA-256 of token blocks [N, T] (int64 bytes)."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def blocks_identity(train) -> dict:
    """The training blocks' identity without reading them: a store_blocks.BlockView by its store's fingerprint, seq_len,
    seed and the digest of its rows; an in-memory tensor [N, T] by the SHA-256 of its tokens."""
    from minitron.data.blocks import BlockView

    if isinstance(train, BlockView):
        rows = hashlib.sha256(np.ascontiguousarray(train.rows, dtype=np.int64).tobytes()).hexdigest()
        return {"store": train.store.meta["fingerprint"], "seq_len": train.seq_len, "seed": train.seed, "rows": rows}
    return {"sha256": fingerprint(train)}


def index_dtype(vocab_size: int) -> torch.dtype:
    """uint16 when every token id fits in 16 bits, else int32."""
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


def bytes_per_token(k: int, seq_len: int, idx_dtype: torch.dtype) -> float:
    """Cache bytes per token of the cached blocks (T-1 of every T positions are stored; shard headers and the
    8-byte row numbers aside)."""
    return k * (idx_dtype.itemsize + LOGP_DTYPE.itemsize) * (seq_len - 1) / seq_len


def cache_meta(train, k: int, temperature: float, teacher: str, teacher_id: str = "") -> dict:
    """The settings a cache must match to be reused (the blocks it covers are checked separately)."""
    return {"format": FORMAT, "k": int(k), "temperature": float(temperature), "seq_len": int(train.shape[1]),
            "n_train_blocks": int(train.shape[0]), "teacher": str(teacher), "teacher_id": str(teacher_id),
            "data": blocks_identity(train), "logp_dtype": str(LOGP_DTYPE).removeprefix("torch.")}


def schedule(n_blocks: int, steps: int, per_step: int, batch_size: int, world: int, seed: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The blocks `steps` training steps read and which rank reads each first -> (block ids [M] ascending,
    rank [M]). The trainer's order (distill.loop.global_block_ids): position p of the stream is block
    perm_{p // N}[p % N] (perm_e = randperm(N, seed + e)); within a step, micro-batch m of rank r takes
    positions (m * world + r) * batch_size + [0, batch_size)."""
    n_pos = steps * per_step
    epochs = -(-n_pos // n_blocks)
    perms = [torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed + e)).numpy()
             for e in range(epochs)]
    stream = np.concatenate(perms)[:n_pos] if perms else np.zeros(0, np.int64)     # [steps * per_step]
    ranks = (np.arange(n_pos) % per_step // batch_size) % world                     # [steps * per_step]
    blocks, first = np.unique(stream, return_index=True)
    return blocks.astype(np.int64), ranks[first]


@torch.no_grad()
def teacher_topk(teacher, input_ids: torch.Tensor, k: int, temperature: float, chunk_size: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k of one batch [B, T] -> (indices int32 [B, T-1, k], logp fp32 [B, T-1, k]).

    Logits are projected chunk by chunk from the final hidden states (no [B, T, V] tensor).
    """
    h = teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, C]
    B, Tm1, C = h.shape
    h = h.reshape(B * Tm1, C)                                                        # [B*(T-1), C]
    w = lm_head(teacher).weight
    idx, lp = [], []
    for s in range(0, h.shape[0], chunk_size):
        i, v = topk_logprobs(final_logits(teacher, (h[s:s + chunk_size] @ w.T).float()), k, temperature)  # [n, k]
        idx.append(i.cpu())
        lp.append(v.cpu())
    return torch.cat(idx).view(B, Tm1, k), torch.cat(lp).view(B, Tm1, k)           # [B, T-1, k]


def _rank_prefix(rank: int) -> str:
    return f"r{rank:03d}"


def build_rank(teacher, train, rows: np.ndarray, out: Path, rank: int, k: int, temperature: float,
               batch_size: int = 8, device="cpu", progress: bool = False) -> int:
    """Compute this rank's share: the teacher top-k of train rows `rows` [n_r] (ascending) -> shard files
    `r<rank>-<i>.safetensors` (indices [n, T-1, k], logp fp16 [n, T-1, k]) and `r<rank>-blocks.npy`, each
    written to a temp name and renamed; shards already in `out` (an interrupted build of the same plan) are
    kept, not recomputed. train: a tensor [N, T] or a store_blocks.BlockView. Returns the shard count."""
    from tqdm.auto import tqdm

    vocab = lm_head(teacher).weight.shape[0]
    idx_dtype = index_dtype(vocab)
    pre = _rank_prefix(rank)
    starts = range(0, len(rows), SHARD_BLOCKS)
    for shard, s0 in enumerate(tqdm(starts, desc=f"teacher top-k cache (rank {rank})", disable=not progress)):
        name = out / f"{pre}-{shard:05d}.safetensors"
        if name.is_file():  # written (renamed into place) by an interrupted build of the same plan: kept
            continue
        part = rows[s0:s0 + SHARD_BLOCKS]
        idx, lp = [], []
        for b0 in range(0, len(part), batch_size):
            ids = train[torch.from_numpy(part[b0:b0 + batch_size])].to(device)     # [B, T]
            i, v = teacher_topk(teacher, ids, k, temperature)
            idx.append(i.to(idx_dtype))
            lp.append(v.to(LOGP_DTYPE))
        tmp = name.with_name(f".{name.name}.tmp")
        save_file({"indices": torch.cat(idx).contiguous(), "logp": torch.cat(lp).contiguous()}, str(tmp))
        os.replace(tmp, name)
    tmp = out / f".{pre}-blocks.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(rows, dtype=np.int64))
    os.replace(tmp, out / f"{pre}-blocks.npy")
    return len(starts)


class TopkCache:
    """Read access to a cache dir: `get(block_ids)` -> (indices int32 [B, T-1, k], logp fp16 [B, T-1, k]; with
    k = the vocabulary, logp renormalized in fp32 so that fp16 rounding cannot invent a tail mass)."""

    def __init__(self, path: str | os.PathLike, expect: dict):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if self.meta is None:
            raise CacheError(f"{self.path} holds no top-k cache (no meta.json); build it with distill --topk-cache")
        why = differences(self.meta, expect)
        if why:
            raise CacheError(f"top-k cache {self.path} was built {why}; pass another --topk-cache dir or delete "
                             "this one to rebuild it")
        self.rows, self.rank, self.local = cached_rows(self.path, self.meta)
        self._files: dict[tuple[int, int], object] = {}

    def _file(self, rank: int, shard: int):
        if (rank, shard) not in self._files:
            name = self.path / f"{_rank_prefix(rank)}-{shard:05d}.safetensors"
            try:
                self._files[rank, shard] = safe_open(str(name), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CacheError(f"top-k cache shard {name} is missing or corrupt ({e}); delete "
                                 f"{self.path} to rebuild it") from e
        return self._files[rank, shard]

    def get(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(block_ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.rows, ids), len(self.rows) - 1)
        missing = ids[self.rows[at] != ids]
        if len(missing):
            raise CacheError(f"top-k cache {self.path} does not hold train blocks {missing[:5].tolist()}: it holds "
                             f"the {len(self.rows)} blocks of the budget it was built for; delete it to rebuild")
        idx, lp = [], []
        for j in at.tolist():
            f = self._file(int(self.rank[j]), int(self.local[j]) // SHARD_BLOCKS)
            row = int(self.local[j]) % SHARD_BLOCKS
            idx.append(f.get_slice("indices")[row:row + 1])
            lp.append(f.get_slice("logp")[row:row + 1])
        idx, lp = torch.cat(idx).to(torch.int32), torch.cat(lp)                      # [B, T-1, k]
        if self.meta["k"] == self.meta["vocab"]:  # the whole distribution: its rest is 0, not fp16 rounding noise
            lp = lp.float() - torch.logsumexp(lp.float(), dim=-1, keepdim=True)      # [B, T-1, V] fp32
        return idx, lp


def read_meta(path: Path) -> dict | None:
    """meta.json of a cache dir, None when there is none ({"unreadable": True} when it is not JSON)."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return {"unreadable": True}


def cached_rows(path: Path, meta: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cached train row -> (rows [M] ascending, rank that wrote it [M], its row within that rank [M])."""
    rows, rank, local = [], [], []
    for r in meta["ranks"]:
        try:
            mine = np.load(path / f"{_rank_prefix(r['rank'])}-blocks.npy")
        except (OSError, ValueError) as e:
            raise CacheError(f"top-k cache {path} lacks rank {r['rank']}'s block list ({e}); delete it to "
                             "rebuild") from e
        rows.append(mine)
        rank.append(np.full(len(mine), r["rank"], np.int64))
        local.append(np.arange(len(mine), dtype=np.int64))
    rows, rank, local = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (rows, rank, local))
    order = np.argsort(rows, kind="stable")
    return rows[order], rank[order], local[order]


def mismatch(meta: dict, expect: dict) -> dict:
    """{key: (cached, wanted)} for every setting that differs (the teacher's name may differ: its
    teacher_id, the identity of its weights, decides; without a teacher, teacher_id is "" and not compared)."""
    skip = {"teacher"} | ({"teacher_id"} if not expect.get("teacher_id") else set())
    return {key: (meta.get(key), v) for key, v in expect.items() if key not in skip and meta.get(key) != v}


def differences(meta: dict, expect: dict) -> str:
    """Why a cache with `meta` cannot serve `expect`, in words ("" when it can, blocks aside)."""
    if meta.get("unreadable"):
        return "badly (its meta.json is unreadable)"
    if meta.get("format") != FORMAT:
        return (f"in cache format {meta.get('format', 1)} (fp32 log-probs, every train block, one process), and "
                f"this minitron reads format {FORMAT} (16-bit log-probs, only the budget's blocks, one shard per "
                "rank)")
    diff = mismatch(meta, expect)
    return f"for another teacher, data or settings (cached vs wanted: {diff})" if diff else ""


def open_or_build(path, teacher, train, k: int, temperature: float, teacher_name: str, batch_size: int, device,
                  *, steps: int, per_step: int, seed: int, rank: int = 0, world: int = 1, barrier=None,
                  progress: bool = False, teacher_id: str = "") -> TopkCache:
    """The cache at `path` for the blocks `steps` training steps read (`schedule`; train [N, T] is a tensor or a
    store_blocks.BlockView): reused when it was made by this teacher (teacher_id) from this data with these settings
    and holds those blocks; else every rank builds its share (rank 0 says why) and rank 0 moves it into place.
    Every rank reads the old meta before the first barrier, so all decide alike."""
    path = Path(path)
    blocks, owner = schedule(int(train.shape[0]), steps, per_step, batch_size, world, seed)
    expect = cache_meta(train, k, temperature, teacher_name, teacher_id)
    old = read_meta(path)
    why = differences(old, expect) if old is not None else "nowhere yet"
    if not why:
        have = cached_rows(path, old)[0]
        if not np.isin(blocks, have).all():
            why = f"for a smaller budget ({len(have)} blocks; this run reads {len(blocks)})"
    if why:
        if teacher is None:
            raise CacheError(f"no usable top-k cache in {path} (it was built {why}) and no teacher to build it; "
                             "pass --teacher")
        building = path.parent / f".{path.name}.building"
        if rank == 0:
            if old is not None:
                print(f"[minitron] top-k cache {path} was built {why}; rebuilding it")
            start_build(building, build_plan(expect, blocks, owner, world))
        _wait(barrier)
        mine = blocks[owner == rank]
        build_rank(teacher, train, mine, building, rank, k, temperature, batch_size, device, progress)
        _wait(barrier)
        if rank == 0:
            counts = [int((owner == r).sum()) for r in range(world)]
            vocab = lm_head(teacher).weight.shape[0]
            idx_dtype = index_dtype(vocab)
            meta = {**expect, "blocks": int(len(blocks)), "shard_blocks": SHARD_BLOCKS, "vocab": vocab,
                    "index_dtype": str(idx_dtype).removeprefix("torch."),
                    "bytes_per_token": bytes_per_token(k, expect["seq_len"], idx_dtype),
                    "ranks": [{"rank": r, "blocks": n, "shards": math.ceil(n / SHARD_BLOCKS)}
                              for r, n in enumerate(counts)]}
            (building / "meta.json").write_text(json.dumps(meta, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(building, path)
    _wait(barrier)
    return TopkCache(path, expect)


def build_plan(expect: dict, blocks: np.ndarray, owner: np.ndarray, world: int) -> dict:
    """What a build computes: the settings, the blocks [M] and their ranks [M], the shard size. A killed build
    resumes only under the same plan (each rank's shards then hold the same rows)."""
    assigned = hashlib.sha256(np.stack([blocks, owner]).astype(np.int64).tobytes()).hexdigest()
    return {**expect, "world": int(world), "shard_blocks": SHARD_BLOCKS, "assigned": assigned}


def start_build(building: Path, plan: dict) -> None:
    """Rank 0: keep an interrupted build of the same plan (its finished shards are reused), else start afresh."""
    record = building / "build.json"
    try:
        same = json.loads(record.read_text()) == json.loads(json.dumps(plan))
    except (OSError, ValueError):
        same = False
    if same:
        done = len(list(building.glob("r*-*.safetensors")))
        print(f"[minitron] resuming the interrupted top-k cache build in {building} ({done} shards done)")
        return
    from minitron.data.store import write_json

    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    write_json(record, plan)


def _wait(barrier) -> None:
    if barrier is not None:
        barrier()
