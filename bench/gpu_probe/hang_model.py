"""A model factory for the watchdog probe: after GPU_PROBE_HANG_AT training forwards, one forward enqueues a
GPU kernel that spins for about GPU_PROBE_SLEEP_CYCLES clock cycles (torch.cuda._sleep; ~35 s at 2**36 on a
2 GHz SM). The host does not wait for it: it keeps enqueuing steps until its next read of a device value,
which is where it blocks, as it would behind a collective stuck on the GPU. On a CPU the forward sleeps.

Three seconds after the hang starts (before a 5 s --collective-timeout fires), a thread writes where the
main thread is waiting to GPU_PROBE_WHERE, as launcher.faults.watchdog sees it (in torch?, its GPU still busy?,
file:line in function): in a multi-rank run, a live rank that is neither inside torch nor waiting on its GPU
is what the watchdog names as a culprit (name_stuck_ranks).

    --model /path/to/gpu_probe/hang_model.py:build
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch
from torch import nn

from launcher.models.builtin import MLP


def _report_where(path: str, delay: float, device: int | None) -> None:
    time.sleep(delay)
    from launcher.faults.watchdog import _gpu_busy, _main_thread_location

    in_torch, where = _main_thread_location()
    Path(path).write_text(json.dumps({"in_torch": in_torch, "gpu_busy": _gpu_busy(device), "where": where}))


class HangOnDevice(nn.Module):
    def __init__(self, inner: nn.Module, at: int):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                where = os.environ.get("GPU_PROBE_WHERE")
                if where:
                    device = torch.cuda.current_device() if x.is_cuda else None  # per thread: read it here
                    threading.Thread(target=_report_where, args=(where, 3.0, device), daemon=True).start()
                if x.is_cuda and hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(int(os.environ.get("GPU_PROBE_SLEEP_CYCLES", str(2**36))))
                else:
                    time.sleep(3600)
        return self.inner(x)


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return HangOnDevice(MLP(input_shape, num_classes), int(os.environ.get("GPU_PROBE_HANG_AT", "10")))
