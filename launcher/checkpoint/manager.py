"""`CheckpointManager`: every rank saves together, rank 0 writes atomically; rotation, `best`, stale temp folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.collective import _gather_to_all
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
             failure: RunStopped | None = None) -> Path:
        """Write one complete checkpoint (and point `best` at it). Every rank calls this; returns the folder.

        `failure`: an earlier write of this rank that failed (e.g. the metrics line); it is reported with
        this save's outcome instead of writing. Raises WriteFailed or LeaseLost on every rank together.
        """
        rng_states = _gather_to_all(capture_rng())
        train_stats = _gather_to_all(state.train_stats)
        name = checkpoint_name(state.global_step)
        final = self.root / name
        if self.is_main and failure is None:
            failure = self._guarded_write(final, state, train_stats, rng_states, plain_state_dict(model_state),
                                          optimizer, scheduler, scaler, best)
        agree(failure)  # nobody goes on (or exits) before the checkpoint is complete on disk, or all stop
        return final

    def _tmp(self, final: Path) -> Path:
        return self.root / f".tmp-{final.name}-{os.getpid()}"

    def _guarded_write(self, final: Path, state: TrainerState, train_stats: list, rng_states: list,
                       model_state: dict, optimizer: Any, scheduler: Any, scaler: Any,
                       best: bool) -> RunStopped | None:
        try:
            if self.lease is not None:
                self.lease.check()  # a stale writer never overwrites what the folder's new owner wrote
            self._write(final, state, train_stats, rng_states, model_state, optimizer, scheduler, scaler)
            if best:
                self.mark_best(final.name)
        except LeaseLost as err:
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

    def _write(self, final: Path, state: TrainerState, train_stats: list, rng_states: list,
               model_state: dict, optimizer: Any, scheduler: Any, scaler: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        fault = os.environ.get(FAULT_ENV) == str(state.global_step)
        payload = asdict(state)
        payload["train_stats"] = train_stats  # one entry per rank
        files = {
            "model.safetensors": lambda p: save_weights(model_state, p),
            "optimizer.pt": lambda p: torch.save(optimizer.state_dict(), p),
            "rng.pt": lambda p: torch.save({"ranks": rng_states}, p),
            TRAINER_STATE: lambda p: Path(p).write_text(json.dumps(payload, indent=1)),
        }
        if scheduler is not None:
            files["scheduler.pt"] = lambda p: torch.save(scheduler.state_dict(), p)
        if scaler is not None:
            files["scaler.pt"] = lambda p: torch.save(scaler.state_dict(), p)
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
