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
