"""torch.distributed for distillation: the process group, this rank's device, collectives on that device,
DDP / FSDP2 (with a mixed-precision policy) around the trained module."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minitron.arch.adapters import decoder_layers
from minitron.arch.models import resolve_device
from minitron.distill.config import DistillConfig, DistillError

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
    """Join the torchrun process group when launched by torchrun (nccl on CUDA, gloo on CPU, with ranks.WAIT as
    the collective timeout: rank 0 alone writes the full model at the end while the others wait); pick this
    rank's device. One process runs unsharded whatever cfg.distributed says (its checkpoints are the same
    sharded format, so a run can resume at another world size), except `distributed: fsdp` under torchrun
    with one process, which runs FSDP2 over a world of 1 (the multi-GPU recipe's code path on one GPU)."""
    from minitron.arch import ranks

    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp_of_one = world == 1 and cfg.distributed == "fsdp" and ranks.launched()
    mode = cfg.distributed if cfg.distributed != "auto" else ("ddp" if world > 1 else "none")
    device = resolve_device(cfg.device)
    if world == 1 and not fsdp_of_one:
        return Dist(0, 1, "none", device), device
    if mode == "none":
        raise DistillError(f"launched with WORLD_SIZE={world} but distributed='none'; use ddp or fsdp")
    check_torch_for(mode)
    ranks.join(cfg.device, force=fsdp_of_one)
    device = ranks.rank_device(cfg.device)
    return Dist(dist.get_rank(), dist.get_world_size(), mode, device), device


TORCH_FOR = {"fsdp": (2, 6)}  # FSDP2's fully_shard / MixedPrecisionPolicy are public in torch.distributed.fsdp from 2.6


def check_torch_for(mode: str, version: str | None = None) -> None:
    """Refuse a parallel mode this torch cannot run, before any model is loaded (pyproject's floor is the
    same; this catches an older torch installed by hand)."""
    need = TORCH_FOR.get(mode)
    have = tuple(int(x) for x in (version or torch.__version__).split("+")[0].split(".")[:2])
    if need and have < need:
        raise DistillError(f"distributed: {mode} needs torch >= {need[0]}.{need[1]} (FSDP2's fully_shard and "
                           f"MixedPrecisionPolicy in torch.distributed.fsdp); this is torch {torch.__version__}. "
                           f"Upgrade torch, or use distributed: ddp")


# ---- wrapping the trained module ---------------------------------------------------------------------

def wrap(module: nn.Module, d: Dist, device: torch.device, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 (each decoder layer, then the root) with fp32 sharded master weights: with a compute
    dtype (bf16) FSDP2 casts parameters to it for forward/backward and reduces gradients in fp32
    (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32)). The root keeps its inputs as
    given (cast_forward_inputs=False): the top-k cache's fp16 log-probs and the fp32 loss normalizer reach
    the loss unrounded; the layers' inputs are cast (hidden states, in the compute dtype anyway)."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (d.world,))
        layer_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        root_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
        for layer in decoder_layers(module.model):
            fully_shard(layer, mesh=mesh, mp_policy=layer_mp)
        fully_shard(module, mesh=mesh, mp_policy=root_mp)
    return module


def real_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters and buffers of a module that are not on the meta device (before wrap()):
    what models.empty_model built for real, and the Student's own projection (seeded alike on every rank)."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]
            if not t.is_meta}


def fill_shards(model: nn.Module, d: Dist, device: torch.device, built: dict[str, torch.Tensor],
                full_state: Callable[[], dict]) -> None:
    """Materialize an FSDP2-wrapped module whose model was built on the meta device (models.empty_model):
    allocate this rank's shards on `device`, put back what was built for real (`built`, from real_state
    before wrapping), and fill the rest from rank 0's full state dict (`full_state()` runs on rank 0 only,
    e.g. from_pretrained on the CPU in the checkpoint's dtype), broadcast tensor by tensor. No rank but 0
    ever holds a full copy: per GPU, its shards plus one full tensor in flight; host RAM, one copy of the
    checkpoint on rank 0's node."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, t in built.items():
            if name in buffers:
                buffers[name].copy_(t)
    sd = {**full_state(), **{k: v for k, v in built.items() if k not in buffers}} if d.main else {}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def unwrap(model: nn.Module) -> nn.Module:
    """The trained module (the Student) inside a DDP wrapper; an FSDP2 module is its own."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model

