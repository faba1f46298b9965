"""An audit of every collective a run makes: where its tensors live, against the device the run was given.

NCCL serves only CUDA tensors, on the GPU of this rank: a CPU tensor, or a tensor on another rank's GPU,
handed to a collective crashes or hangs the first GPU run. The audit wraps torch.distributed's collectives
(tensor, object and barrier calls, the ones FSDP2 and DCP make inside torch included) and its functional
collectives (what DTensor uses), records each call with the devices of its tensors and of its object
transport (torch serializes objects into a tensor on the group's object device), and says which calls
were off the expected device, with the minitron line that led to them.

    MINITRON_AUDIT_COLLECTIVES=/tmp/audit torchrun ... minitron run recipe.yaml
    # each rank writes /tmp/audit.rank<r>.json: {"device": ..., "calls": [...], "violations": [...]}

ranks.join installs it when that variable is set; tests and benchmarks/gpu_check.py read the files. It sees the
calls made through Python; DDP's bucketed gradient all-reduce runs inside its C++ reducer (on the buckets, which
live on the parameters' device) and is not recorded.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import traceback

import torch

TENSOR_OPS = ("broadcast", "all_reduce", "all_reduce_coalesced", "reduce", "all_gather", "all_gather_single",
              "all_gather_into_tensor", "all_gather_coalesced", "gather", "scatter", "reduce_scatter",
              "reduce_scatter_single", "reduce_scatter_tensor", "all_to_all_single", "all_to_all", "send", "recv",
              "isend", "irecv")
OBJECT_OPS = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
              "send_object_list", "recv_object_list")
BARRIERS = ("barrier", "monitored_barrier")
FUNCTIONAL_OPS = ("broadcast", "all_reduce", "all_gather_single", "all_gather_tensor", "reduce_scatter_single",
                  "reduce_scatter_tensor", "all_to_all_single", "all_reduce_coalesced")
ENV = "MINITRON_AUDIT_COLLECTIVES"


class Audit:
    """The recorded calls of this process and the device they must use."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.calls: list[dict] = []

    def expected(self) -> str:
        """The device string every collective tensor must have: cuda:<index> on CUDA, else the type."""
        d = self.device
        if d.type == "cuda":
            return f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}"
        return d.type

    def violations(self) -> list[dict]:
        """Calls with a tensor, object transport or barrier device other than expected()."""
        want = self.expected()
        return [c for c in self.calls if any(dev != want for dev in c["devices"])]

    def write(self, path: str) -> None:
        rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group may be gone at exit
        with open(f"{path}.rank{rank}.json", "w") as f:
            json.dump({"device": self.expected(), "calls": self.calls, "violations": self.violations()}, f)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _device_name(t: torch.Tensor) -> str:
    d = t.device
    return f"cuda:{d.index}" if d.type == "cuda" else d.type


def _object_device(group) -> str:
    """The device torch serializes objects onto (and NCCL barriers use) for `group`."""
    from torch.distributed import distributed_c10d as c10d

    return str(torch.device(c10d._get_object_coll_device(group)))


def _caller() -> str:
    """The innermost minitron frame (file:line) that led to the call, else the innermost frame."""
    frames = [f for f in traceback.extract_stack()[:-3] if "audit.py" not in f.filename]
    ours = [f for f in frames if "minitron" in f.filename and "site-packages/torch" not in f.filename]
    f = (ours or frames)[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno}"


def _wrap(audit: Audit, kind: str, name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        devices = [_device_name(t) for t in _tensors(list(args)) + _tensors(list(kwargs.values()))]
        if kind in ("object", "barrier"):
            group = kwargs.get("group") or next((a for a in args if isinstance(a, torch.distributed.ProcessGroup)), None)
            given = kwargs.get("device")
            devices.append(str(torch.device(given)) if given is not None else _object_device(group))
            devices = [d if d != "cuda" else f"cuda:{torch.cuda.current_device()}" for d in devices]
        audit.calls.append({"op": name, "kind": kind, "devices": devices, "caller": _caller()})
        return fn(*args, **kwargs)

    call.__minitron_audit__ = True
    return call


def install(device: torch.device | str) -> Audit:
    """Wrap the collectives of torch.distributed (and distributed_c10d, so calls inside torch are seen too)
    and of the functional collectives; returns the Audit that records them."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed import distributed_c10d as c10d

    audit = Audit(torch.device(device))
    kinds = [("tensor", n) for n in TENSOR_OPS] + [("object", n) for n in OBJECT_OPS] + [("barrier", n) for n in BARRIERS]
    for kind, name in kinds:
        for module in (dist, c10d):
            fn = getattr(module, name, None)
            if fn is not None and not getattr(fn, "__minitron_audit__", False):
                setattr(module, name, _wrap(audit, kind, name, fn))
    for name in FUNCTIONAL_OPS:
        fn = getattr(funcol, name, None)
        if fn is not None and not getattr(fn, "__minitron_audit__", False):
            setattr(funcol, name, _wrap(audit, "functional", f"funcol.{name}", fn))
    return audit


def install_from_env(device: torch.device | str) -> Audit | None:
    """install() when $MINITRON_AUDIT_COLLECTIVES names a file prefix; each rank writes its file at exit."""
    path = os.environ.get(ENV)
    if not path:
        return None
    audit = install(device)
    atexit.register(audit.write, path)
    return audit
