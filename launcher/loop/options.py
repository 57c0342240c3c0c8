"""`fit`'s grouped options: what it follows (Monitor), when it stops early (EarlyStopping) and what it
keeps on disk (Checkpointing). Plain frozen data, checked when built, so a wrong value fails at the call
that made it, before any process trains."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from launcher.tasks.classification import VAL_METRIC_NAMES


@dataclass(frozen=True)
class Monitor:
    """The validation metric (a `val_*` key of the epoch rows) that `checkpoints/best`, early stopping and
    ReduceLROnPlateau follow, and whether it improves upward ("max") or downward ("min")."""

    metric: str = "val_accuracy"
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.metric not in VAL_METRIC_NAMES:
            raise ValueError(f"Monitor metric {self.metric!r} is not a metric; choose one of "
                             f"{', '.join(VAL_METRIC_NAMES)}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"Monitor mode must be 'max' or 'min' (got {self.mode!r})")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after `patience` epochs in which the monitored metric did not improve by more than `min_delta`
    (min_delta also decides what counts as a new best)."""

    patience: int
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"EarlyStopping patience must be a whole number of epochs >= 1 (got {self.patience!r})")
        if not self.min_delta >= 0:
            raise ValueError(f"EarlyStopping min_delta must be >= 0 (got {self.min_delta!r})")


@dataclass(frozen=True)
class Checkpointing:
    """What `fit` keeps in `output_dir`: metrics.jsonl, checkpoints/ (after every epoch, every
    `save_every_steps` optimizer steps and on preemption; the newest `keep_last` plus `best`) and final/.

    output_dir None writes nothing (a run can still continue from resume_from).
    resume_from: a checkpoint folder to continue from exactly (launcher.checkpoint.resolve_resume finds one).
    config / extra_state: plain data stored in every checkpoint (the recipe: its config and the W&B run id).
    lease: the claim on output_dir (launcher.faults.lease.claim_for_ranks, on every rank) when the caller holds one
        already, as the recipe does before it writes anything; otherwise fit claims output_dir itself for
        the call (a folder in use raises FolderInUse, a UsageError) and releases it at the end.
    export_final: called on the main process with the unwrapped model, its full state dict and the final/
        folder once final/model.safetensors is written (the recipe writes final/hf/ with it).
    """

    output_dir: str | Path | None
    save_every_steps: int | None = None
    keep_last: int = 3
    resume_from: str | Path | None = None
    config: Mapping[str, Any] | None = None
    extra_state: Mapping[str, Any] | None = None
    lease: Any = None
    export_final: Callable[[torch.nn.Module, dict, Path], None] | None = None

    def __post_init__(self) -> None:
        if self.save_every_steps is not None and not self.save_every_steps >= 1:
            raise ValueError(f"Checkpointing save_every_steps must be >= 1 or None (got {self.save_every_steps!r})")
        if not self.keep_last >= 1:
            raise ValueError(f"Checkpointing keep_last must be >= 1 (got {self.keep_last!r})")
