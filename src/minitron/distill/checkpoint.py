"""Sharded, atomic checkpoints of the trained module and optimizer (torch.distributed.checkpoint)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from minitron.distill.config import FINISHED, CheckpointError
from minitron.distill.parallel import Dist, unwrap

# ---- checkpoints ------------------------------------------------------------------------------------

def full_state(model: nn.Module, optim, d: Dist) -> tuple[dict, dict | None]:
    """(model state, optimizer state or None without optim) as full CPU tensors (collective under FSDP);
    used for the final save of the student, not for checkpoints."""
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        osd = get_optimizer_state_dict(model, optim, options=opts) if optim is not None else None
        return get_model_state_dict(model, options=opts), osd
    sd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return sd, optim.state_dict() if optim is not None else None


def _dcp_state(model: nn.Module, optim) -> dict:
    """{"model", "optim"} state dicts as torch.distributed.checkpoint wants them: each rank's own shards
    under FSDP2 (DTensors), plain tensors otherwise; the optimizer's states exist (initialized) either way."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def save_checkpoint(out: Path, step: int, model, optim, d: Dist, extra: dict) -> None:
    """checkpoints/step-N: a torch.distributed.checkpoint (every rank writes only its own shards, nothing is
    gathered) into step-N.tmp, renamed by rank 0 once all ranks finished; then `latest` is replaced and
    older checkpoints removed. A kill at any point leaves the previous checkpoint as `latest`."""
    import torch.distributed.checkpoint as dcp

    root = out / "checkpoints"
    name = f"step-{step:07d}"
    tmp = root / f"{name}.tmp"
    if d.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()
    dcp.save(_dcp_state(model, optim), checkpoint_id=str(tmp))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-{d.rank}.pt")
    d.barrier()
    if d.main:
        (tmp / "state.json").write_text(json.dumps({"step": step, "world": d.world, **extra}, indent=2))
        _commit_checkpoint(tmp, root / name)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / "latest")
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def _commit_checkpoint(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def can_resume(out: Path) -> bool:
    """True when `out` holds an unfinished run with a checkpoint (pass resume=True to continue it)."""
    return not (Path(out) / FINISHED).is_file() and latest_checkpoint(Path(out)) is not None


def _non_finite(state: dict) -> list[str]:
    """Names of the floating tensors (this rank's shards) that hold NaN or inf."""
    from torch.distributed.tensor import DTensor

    bad = []
    for k, v in state.items():
        local = v.to_local() if isinstance(v, DTensor) else v
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(k)
    return bad


def load_checkpoint(path: Path, model, optim, d: Dist) -> dict:
    """Restore model and optimizer (resharded to this run's world size by torch.distributed.checkpoint) and,
    at the same world size, each rank's RNG states; returns state.json. Tensors only (weights_only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optim)
    try:
        info = json.loads((path / "state.json").read_text())
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any read failure means the same thing
        raise CheckpointError(f"checkpoint {path} is missing or corrupt ({type(e).__name__}: {e}). Delete "
                              f"{path.parent} and start without --resume, or restore the files.") from e
    bad = _non_finite(state["model"])
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"checkpoint {path} holds NaN/inf weights in {', '.join(bad[:3])}{more}: training "
                              f"diverged before it was saved, and resuming would continue from broken weights. Delete "
                              f"{path.parent} and start again without --resume (a lower --lr or --grad-clip helps "
                              "a diverging run), or choose another --out.")
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-{d.rank}.pt"
    if info.get("world") == d.world and rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return info
