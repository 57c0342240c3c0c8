"""Learning-rate schedules, as factories `(optimizer, total_steps) -> scheduler` that `fit` calls once it
knows how many optimizer steps an epoch has on this topology (after Accelerate has sharded the data).

Per-step schedules are stepped once per optimizer step (not once per process, as Accelerate does by
default), so a schedule means the same thing at every world size. ReduceLROnPlateau is stepped once per
epoch with the monitored validation metric.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

SchedulerFactory = Callable[[torch.optim.Optimizer, int], "LRScheduler | ReduceLROnPlateau"]


class _WarmupCosine:
    """Linear warm-up to the peak LR, then cosine decay to `min_ratio` of it. A picklable callable."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, cosine: bool):
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.min_ratio, self.cosine = min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(warmup_steps: int = 0, min_ratio: float = 0.0) -> SchedulerFactory:
    return lambda optimizer, total_steps: LambdaLR(
        optimizer, _WarmupCosine(warmup_steps, total_steps, min_ratio, cosine=True))


def warmup_constant(warmup_steps: int = 0) -> SchedulerFactory:
    return lambda optimizer, total_steps: LambdaLR(
        optimizer, _WarmupCosine(warmup_steps, total_steps, 0.0, cosine=False))


def reduce_on_plateau(mode: str = "max", factor: float = 0.5, patience: int = 2) -> SchedulerFactory:
    return lambda optimizer, total_steps: ReduceLROnPlateau(optimizer, mode=mode, factor=factor,
                                                            patience=patience)


def from_name(name: str, *, warmup_steps: int = 0, mode: str = "max", factor: float = 0.5,
              patience: int = 2) -> SchedulerFactory:
    if name == "cosine":
        return warmup_cosine(warmup_steps)
    if name == "constant":
        return warmup_constant(warmup_steps)
    if name == "plateau":
        return reduce_on_plateau(mode, factor, patience)
    raise ValueError(f"unknown scheduler {name!r}: use cosine, constant or plateau")


def replan(scheduler: LRScheduler | ReduceLROnPlateau | None, total_steps: int) -> tuple[int, float, float] | None:
    """Give a resumed per-step schedule the length that this launch plans, in optimizer steps.

    LambdaLR's state_dict saves the attributes of its callable lambdas, so loading a checkpoint restores the
    `total_steps` of the launch that wrote it: a relaunch with more epochs would run them at the old end's
    LR (0 for cosine). Returns (old total, LR before, LR after) when the plan changed, else None; the LR of
    the next step is recomputed from the new plan.
    """
    if not isinstance(scheduler, LambdaLR):
        return None
    planned = [fn for fn in scheduler.lr_lambdas if isinstance(fn, _WarmupCosine)]
    total_steps = max(total_steps, 1)
    if not planned or all(fn.total_steps == total_steps for fn in planned):
        return None
    old_total = planned[0].total_steps
    groups = scheduler.optimizer.param_groups
    before = groups[0]["lr"]
    for fn in planned:
        fn.total_steps = total_steps
    for group, base_lr, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
    return old_total, before, groups[0]["lr"]
