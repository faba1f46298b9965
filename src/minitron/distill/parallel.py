"""torch.distributed for distillation: the process group, this rank's device, collectives on that device,
DDP / FSDP2 (with a mixed-precision policy) around the trained module."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from minitron.arch import decoder_layers
from minitron.distill.config import DistillConfig, DistillError
from minitron.models import resolve_device

if TYPE_CHECKING:
    from minitron.distill.student import Student

# ---- the process group and collectives ----------------------------------------------------------------

@dataclass
class Dist:
    """This rank's place in the run. Every collective goes through these methods, on tensors that live on
    the training device (NCCL serves only CUDA tensors: a CPU tensor there is refused here with a clear
    message instead of crashing inside NCCL)."""

    rank: int = 0
    world: int = 1
    mode: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        """A tensor for a collective, on the training device."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _check(self, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise RuntimeError(f"collective on a {t.device} tensor while training on {self.device}: NCCL serves "
                               "only CUDA tensors; create it with Dist.tensor (a bug in minitron: please report)")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place across ranks; returns t."""
        self._check(t)
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (max) in place across ranks; returns t."""
        self._check(t)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def init_distributed(cfg: DistillConfig) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); pick this rank's
    device. One process runs unsharded whatever cfg.distributed says (its checkpoints are the same
    sharded format, so a run can resume at another world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = cfg.distributed if cfg.distributed != "auto" else ("ddp" if world > 1 else "none")
    device = resolve_device(cfg.device)
    if world == 1:
        return Dist(0, 1, "none", device), device
    if mode == "none":
        raise DistillError(f"launched with WORLD_SIZE={world} but distributed='none'; use ddp or fsdp")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), mode, device), device


# ---- wrapping the trained module ---------------------------------------------------------------------

def wrap(module: Student, d: Dist, device: torch.device, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 (each decoder layer, then the root) with fp32 sharded master weights: with a compute
    dtype (bf16) FSDP2 casts parameters to it for forward/backward and reduces gradients in fp32
    (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32))."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(module.model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)
    return module


def unwrap(model: nn.Module) -> Student:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model




def _full(norm) -> float:
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


