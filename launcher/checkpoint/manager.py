"""`CheckpointManager`: every rank saves together, rank 0 writes atomically; rotation, `best`, stale temp folders.

A save costs every rank O(1) at any world size and two collectives: each rank writes its own file (RNG,
statistics, a stream's position) into
the temp folder, one all-reduce sums the training statistics (and each rank's health flags: its RNG file
written, the caller's checks), rank 0 writes the shared files and commits, and `agree` (one all-reduce of one
number) tells every rank the outcome. No rank receives another rank's state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from launcher.checkpoint.files import _fsync_path, _sha256, save_weights
from launcher.checkpoint.layout import (
    FAULT_ENV,
    FORMAT_VERSION,
    MANIFEST,
    TRAINER_STATE,
    TrainerState,
    checkpoint_name,
    checkpoints_dir,
    list_checkpoints,
    plain_state_dict,
)
from launcher.checkpoint.rank_state import STATS_REDUCED, reduce_with_flags, rng_file, tmp_suffix, write_rank_rng
from launcher.checkpoint.rng import capture_rng
from launcher.errors import LeaseLost, RunStopped
from launcher.faults.write_failures import agree, write_failed


@dataclass
class CheckpointManager:
    """Saves, rotates and tracks the best checkpoint. Call `save` on every rank."""

    output_dir: Path
    keep_last: int = 3
    is_main: bool = True
    lease: Any = None  # launcher.faults.lease.OutputLease on rank 0: checked before every write, its run id recorded

    @property
    def root(self) -> Path:
        return checkpoints_dir(self.output_dir)

    def save(self, state: TrainerState, *, model_state: dict[str, torch.Tensor], optimizer: Any,
             scheduler: Any = None, scaler: Any = None, best: bool = False,
             failure: RunStopped | None = None, flags: Sequence[float] = (),
             check: Callable[[list[float]], None] | None = None, loader_state: dict | None = None,
             extra_files: dict[str, Callable[[str], None]] | None = None) -> Path:
        """Write one complete checkpoint (and point `best` at it). Every rank calls this; returns the folder.

        `failure`: an earlier write of this rank that failed (e.g. the metrics line); it is reported with
        this save's outcome instead of writing. Raises WriteFailed or LeaseLost on every rank together.
        `flags`, `check`: numbers of this rank (e.g. 1.0 for 'my weights are not finite') summed over the ranks
        in the save's one reduction; `check(sums)` runs on every rank before anything is committed and may
        raise to abandon the save (the temp folder is removed).
        `loader_state`: this rank's loader position (a stream's state_dict), kept in this rank's own file.
        `extra_files`: more files of the checkpoint, name -> writer(path) run by rank 0 (fit's callbacks'
        `callbacks.safetensors`), listed in the manifest with size and sha256 like the others.
        """
        final = self.root / checkpoint_name(state.global_step)
        tmp = self._tmp(final)
        # Before the reduction below: rank 0 commits after it.
        mine = self._write_own_rng(tmp, final, state.train_stats, loader_state)
        stats, sums = reduce_with_flags(state.train_stats, [float(mine is not None), *flags])
        if check is not None:
            try:
                check(sums[1:])
            except BaseException:
                if self.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        failure = failure or mine
        if self.is_main and failure is None and not sums[0]:
            failure = self._guarded_write(final, state, stats, plain_state_dict(model_state), optimizer,
                                          scheduler, scaler, best, extra_files)
        elif self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # another rank could not write its file: no checkpoint
        agree(failure)  # nobody goes on (or exits) before the checkpoint is complete on disk, or all stop
        return final

    def _write_own_rng(self, tmp: Path, final: Path, stats: dict | None,
                       loader_state: dict | None) -> RunStopped | None:
        """This rank's own file (RNG states, statistics, loader position) into the shared temp folder (every
        rank creates it: no collective before)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            write_rank_rng(tmp, rank, capture_rng(), stats, loader_state)
        except Exception as err:  # noqa: BLE001 - torch.save raises non-OSError types on a full disk
            return write_failed(err, self.root, f"checkpoint {final.name} (rank {rank}'s {rng_file(rank)})")
        return None

    def _tmp(self, final: Path) -> Path:
        return self.root / f".tmp-{final.name}-{tmp_suffix()}"

    def _guarded_write(self, final: Path, state: TrainerState, train_stats: dict | None, model_state: dict,
                       optimizer: Any, scheduler: Any, scaler: Any, best: bool,
                       extra_files: dict | None = None) -> RunStopped | None:
        try:
            if self.lease is not None:
                self.lease.check()  # a stale writer never overwrites what the folder's new owner wrote
            self._write(final, state, train_stats, model_state, optimizer, scheduler, scaler, extra_files)
            if best:
                self.mark_best(final.name)
        except LeaseLost as err:
            self._discard(final)
            return err
        except Exception as err:  # noqa: BLE001 - torch.save and safetensors raise non-OSError types
            failure = write_failed(err, self.root, f"checkpoint {final.name}")
            self._discard(final)
            return failure
        return None

    def _discard(self, final: Path) -> None:
        """After a failed write: no temp folder left that could pass for a checkpoint, the previous one back."""
        shutil.rmtree(self._tmp(final), ignore_errors=True)
        trash = self.root / f".trash-{final.name}-{os.getpid()}"
        if trash.is_dir() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(trash, final)

    def _write(self, final: Path, state: TrainerState, train_stats: dict | None, model_state: dict,
               optimizer: Any, scheduler: Any, scaler: Any, extra_files: dict | None = None) -> None:
        tmp = self._tmp(final)  # every rank's RNG file is in it already
        fault = os.environ.get(FAULT_ENV) == str(state.global_step)
        payload = asdict(state)
        payload["train_stats"] = train_stats  # every rank's, summed (launcher.checkpoint.rank_state)
        payload[STATS_REDUCED] = True
        files = {
            "model.safetensors": lambda p: save_weights(model_state, p),
            "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
            TRAINER_STATE: lambda p: Path(p).write_text(json.dumps(payload, indent=1)),
        }
        if scheduler is not None:
            files["scheduler.pt"] = lambda p: torch.save(scheduler.state_dict(), p)
        if scaler is not None:
            files["scaler.pt"] = lambda p: torch.save(scaler.state_dict(), p)
        files.update(extra_files or {})
        manifest = {"format": FORMAT_VERSION, "step": state.global_step, "epoch": state.epoch,
                    "batches_done": state.batches_done,
                    "samples_done": state.samples_done, "reason": state.reason,
                    "owner": getattr(self.lease, "run_id", None),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": {}}
        for i, (fname, write) in enumerate(files.items()):
            path = tmp / fname
            write(str(path))
            _fsync_path(path)
            manifest["files"][fname] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            if fault and i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        manifest["world_size"] = world
        for rank in range(world):
            # Each rank's RNG file, written and fsynced by that rank before the save's reduction; rank 0 hashes
            # them all (a few KB each: one small read per rank, beside the stat it needs for the size).
            path = tmp / rng_file(rank)
            manifest["files"][path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        # Signals cannot split this: the handlers only set a flag, and a SIGKILL between the two renames
        # leaves no folder under the final name, so the previous checkpoint is the newest valid one.
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            trash = self.root / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(self.root)

    def mark_best(self, name: str) -> None:
        """Point `checkpoints/best` at the named checkpoint (an atomically replaced symlink)."""
        if not self.is_main:
            return
        link = self.root / "best"
        tmp = self.root / f".best-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)
        _fsync_path(self.root)

    def rotate(self, protect: str | None) -> None:
        """Keep the newest `keep_last` checkpoints plus `protect` (the best); drop stale temp folders."""
        if not self.is_main or not self.root.exists():
            return
        names = list_checkpoints(self.output_dir)
        for name in names[: max(len(names) - self.keep_last, 0)]:
            if name != protect:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove temp folders left by a process killed mid-write (they never were checkpoints)."""
        if not self.is_main or not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name.startswith((".tmp-", ".trash-", ".best-")):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
