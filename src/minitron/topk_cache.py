"""Teacher top-k log-prob cache: run the teacher over the training blocks once, distill many times.

Layout of a cache dir (written to a temp dir, then renamed into place):
  meta.json                  k, temperature, seq_len, teacher (name and teacher_id: the digest of its
                             weights' identity, minitron.fingerprint), number of blocks, shard size, and
                             a SHA-256 fingerprint of the training token blocks. open_or_build rebuilds
                             a cache made by another teacher, on other data or with other settings
                             (saying which), and never silently reuses it
  shard-00000.safetensors    indices int32 [n, T-1, k] and logp float32 [n, T-1, k] for blocks
                             [0, n), in the order of the training split; next shard continues

Positions are the T-1 predicting positions of each block (token t predicts t+1), as in the trainer.
Log-probs are taken at the distillation temperature; the tail mass that the k entries do not hold is
recovered in the loss as an explicit "rest" bucket (see minitron.losses). Size: 8 bytes * k per token
(k = 64: 512 bytes, ~0.5 GB per million tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minitron.arch import final_logits, lm_head
from minitron.files import atomic_dir
from minitron.losses import topk_logprobs


class CacheError(ValueError):
    """A top-k cache is missing, corrupt, or was built for other data or settings."""


def fingerprint(blocks: torch.Tensor) -> str:
    """SHA-256 of token blocks [N, T] (int64 bytes)."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def cache_meta(blocks: torch.Tensor, k: int, temperature: float, teacher: str, shard_blocks: int,
               teacher_id: str = "") -> dict:
    return {"k": int(k), "temperature": float(temperature), "seq_len": int(blocks.shape[1]),
            "n_blocks": int(blocks.shape[0]), "teacher": str(teacher), "teacher_id": str(teacher_id),
            "shard_blocks": int(shard_blocks), "fingerprint": fingerprint(blocks)}


@torch.no_grad()
def teacher_topk(teacher, input_ids: torch.Tensor, k: int, temperature: float, chunk_size: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k of one batch [B, T] -> (indices int32 [B, T-1, k], logp fp32 [B, T-1, k]).

    Logits are projected chunk by chunk from the final hidden states (no [B, T, V] tensor).
    """
    h = teacher.base_model(input_ids=input_ids).last_hidden_state[:, :-1]            # [B, T-1, C]
    B, Tm1, C = h.shape
    h = h.reshape(B * Tm1, C)                                                        # [B*(T-1), C]
    w = lm_head(teacher).weight
    idx, lp = [], []
    for s in range(0, h.shape[0], chunk_size):
        i, v = topk_logprobs(final_logits(teacher, (h[s:s + chunk_size] @ w.T).float()), k, temperature)  # [n, k]
        idx.append(i.cpu())
        lp.append(v.cpu())
    return torch.cat(idx).view(B, Tm1, k), torch.cat(lp).view(B, Tm1, k)           # [B, T-1, k]


def build_cache(teacher, blocks: torch.Tensor, out_dir: str | os.PathLike, k: int, temperature: float,
                teacher_name: str, batch_size: int = 8, shard_blocks: int = 256, device="cpu",
                progress: bool = False, teacher_id: str = "") -> Path:
    """Compute and write the cache for training blocks [N, T]; returns the dir. Atomic (temp + rename)."""
    out = Path(out_dir)
    vocab = lm_head(teacher).weight.shape[0]
    if not 1 <= k <= vocab:
        raise CacheError(f"top-k cache k={k} must be between 1 and the vocabulary size {vocab}")
    meta = cache_meta(blocks, k, temperature, teacher_name, shard_blocks, teacher_id)
    from tqdm.auto import tqdm

    with atomic_dir(out) as tmp:
        starts = range(0, blocks.shape[0], shard_blocks)
        for shard, s0 in enumerate(tqdm(starts, desc="teacher top-k cache", disable=not progress)):
            part = blocks[s0:s0 + shard_blocks]
            idx, lp = [], []
            for b0 in range(0, part.shape[0], batch_size):
                i, v = teacher_topk(teacher, part[b0:b0 + batch_size].to(device), k, temperature)
                idx.append(i)
                lp.append(v)
            save_file({"indices": torch.cat(idx).contiguous(), "logp": torch.cat(lp).contiguous()},
                      str(tmp / f"shard-{shard:05d}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


class TopkCache:
    """Read access to a cache dir: `get(block_ids)` -> (indices [B, T-1, k], logp [B, T-1, k])."""

    def __init__(self, path: str | os.PathLike, expect: dict):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        try:
            self.meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"top-k cache {self.path} is unreadable ({e}); delete it to rebuild") from e
        diff = mismatch(self.meta, expect)
        if diff:
            raise CacheError(f"top-k cache {self.path} was built for other settings or data "
                             f"(cached vs wanted: {diff}); pass another --topk-cache dir or delete this one")
        self.shard_blocks = self.meta["shard_blocks"]
        self._files: dict[int, object] = {}

    def _file(self, shard: int):
        if shard not in self._files:
            name = self.path / f"shard-{shard:05d}.safetensors"
            try:
                self._files[shard] = safe_open(str(name), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CacheError(f"top-k cache shard {name} is missing or corrupt ({e}); delete "
                                 f"{self.path} to rebuild it") from e
        return self._files[shard]

    def get(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, lp = [], []
        for b in block_ids:
            f = self._file(b // self.shard_blocks)
            row = b % self.shard_blocks
            idx.append(f.get_slice("indices")[row:row + 1])
            lp.append(f.get_slice("logp")[row:row + 1])
        return torch.cat(idx), torch.cat(lp)                                         # [B, T-1, k]


def mismatch(meta: dict, expect: dict) -> dict:
    """{key: (cached, wanted)} for every setting that differs (the teacher's name may differ: its
    teacher_id, the identity of its weights, decides; without a teacher, teacher_id is "" and not compared)."""
    skip = {"teacher"} | ({"teacher_id"} if not expect.get("teacher_id") else set())
    return {key: (meta.get(key), v) for key, v in expect.items() if key not in skip and meta.get(key) != v}


def open_or_build(path, teacher, blocks: torch.Tensor, k: int, temperature: float, teacher_name: str,
                  batch_size: int, device, is_main: bool = True, barrier=None, progress=False,
                  teacher_id: str = "") -> TopkCache:
    """Reuse the cache at path when it was made by this teacher (teacher_id) from these blocks with these
    settings; else build it, or rebuild it saying what differs (main rank; the others wait)."""
    shard_blocks = 256
    expect = cache_meta(blocks, k, temperature, teacher_name, shard_blocks, teacher_id)
    meta_file = Path(path) / "meta.json"
    if is_main:
        try:
            old = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        except ValueError:
            old = {"unreadable": True}
        diff = mismatch(old, expect) if old is not None else None
        if diff:
            print(f"[minitron] top-k cache {path} was built for another teacher, data or settings "
                  f"(cached vs wanted: {diff}); rebuilding it")
        if old is None or diff:
            if teacher is None:
                raise CacheError(f"no usable top-k cache in {path} and no teacher to build it; pass --teacher")
            build_cache(teacher, blocks, path, k, temperature, teacher_name, batch_size, shard_blocks, device,
                        progress, teacher_id)
    if barrier is not None:
        barrier()
    return TopkCache(path, expect)
