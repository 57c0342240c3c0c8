"""`FitRun`: everything one `fit` call works with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import ReduceLROnPlateau

from launcher.checkpoint import CheckpointManager, TrainerState
from launcher.data.sampling import ElasticBatchSampler
from launcher.errors import RunStopped
from launcher.faults.watchdog import NO_WATCHDOG, NoWatchdog
from launcher.loop.batches import UnpackBatch
from launcher.tasks.base import BatchLoss, Task
from launcher.tasks.metrics import MetricSet
from launcher.tracking.tracker import Tracker


@dataclass
class FitRun:
    """Everything one `fit` call works with, so the loop (loop.training) reads as steps, not bookkeeping.

    The first block is fixed once Accelerate has prepared the objects; `state` is what a checkpoint saves;
    the last block is transient per-launch bookkeeping that no checkpoint holds.
    """

    # Prepared objects and options, fixed for the whole call.
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (DDP-wrapped etc.); accelerator.unwrap_model gives the plain one
    optimizer: Any  # accelerate's AcceleratedOptimizer
    plateau: ReduceLROnPlateau | None  # stepped once per epoch with the monitored metric
    step_sched: Any  # accelerate-wrapped per-step scheduler (None with plateau or no schedule)
    task: Task  # its losses and statistics (launcher.tasks)
    compute: Callable[[Any, Any], BatchLoss]  # (model, batch) -> the batch's losses (loop.batches.batch_losses)
    metrics: MetricSet  # the user metrics, computed at each validation
    unpack: UnpackBatch
    max_grad_norm: float | None
    log_every: int  # optimizer steps between training-loss logs
    tracker: Tracker
    progress: bool  # show a progress bar on each node's local main process
    save_every_steps: int | None
    output_dir: Path | None  # None: nothing is written
    export_final: Callable[[torch.nn.Module, dict, Path], None] | None  # writes more into final/ (rank 0)
    throughput: Any  # launcher.tracking.throughput.Throughput (FLOPs per token, peak) for MFU, or None
    # What a checkpoint saves and a resume restores.
    state: TrainerState
    # The training loader's ElasticBatchSampler (launcher.data.sampling), None for a loader Accelerate prepared:
    # then the position is samples consumed globally and resume is exact at any world size.
    train_sampler: ElasticBatchSampler | None = None
    # Per-launch bookkeeping.
    manager: CheckpointManager | None = None  # None when output_dir is None
    rng_to_restore: dict | None = None  # a mid-epoch resume restores the RNG after the loader's first draw
    resumed_stats: dict | None = None  # partial-epoch training statistics of this rank, from the checkpoint
    last_checkpoint: Path | None = None  # the folder the latest save wrote
    train_metrics: Any = None  # of the epoch just trained, all-reduced
    log_mark: tuple[float, int, float, float] = (0.0, 0, 0.0, 0.0)  # (time, samples, loss sum, seen) at last log
    grad_norm: Any = None  # the last optimizer step's gradient norm before clipping (a device tensor)
    resumed_from: Path | None = None  # the checkpoint this launch continues
    write_failure: RunStopped | None = None  # rank 0's failed metrics write, reported by the next save
    watchdog: NoWatchdog = NO_WATCHDOG  # ends the job when a rank stops making progress (launcher.faults.watchdog)
    # A training loader that keeps its own position (`resumes_itself = True`, state_dict/load_state_dict, e.g.
    # launcher.data.streaming's): each rank's state is saved in its own file of the checkpoint and restored on
    # resume at the same world size.
    stateful_loader: Any = None
    callbacks: Any = None  # launcher.loop.callbacks.Callbacks of fit's callbacks=, None without any
