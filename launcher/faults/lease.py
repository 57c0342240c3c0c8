"""One run per output folder: a lease file that rank 0 holds for as long as the run lasts.

A second launch on a folder in use stops at once (FolderInUse, exit 2) and names the holder; a claim left
by a dead run never blocks a resume. The mechanism is the one NFS-safe locks have long used (flufl.lock):

- claim: write a unique file `.launcher-lease.<host>.<pid>.<id>` (who holds it, as JSON), then
  `os.link` it to `.launcher-lease`. link() is atomic on NFS and Lustre, unlike O_EXCL on older NFS; a lost
  reply to a link that did succeed is caught by checking that the unique file now has 2 links.
- heartbeat: a daemon thread touches the unique file (the same inode as the lease) every
  `HEARTBEAT_SECONDS`; the lease's mtime says when its holder last showed life.
- a held lease is taken over at once when its holder is the same SLURM job (a requeue keeps
  SLURM_JOB_ID), the same torchrun agent (an in-job restart), or a process of this host that is gone (its
  pid is dead or now belongs to a younger process); from any host when the heartbeat is older than
  `STALE_SECONDS`; and by `--force`, with a loud warning.
- the holder checks that the lease is still its own before every checkpoint (LeaseLost otherwise), and
  each checkpoint's manifest records the holder's run id.

Relies on: link() and rename() being atomic on the shared filesystem, st_nlink being accurate after a link,
utime() moving the mtime, and clocks across hosts agreeing to well within `STALE_SECONDS` (NTP).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import LeaseLost, UsageError

# The lease files in an output folder start with this; checkpoint code treats them as the claim, not output.
LEASE_PREFIX = ".launcher-lease"
LEASE_NAME = LEASE_PREFIX
HEARTBEAT_SECONDS = 15.0
# A holder whose heartbeat is older than this is taken for dead from any host: 8 missed heartbeats,
# which also covers NFS attribute caching (acregmax is 60 s by default).
STALE_SECONDS = 120.0


class FolderInUse(UsageError):
    """The output folder is held by another live run."""


def pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): tells a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    now = pid_start(pid)
    return start is None or now is None or now == start


def identity() -> dict[str, Any]:
    """Who this process is, as the lease file records it."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "pid": pid, "pid_start": pid_start(pid),
        # torchrun's agent survives its workers' restarts: its pid names "the same job" on this host
        "agent_pid": os.getppid() if "TORCHELASTIC_RESTART_COUNT" in os.environ else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv)[:300],
    }


def takeover_reason(holder: dict, me: dict, age: float, stale_seconds: float = STALE_SECONDS) -> str | None:
    """Why `me` may take over the lease `holder` wrote (heartbeat `age` seconds ago), or None: in use."""
    if me.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it is this SLURM job's own claim ({me['slurm_job_id']}, requeued or restarted)"
    if holder.get("host") == me["host"]:
        if not _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
            return f"its process {holder.get('pid')} on {holder['host']} is gone"
        if holder.get("agent_pid") and holder["agent_pid"] == me.get("agent_pid"):
            return "it is this torchrun job's own claim (its workers were restarted)"
    if age > stale_seconds:
        return f"its heartbeat is {age:.0f}s old (stale after {stale_seconds:.0f}s)"
    return None


def describe(holder: dict, folder: Path, age: float) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"output folder {folder} is in use by pid {holder.get('pid')} on {holder.get('host')}{job} since "
            f"{holder.get('since')} (heartbeat {age:.0f}s ago); wait for it to finish or stop it, use another "
            f"--output-dir, or pass --force if you are sure that run is dead")


@dataclass
class OutputLease:
    """Rank 0's claim on its output folder. `check()` before writing; `release()` at the end."""

    folder: Path
    run_id: str
    claim_file: Path
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    created_folder: bool = False  # the claim made the folder: a run that wrote nothing leaves none behind
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.folder / LEASE_NAME

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="launcher-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with contextlib.suppress(OSError):  # a missed beat is harmless; the next one may get through
                os.utime(self.claim_file)

    def owned(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.stat(self.claim_file).st_ino
        except OSError:
            return False

    def check(self) -> None:
        if not self.owned():
            holder = _read(self.path) or {}
            raise LeaseLost(f"output folder {self.folder} was taken over by pid {holder.get('pid')} on "
                            f"{holder.get('host')} (since {holder.get('since')}); this run stops without "
                            f"writing over it")

    def release(self) -> None:
        self._stop.set()
        if self.owned():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.unlink(self.claim_file)
        if self.created_folder:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # only when empty


class NoLease:
    """What ranks other than 0 hold: they never write, so there is nothing to check."""

    run_id = None

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _linked(claim_file: Path, lease: Path) -> bool:
    try:
        os.link(claim_file, lease)
    except OSError:
        pass  # EEXIST, or on NFS a retransmitted link whose first attempt succeeded: st_nlink decides
    return os.stat(claim_file).st_nlink == 2


def _warn(message: str) -> None:
    print(f"\n{'!' * 100}\nWARNING: {message}\n{'!' * 100}\n", file=sys.stderr, flush=True)


def claim(folder: str | os.PathLike, *, force: bool = False, stale_seconds: float = STALE_SECONDS,
          heartbeat_seconds: float = HEARTBEAT_SECONDS) -> OutputLease:
    """Claim `folder` for this process (creating it), or raise FolderInUse naming the live holder."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    me = identity()
    run_id = uuid.uuid4().hex
    me["run_id"] = run_id
    claim_file = folder / f"{LEASE_NAME}.{me['host']}.{me['pid']}.{run_id[:8]}"
    claim_file.write_text(json.dumps(me))
    lease = folder / LEASE_NAME
    try:
        for _ in range(5):
            if _linked(claim_file, lease):
                held = OutputLease(folder, run_id, claim_file, heartbeat_seconds, created)
                held.start_heartbeat()
                atexit.register(held.release)  # any exit that runs Python's exit handlers frees the folder
                return held
            try:
                info = os.stat(lease)
            except FileNotFoundError:
                continue  # released between our link and our look: try again
            holder = _read(lease)
            if holder is None:  # being written by a claimer right now (or garbage): look again shortly
                time.sleep(0.2)
                holder = _read(lease) or {}
            age = time.time() - info.st_mtime
            reason = takeover_reason(holder, me, age, stale_seconds)
            if reason is None and not force:
                raise FolderInUse(describe(holder, folder, age))
            if reason is None:
                _warn(f"--force: taking output folder {folder} over from pid {holder.get('pid')} on "
                      f"{holder.get('host')} (heartbeat {age:.0f}s ago). If that run is still alive it stops "
                      f"at its next checkpoint, but two runs may have written into this folder meanwhile.")
            else:
                print(f"taking over the claim on {folder}: {reason}", file=sys.stderr, flush=True)
            _break(lease, info.st_ino, holder, folder)
        raise FolderInUse(f"output folder {folder} is being claimed by another launch at this very moment; "
                          f"run one launch per --output-dir")
    except BaseException:
        with contextlib.suppress(OSError):
            claim_file.unlink()
        raise


def _break(lease: Path, inode: int, holder: dict, folder: Path) -> None:
    """Remove the lease we looked at, unless it changed meanwhile (then the next round looks again)."""
    with contextlib.suppress(OSError):
        if os.stat(lease).st_ino == inode:
            os.unlink(lease)
    if holder.get("host") and holder.get("pid") and holder.get("run_id"):
        with contextlib.suppress(OSError):
            (folder / f"{LEASE_NAME}.{holder['host']}.{holder['pid']}.{holder['run_id'][:8]}").unlink()


def claim_for_ranks(folder: str | os.PathLike, *, is_main: bool, force: bool = False) -> OutputLease | NoLease:
    """Collective: rank 0 claims `folder`, every rank learns the outcome (FolderInUse raised on all)."""
    import torch.distributed as dist

    held: OutputLease | NoLease = NoLease()
    error = None
    if is_main:
        try:
            held = claim(folder, force=force)
        except UsageError as err:
            error = str(err)
        except OSError as err:  # e.g. a read-only or foreign folder: said here, not as a hang on the others
            error = (f"cannot claim output folder {folder}: {err.strerror or err}; choose a writable "
                     f"--output-dir")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise FolderInUse(error)
    return held
