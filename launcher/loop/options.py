"""`fit`'s grouped options: what it follows (Monitor), when it stops early (EarlyStopping) and what it
keeps on disk (Checkpointing). Plain frozen data, checked when built, so a wrong value fails at the call
that made it, before any process trains."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from launcher.errors import UsageError

_NOT_MONITORED = ("samples", "tokens", "confusion_matrix")  # counts and tables, not scores


@dataclass(frozen=True)
class Monitor:
    """The validation metric (a `val_*` key of the epoch rows) that `checkpoints/best`, early stopping and
    ReduceLROnPlateau follow, and whether it improves upward ("max") or downward ("min").

    `Monitor()` follows the task's own choice (val_accuracy for single-label classification, val_f1_micro
    for multi-label, val_loss for regression and language models). A built-in metric knows its direction;
    a user metric (`metrics={"top2": ...}` gives `val_top2`) needs `mode`. `fit` refuses a name the run will
    never produce before anything trains, naming the keys that exist.
    """

    metric: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.metric is not None and not (isinstance(self.metric, str) and self.metric.startswith("val_")):
            raise ValueError(f"Monitor metric {self.metric!r} is not a validation metric: name a val_* key of the "
                             f"epoch rows, e.g. val_loss")
        if self.mode not in (None, "max", "min"):
            raise ValueError(f"Monitor mode must be 'max' or 'min' (got {self.mode!r})")

    def resolve(self, task: Any, user_metrics: tuple[str, ...]) -> Monitor:
        """This monitor for a run of `task` with `user_metrics`: both fields set, or a UsageError."""
        default, default_mode = task.default_monitor
        builtin = [default] + [f"val_{n}" for n in task.metric_names()
                               if n not in _NOT_MONITORED and f"val_{n}" != default]
        available = builtin + [f"val_{n}" for n in user_metrics if f"val_{n}" not in builtin]
        metric = self.metric or default
        if metric not in available:
            raise UsageError(f"Monitor metric {metric!r} is not a metric; choose one of {', '.join(available)}")
        mode = self.mode
        if mode is None:
            if metric == default:
                mode = default_mode
            elif metric in builtin:
                mode = "min" if metric[4:] in task.lower_is_better else "max"
            else:
                raise UsageError(f"Monitor({metric!r}) follows a metric of your own: say whether it improves "
                                 f"upward or downward, Monitor({metric!r}, 'max') or 'min'")
        return Monitor(metric, mode)


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
