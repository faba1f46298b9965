"""`minitron run` under torchrun: which process does what.

Every rank runs the recipe's code path. Stages that use all ranks do so themselves: teacher correction and
distillation (DDP / FSDP2), and the importance pass (each rank scores its share of the calibration batches,
the statistics are all-reduced). Everything that decides or writes a stage's folder runs on rank 0 alone
(`main_only`), and its result reaches every rank, so no two processes write one file. After the last
training stage the other ranks leave (`leave`); rank 0 evaluates, exports and writes the report alone, so
an hour of evaluation never runs into a collective's timeout.

One process (no WORLD_SIZE, or 1) is rank 0 of a world of 1: every function here is then a plain call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from minitron.arch.audit import install_from_env

R = TypeVar("R")
# rank 0 alone prunes, or writes a scores file, while the others wait in a collective: a long timeout
WAIT = timedelta(hours=6)


class RankFailed(RuntimeError):
    """Rank 0 failed in a step that the other ranks were waiting for."""


def launched() -> bool:
    """This process was started by torchrun (with one process too)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def rank_device(device: str) -> torch.device:
    """The device this process computes on: `device` resolved ('auto': CUDA when there is one); on CUDA, GPU
    LOCAL_RANK."""
    from minitron.arch.models import resolve_device

    where = resolve_device(device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if where.type == "cuda" else where


def join(device: str, force: bool = False) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1, or with force (a world of 1 under torchrun: FSDP2
    needs a group), with WAIT as the collective timeout (nccl on CUDA, else gloo); on CUDA this process uses
    rank_device(device). Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or force) and not dist.is_initialized():
        where = rank_device(device)
        if where.type == "cuda":
            torch.cuda.set_device(where)
        install_from_env(where)  # $MINITRON_AUDIT_COLLECTIVES: record every collective's devices
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=WAIT)
    return rank(), size()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def main_only(fn: Callable[[], R]) -> R:
    """fn() on rank 0; every rank returns its value (picklable). Other ranks wait for it; when it raises,
    rank 0 raises the error and every other rank raises RankFailed naming it (nobody waits forever)."""
    if size() == 1:
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as e:
            dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RankFailed(f"rank 0 failed, so rank {rank()} stops too: {value}")
    return value


def barrier() -> None:
    if size() > 1:
        dist.barrier()


def leave() -> bool:
    """The end of the multi-process part: every rank leaves the process group. Returns True on the process
    that goes on alone (rank 0)."""
    if size() == 1:
        return True
    main = is_main()
    dist.barrier()
    dist.destroy_process_group()
    return main
