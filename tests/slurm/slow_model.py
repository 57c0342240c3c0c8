"""A model factory for the SLURM tests: the recipe's MLP, slowed down so a test can signal it mid-training.

    recipes/classify.py --model tests.slurm.slow_model:build

The digits run trains in about a second, too fast to preempt or kill "in the middle" from outside. A
sleep in the training forward pass makes every step take STEP_SECONDS longer and changes no number, so
runs stay bit-for-bit comparable with each other.
"""

from __future__ import annotations

import time

from torch import nn

from launcher.models.builtin import build_model

STEP_SECONDS = 0.05


class Slow(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if self.training:
            time.sleep(STEP_SECONDS)
        return self.inner(x)


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return Slow(build_model("mlp", input_shape, num_classes))
