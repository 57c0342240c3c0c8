"""What a checkpoint is: its files' names, `TrainerState`, the errors, the step folders (`list_checkpoints`) and
the manifest check (`validate`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launcher.checkpoint.files import _sha256
from launcher.faults.lease import LEASE_PREFIX as LEASE_PREFIX  # the run's claim on its folder, not its output

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1
# Test-only fault injection: kill this process halfway through writing the checkpoint of this step.
FAULT_ENV = "LAUNCHER_TEST_KILL_DURING_SAVE_AT_STEP"
# Test-only: the ranks listed here (comma-separated RANK values) see no checkpoint in an output folder, as a
# node with a stale view of a shared file system might (NFS attribute caching after a requeue).
STALE_VIEW_ENV = "LAUNCHER_TEST_STALE_VIEW_RANKS"


class CheckpointError(Exception):
    """A folder that is not a complete, loadable checkpoint."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that validates but does not fit this model, optimizer or scheduler."""


COMPILE_PREFIX = "_orig_mod."  # what torch.compile's OptimizedModule puts before every key of its module


def plain_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the plain model names them: torch.compile's `_orig_mod.` removed wherever it occurs.

    Accelerate's get_state_dict unwraps DDP (`module.`) but keeps a compiled module, and a model compiled
    before `prepare` (or a compiled submodule) keeps the prefix even with keep_torch_compile=False.
    """
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state_dict.items()}


@dataclass
class TrainerState:
    """Where training stands; everything here is plain data saved as JSON."""

    epoch: int = 0  # index of the epoch in progress (the next one once `batches_done` is 0)
    batches_done: int = 0  # micro-batches of `epoch` already trained (per process)
    # Samples of `epoch` consumed by all ranks together at the last optimizer step: the position a resume
    # continues from, at any world size (launcher.data.sampling). 0 in checkpoints from before it existed.
    samples_done: int = 0
    global_step: int = 0  # optimizer steps taken
    history: list[dict] = field(default_factory=list)  # one metrics row per completed epoch
    best_value: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    bad_epochs: int = 0  # epochs since the monitored metric last improved (early stopping)
    train_stats: dict | None = None  # partial-epoch training statistics of this process
    epoch_seconds: float = 0.0  # time already spent in `epoch` before the checkpoint
    train_seconds: float = 0.0
    world_size: int = 1
    reason: str = ""
    finished: str = ""  # "completed" or "early-stopped" in the checkpoint that ends the run
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Names of checkpoint folders, oldest first (the names sort by training progress)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name.startswith("step-"))


# Checkpoints this process validated, with their manifest's identity at that moment: a resume hashes each
# file once (rank 0 chooses the checkpoint, then loads it) instead of once per step of the way.
_VALIDATED: dict[str, tuple] = {}


def _manifest_identity(path: Path) -> tuple | None:
    try:
        st = (path / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def validated_once(path: str | os.PathLike) -> None:
    """`validate`, unless this process already validated this checkpoint and its manifest is unchanged."""
    path = Path(path)
    key = str(path.resolve())
    identity = _manifest_identity(path)
    if identity is None or _VALIDATED.get(key) != identity:
        validate(path)


def validate(path: str | os.PathLike) -> dict:
    """Return the manifest of a complete checkpoint, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    identity = _manifest_identity(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST} (incomplete write?)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/{MANIFEST} is unreadable: {err}") from None
    if manifest.get("format") != FORMAT_VERSION or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}/{MANIFEST} has an unknown format")
    for fname, meta in manifest["files"].items():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"{path} is missing {fname}")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}/{fname} has {file.stat().st_size} bytes, expected {meta['size']}")
        if "sha256" in meta and _sha256(file) != meta["sha256"]:  # sharded checkpoints: sizes only for shards
            raise CheckpointError(f"{path}/{fname} does not match its checksum (corrupted)")
    if identity is not None and identity == _manifest_identity(path):
        _VALIDATED[str(path.resolve())] = identity
    return manifest
