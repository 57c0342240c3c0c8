"""A model factory whose forward pass never returns on one rank after some steps: a rank stuck in user code.

    recipes/classify.py --model tests.stuck_model:build      # with LAUNCHER_TEST_STUCK=RANK:STEP

RANK:vN blocks the Nth evaluation forward pass instead (validation); the stuck rank then touches the file
LAUNCHER_TEST_STUCK_FILE, when set, so that a test knows the hang has begun.

Unlike a stopped process, the stuck rank is alive (its watchdog thread runs); only its main thread is
stuck, outside torch, as in a deadlock in user code or a data loader that never yields.
"""

from __future__ import annotations

import os
import time

from torch import nn

from tests.slurm.slow_model import build as build_slow


class Stuck(nn.Module):
    def __init__(self, inner: nn.Module, stuck_at: int | None, in_eval: bool = False):
        super().__init__()
        self.inner, self.stuck_at, self.in_eval, self.calls = inner, stuck_at, in_eval, 0

    def forward(self, x):
        if self.training != self.in_eval:
            self.calls += 1
            if self.calls == self.stuck_at:
                marker = os.environ.get("LAUNCHER_TEST_STUCK_FILE")
                if marker:
                    open(marker, "w").close()
                time.sleep(3600)
        return self.inner(x)


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    rank, _, step = os.environ.get("LAUNCHER_TEST_STUCK", "").partition(":")
    in_eval = step.startswith("v")
    stuck_at = int(step.removeprefix("v")) if rank == os.environ.get("RANK", "0") else None  # one process: no RANK
    return Stuck(build_slow(input_shape, num_classes), stuck_at, in_eval)
