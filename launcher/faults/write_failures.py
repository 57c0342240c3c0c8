"""Failed writes said in one line that names the path, its filesystem and the cause, learnt by every rank at once.

Only rank 0 writes checkpoints, metrics and final/, but every rank must stop together when a write fails:
a rank that raised alone would leave the others waiting in the next collective until the process-group
timeout. So the writer catches the error, and `agree` (one all-reduce of one number that replaces the barrier
after the write, plus a broadcast from the failing rank only when one failed) hands the same exception to every
rank, O(1) per rank at any world size.

torch.save on a full disk raises `RuntimeError: [enforce fail at inline_container.cc] unexpected pos` (or
`basic_ios::clear: iostream error`) with no errno, and safetensors wraps the OSError in its own error type,
so the cause is read from the errno when there is one, else from the message and the free space left.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from launcher.errors import LeaseLost, RunStopped, WriteFailed
from launcher.faults.agreement import first_failing_rank, from_rank

_KINDS: dict[str, type[RunStopped]] = {"WriteFailed": WriteFailed, "LeaseLost": LeaseLost, "RunStopped": RunStopped}
FULL_BELOW_BYTES = 1 << 20  # a filesystem with less than this available after a failed write counts as full


def mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _available_bytes(path: Path) -> int | None:
    try:
        stats = os.statvfs(mount_point(path))
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def cause_of(err: BaseException, path: Path) -> str:
    """'no space left on device', 'permission denied', ... for an error raised while writing under `path`."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "no space left on device"
    if code == errno.EDQUOT or "quota" in text.lower():
        return "disk quota exceeded"
    if code is not None:
        return os.strerror(code).lower()
    available = _available_bytes(path)
    if available is not None and available < FULL_BELOW_BYTES:
        return "no space left on device"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}"


def write_failed(err: BaseException, path: Path, what: str) -> WriteFailed:
    """The one-line error for a failed write of `what` under `path` (call it before cleaning up)."""
    cause = cause_of(err, path)
    # Only a full disk or quota is fixed by freeing space; any other cause (a bug, a permission) says itself.
    fix = "free space" if cause in ("no space left on device", "disk quota exceeded") else "fix the cause above"
    return WriteFailed(f"cannot write {what} to {path}: {cause} (filesystem {mount_point(path)}); "
                       f"every earlier checkpoint is intact: {fix}, then run the same "
                       f"command again (--resume auto continues from the newest checkpoint)")


def agree(failure: RunStopped | None) -> None:
    """Collective: raise the same RunStopped on every rank when any rank has one (the lowest rank's wins)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = first_failing_rank(failure is not None)
        if rank is None:
            return
        kind, message = from_rank(None if failure is None else (type(failure).__name__, str(failure)), rank)
        raise _KINDS.get(kind, RunStopped)(message if rank == 0 else f"rank {rank}: {message}")
    if failure is not None:
        raise failure


def main_writes(is_main: bool, path: Path, what: str, write: Callable[[], None]) -> None:
    """Rank 0 runs `write`; every rank returns together, or raises WriteFailed together."""
    failure = None
    if is_main:
        try:
            write()
        except RunStopped as err:  # e.g. LeaseLost from a check inside `write`
            failure = err
        except Exception as err:  # noqa: BLE001 - any failure of the write is reported the same way
            failure = write_failed(err, path, what)
    agree(failure)
