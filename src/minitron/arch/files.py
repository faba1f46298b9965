"""Atomic output folders: write into a temp dir beside the target, rename into place at the end."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# how writers that wrap the OS error (safetensors' Rust writer, torch.save) still say it
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "storagefull")


class DiskFullError(OSError, ValueError):
    """The disk (or quota) filled up while an output was written; nothing was left at the output path.

    An OSError (errno ENOSPC) for callers that look at errno, and a ValueError so that the command line
    prints its message and exits 2 like every other user-fixable error."""


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` (or an exception it wraps) says the disk or the quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free now"
    except OSError:
        return "free space unknown"


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine). Not POSIX: assume it does (never remove its files)."""
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):  # no process can have this number
        return False
    return True


def _remove_stale_temps(out: Path) -> None:
    """Remove `.<name>.tmp-<pid>-*` dirs left beside `out` by a process that was killed (its pid is gone)."""
    prefix = f".{out.name}.tmp-"
    for old in out.parent.glob(prefix + "*"):
        pid_text = old.name[len(prefix):].split("-", 1)[0]
        if old.is_dir() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temp dir beside `out`; on success it replaces `out` (one rename), on error it is removed.

    So a crash never leaves half an output at `out`; the temp dir of a process killed outright (SIGKILL,
    power loss) is removed by the next atomic_dir for the same `out`. A full disk raises DiskFullError,
    which says where and what to do.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except Exception as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial output took before measuring
            err = DiskFullError(f"the disk is full: no space left on the device of {out.parent} while writing "
                                f"{out} ({_free_space(out.parent)}); nothing was left at {out}. Free some space "
                                "(or choose an output on a disk with room) and rerun the same command.")
            err.errno = errno.ENOSPC
            raise err from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level log lines on stderr (llama.cpp logs every tensor it loads or quantizes) for the block."""
    fd = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def digest(obj) -> str:
    """SHA-256 (hex) of a JSON-able object, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stat_identity(path: Path) -> list:
    """A file's cheap identity: [size, mtime in ns]."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
